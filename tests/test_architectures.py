"""The models users bring: every capability on each architecture, saved to .keras and loaded back.

The models come from audit.zoo.architectures (weights=None, small inputs). A model rebuilt from a
file is not the one built in memory (a Sequential keeps a stale graph, nested bases their own), so
each goes through `models.load("file:...")` as a user's upload would. Each capability is a cell: ok,
or refused with a reason; never failed. The README's table of tested architectures is this suite's
result (regenerate it with `python -m bench.architectures --readme`).
"""

import os
import re
from pathlib import Path

import pytest

from audit import conformance, models, surfaces
from audit.zoo import architectures

README = Path(__file__).resolve().parents[1] / "README.md"
RESULTS: dict[str, conformance.Summary] = {}
# Only surgery may refuse here: the surgery of this issue cuts plain chains (the dependency groups of
# the pruning issue widen it).
MAY_REFUSE = {"surgery"}


def load_from_file(name: str, folder: Path) -> models.LoadedModel:
    path = folder / (re.sub(r"[^A-Za-z0-9]+", "_", name) + ".keras")
    architectures.build(name).save(path)
    return models.load(f"file:{path}")


SLOWEST = {"ConvNeXtTiny", "DenseNet121", "InceptionV3", "Xception", "EfficientNetB0", "ResNet50", "MobileNetV3Small",
           "MobileNetV2", "VGG16 base + sigmoid (Sequential)",
           *(name for name in architectures.ARCHITECTURES if name.startswith("KerasHub"))}
"""Over 30 s each here, or (KerasHub's eight, 11-39 s each) beside tests/test_keras_hub.py's own checks: run in the
slow tier (`python -m pytest -m slow`, which CI runs too); the default tier keeps a nested transfer model,
Sequential files (VGG16 + Dense; its binary twin, 34 s with its report and CLI cells, is in the slow tier),
depthwise, grayscale and two-output heads."""


SURFACES_BY_BENCH = {name for name in SLOWEST if not name.startswith("KerasHub")} | {
    "Transfer-learning tutorial", "VGG16 base + Dense (Sequential)"}
"""The eight heaviest keras.applications rows and the two heaviest of the default tier (VGG16 + sigmoid keeps a
nested Sequential base with a binary head in CI): their report and CLI cells (20-40 s more each in the default
tier, 1-3 minutes for the others) come from `python -m bench.architectures --readme`, not from CI; their README
rows are compared without those columns."""
SURFACE_COLUMNS = 2  # Report and CLI, the table's last columns


BENCH_ONLY = {"DenseNet121", "InceptionV3", "ConvNeXtTiny", "Xception", "MobileNetV3Small"}
"""Five of the eight: 45-130 s each here even without those columns, more than CI's hour holds beside the browser
walks. CI keeps ResNet50 (residual), MobileNetV2 (depthwise) and EfficientNetB0 (squeeze-excite); these five run
with CNN_AUDIT_ALL_ARCHITECTURES=1 and in `python -m bench.architectures --readme`, which writes their rows."""
ALL_ARCHITECTURES = bool(os.environ.get("CNN_AUDIT_ALL_ARCHITECTURES"))


def _marks(name: str) -> list:
    marks = [pytest.mark.slow] if name in SLOWEST else []
    if name in BENCH_ONLY:
        marks.append(pytest.mark.skipif(not ALL_ARCHITECTURES, reason="set CNN_AUDIT_ALL_ARCHITECTURES=1 to run it "
                                        "(not in CI: see BENCH_ONLY); its README row comes from bench.architectures"))
    return marks


@pytest.mark.parametrize("name", [pytest.param(name, marks=_marks(name)) for name in architectures.ARCHITECTURES])
def test_every_capability_is_ok_or_refused_with_a_reason(name, tmp_path):
    loaded = load_from_file(name, tmp_path)
    cells = conformance.check(loaded) + ([] if name in SURFACES_BY_BENCH else surfaces.check(loaded))
    RESULTS[name] = conformance.summarise(loaded, architectures.SOURCES[name], cells)
    failed = [f"{cell.capability}: {cell.detail}" for cell in cells if cell.status == "failed"]
    assert not failed, failed
    refused = {cell.capability: cell.detail for cell in cells if cell.status == "refused"}
    assert set(refused) <= MAY_REFUSE, refused
    for reason in refused.values():
        assert len(reason) > 40 and "Traceback" not in reason


def _rows(table: str) -> dict[str, str]:
    return {line.split("|")[1].strip(): line.strip() for line in table.strip().splitlines()[2:]}


def test_the_readme_table_is_this_suites_result():
    """Each architecture that ran in this session has its README row as it came out (the default and the slow
    tier each check theirs), and the README lists exactly the suite's architectures."""
    if not RESULTS:
        pytest.skip("runs after the conformance tests of this session")
    text = README.read_text()
    start, end = text.index(conformance.TABLE_START), text.index(conformance.TABLE_END)
    written = _rows(text[start + len(conformance.TABLE_START):end])
    assert list(written) == list(architectures.ARCHITECTURES), "the README's table lists other architectures"
    produced = _rows(conformance.markdown_table(RESULTS))

    def compared(name, row):
        return "|".join(row.split("|")[:-1 - SURFACE_COLUMNS]) if name in SURFACES_BY_BENCH else row

    stale = [name for name, row in produced.items() if compared(name, written[name]) != compared(name, row)]
    assert not stale, f"the README's rows of {stale} are stale: run python -m bench.architectures --readme"
