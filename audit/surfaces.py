"""The report and the command line on one model, as cells of the conformance table (audit.conformance).

audit.conformance runs every capability of the engine; a user also meets the report and the CLI's commands,
which put those capabilities together (their own argument handling, image reading, tables and files). Each is
run once, small, on the same loaded model (the CLI is handed it: its load is the row's own), with the sample
photos, and recorded as ok, refused (an AuditError: exit code 1 with the audit's message) or failed.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
import time
from pathlib import Path

from PIL import Image

from audit import cli, conformance, images, models, report
from audit.errors import AuditError
from audit.registry import ModelCache

PHOTOS = conformance.PHOTOS
CLI_COMMANDS = ("stats", "scores", "prune", "quantize")
"""The report's command is the report cell's code behind the same argument handling (tests/test_cli.py runs it);
timing and a second conversion per model are left out: the table is about what works, not how fast."""


def check(loaded: models.LoadedModel) -> list[conformance.Cell]:
    """The report, and each CLI command on a folder of the sample photos."""
    chosen = [images.LabelledImage(name, images.sample(name)) for name in PHOTOS]
    first = models.conv_layers(loaded.model)[:1]
    options = report.ReportOptions(gallery_filters=2, gallery_steps=2,  # the default layers: first and late
                                   attribution_images=1, methods=("Grad-CAM",), timing=False,
                                   quantize=False)  # the conversion is the "cli quantize" cell's; one is enough
    cells = [_run("report", lambda: report.build(loaded, chosen, options))]
    models_here = ModelCache(max_models=1, load=lambda source: loaded)
    with tempfile.TemporaryDirectory(prefix="cnn-audit-surfaces-") as folder:
        for item in chosen:
            Image.fromarray(item.pixels).save(Path(folder) / f"{item.name}.png")
        argv = {
            "stats": ["stats", "--images", folder, "--layers", *first],
            "scores": ["scores", "--images", folder],
            "prune": ["prune", "--images", "photos", "--share", "0.3", "--out", f"{folder}/pruned.keras",
                      "--no-timing"],
            "quantize": ["quantize", "--images", folder, "--calibration", "2", "--held-out", "2",
                         "--skip-sensitivity", "--batch", "0"],  # the simulation: conformance's "int8 simulation"
        }
        for command in CLI_COMMANDS:
            cells.append(_command(f"cli {command}", [*argv[command], "--model", loaded.source, "--quiet"],
                                  models_here))
    return cells


def _run(capability: str, work) -> conformance.Cell:
    start = time.perf_counter()
    try:
        work()
    except AuditError as exc:
        return conformance.Cell(capability, "refused", str(exc), time.perf_counter() - start)
    except Exception as exc:  # noqa: BLE001 (a failure is what this records)
        return conformance.Cell(capability, "failed", f"{type(exc).__name__}: {str(exc)[:300]}",
                                time.perf_counter() - start)
    return conformance.Cell(capability, "ok", "", time.perf_counter() - start)


def _command(capability: str, argv: list[str], loaded_models: ModelCache) -> conformance.Cell:
    """One `cnn-audit` command in this process; its exit code and its last error line make the cell."""
    start, said = time.perf_counter(), io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(said):
        code = cli.main(argv, loaded_models=loaded_models)
    seconds = time.perf_counter() - start
    if code == 0:
        return conformance.Cell(capability, "ok", "", seconds)
    message = next((line for line in reversed(said.getvalue().splitlines()) if line.startswith("error: ")), "")
    status = "failed" if code != 1 or "a bug of CNN Audit" in message or not message else "refused"
    return conformance.Cell(capability, status, message.removeprefix("error: ") or f"exit code {code}", seconds)
