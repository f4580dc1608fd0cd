"""The command line: a report on demo:shapes, statistics equal to numpy's, clear failures with exit codes."""

import io
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from audit import cli, models
from audit.zoo import shapes

ROOT = Path(__file__).resolve().parent.parent


def test_report_on_demo_shapes_is_one_self_contained_file(tmp_path, capsys):
    out = tmp_path / "report.html"
    code = cli.main(["report", "--model", "demo:shapes", "--images", "shapes:12", "--out", str(out), "--steps", "2",
                     "--gallery-filters", "3", "--attribution-images", "2", "--quiet"])
    assert code == 0
    page = out.read_text()
    assert "wrote" in capsys.readouterr().err
    for heading in ("Model", "Dead filters", "Filter galleries", "Attribution", "Pruning candidates"):
        assert f"<h2>{heading}</h2>" in page
    assert "<th>Parameters</th><td>418,534</td>" in page
    assert "<th>Images</th><td>12</td>" in page
    # 2 galleries x 3 filters, 2 images x (image + Grad-CAM + Saliency): every picture is inline
    assert page.count('src="data:image/png;base64,') == 2 * 3 + 2 * 3 + 2 * 3  # galleries, their dataset examples, maps
    assert "block1_conv1: first 3 filters" in page and "block3_conv2: first 3 filters" in page
    # Plotly's script is inlined once, and nothing is fetched from the network when the file is opened
    assert page.count("plotly.js v") == 1
    assert not re.search(r'<script[^>]+src="http', page)
    # only the page's own scripts run (a name that slipped escaping would run none): they carry the policy's nonce
    nonce = re.search(r"script-src 'nonce-([\w-]+)'", page).group(1)
    assert page.count("<script") == page.count(f'<script nonce="{nonce}"') >= 2


def test_the_report_on_a_grayscale_model_draws_its_one_channel_pictures(tmp_path):
    """A (H, W, 1) gallery tile made Pillow raise "Cannot handle this data type: (1, 1, 1), |u1": every grayscale
    model's report failed, in the dashboard and here."""
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((32, 32, 1))
    x = keras.layers.Conv2D(4, 3, activation="relu", name="conv1")(inputs)
    x = keras.layers.Conv2D(4, 3, activation="relu", name="conv2")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    keras.Model(inputs, keras.layers.Dense(6, activation="softmax")(x)).save(tmp_path / "grey.keras")
    out = tmp_path / "report.html"
    assert cli.main(["report", "--model", f"file:{tmp_path / 'grey.keras'}", "--images", "shapes:6", "--out", str(out),
                     "--steps", "2", "--gallery-filters", "2", "--attribution-images", "1", "--quiet"]) == 0
    page = out.read_text()
    assert "conv1: first 2 filters" in page and page.count('src="data:image/png;base64,') >= 2 * 2 + 3


def test_the_report_holds_only_the_images_whose_input_fits_the_batch_budget(tmp_path, monkeypatch):
    """The report holds its images' model input in memory: 2,048 images of a 1024 px model were 25 GB. With a
    budget of five 64 x 64 x 3 float32 inputs (by hand: 5 * 49,152 bytes), the first 5 of 12 go in, and it says so."""
    monkeypatch.setenv("CNN_AUDIT_MAX_BATCH_BYTES", str(5 * 64 * 64 * 3 * 4))
    out = tmp_path / "report.html"
    assert cli.main(["report", "--model", "demo:shapes", "--images", "shapes:12", "--out", str(out), "--steps", "2",
                     "--gallery-filters", "1", "--attribution-images", "1", "--quiet"]) == 0
    page = out.read_text()
    assert "<th>Images</th><td>5</td>" in page
    assert "The first 5 of the 12 images" in page and "CNN_AUDIT_MAX_BATCH_BYTES" in page


def test_stats_csv_equals_a_numpy_recomputation(capsys):
    code = cli.main(["stats", "--images", "shapes:6", "--layers", "block2_conv1", "--csv", "-", "--quiet"])
    assert code == 0
    table = pd.read_csv(io.StringIO(capsys.readouterr().out))
    loaded = models.load("demo:shapes")
    maps = np.asarray(models.submodel(loaded.model, "block2_conv1")(loaded.preprocess(shapes.generate(6, 12345).images)))
    assert list(table["filter"]) == list(range(64))
    np.testing.assert_allclose(table["mean"], maps.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(table["max"], maps.max(axis=(0, 1, 2)), rtol=1e-5)
    np.testing.assert_allclose(table["apoz"], (maps <= 0).mean(axis=(0, 1, 2)), atol=1e-6)
    assert list(table["dead"]) == list(maps.max(axis=(0, 1, 2)) <= 0)


@pytest.mark.parametrize("argv, message", [
    (["stats", "--images", "shapes:6", "--layers", "no_such_layer"], "no_such_layer"),
    (["stats", "--images", "/no/such/folder"], "not a folder"),
    (["report", "--images", "photos", "--out", "x.html", "--methods", "Magic"], "Unknown attribution method"),
])
def test_bad_input_exits_1_with_the_dashboards_message(argv, message, capsys):
    assert cli.main([*argv, "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_a_bad_model_file_exits_non_zero_with_a_clear_message(tmp_path):
    bad = tmp_path / "model.keras"
    bad.write_bytes(b"PK\x03\x04 truncated zip")
    result = subprocess.run([sys.executable, "-m", "audit", "report", "--model", str(bad), "--images", "photos",
                             "--out", str(tmp_path / "r.html")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert "error: " in result.stderr and "model.keras" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "r.html").exists()


def test_bad_usage_exits_2():
    with pytest.raises(SystemExit) as stop:
        cli.main(["report", "--images", "photos"])  # no --out
    assert stop.value.code == 2


@pytest.mark.parametrize("argv, said", [
    (["stats", "--images", "shapes:100000000"], "--images: 100000000 is outside 1..20,000"),  # 1.12 TiB otherwise
    (["stats", "--images", "shapes:many"], "--images: 'many' is not a whole number"),
    (["prune", "--images", "shapes:6", "--share", "nan", "--out", "x.keras"], "--share: 'nan' is not a finite number"),
    (["prune", "--images", "shapes:6", "--share", "5", "--out", "x.keras"], "--share: 5.0 is not a share"),
    (["stats", "--images", "shapes:6", "--shards", "-5"], "--shards: -5 is outside 0..100,000"),
    (["stats", "--images", "shapes:6", "--sample", "-3"], "--sample: -3 is outside"),
    (["prune", "--images", "shapes:6", "--lr", "0", "--out", "x.keras"], "--lr: 0.0 is not above 0"),
])
def test_misused_arguments_exit_2_with_the_usage_line(argv, said, capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: cnn-audit") and said in err, err


def test_prune_writes_a_smaller_model_and_check_reports_every_capability(tmp_path, capsys):
    out = tmp_path / "pruned.keras"
    code = cli.main(["prune", "--model", "demo:shapes", "--images", "shapes:24", "--share", "0.25",
                     "--layers", "block3_conv1", "--out", str(out), "--quiet"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "block3_conv1" in printed and "32" in printed  # a quarter of 128 filters
    smaller = models.load(f"file:{out}")
    # block3_conv1 loses 32 filters (3*3*64 + 1 each) and block3_conv2 their input rows (3*3*32*128)
    assert 418_534 - smaller.model.count_params() == 32 * (3 * 3 * 64 + 1) + 3 * 3 * 32 * 128
    assert cli.main(["check", "--model", str(out), "--quiet"]) == 0
    report = capsys.readouterr().out
    assert "failed" not in report and report.count("ok ") >= 30


def test_prune_to_a_parameter_target_writes_a_model_that_keeps_that_share_and_a_saved_model(tmp_path, capsys):
    out, served = tmp_path / "pruned.keras", tmp_path / "served"
    code = cli.main(["prune", "--model", "demo:shapes", "--images", "shapes:24", "--params", "0.5",
                     "--out", str(out), "--saved-model", str(served), "--quiet"])
    assert code == 0
    printed = capsys.readouterr().out
    kept = models.load(f"file:{out}").model.count_params() / 418_534
    assert abs(kept - 0.5) <= 0.02 and f"{kept:.1%}" in printed
    assert "ms per image at batch 1" in printed and "images per second at batch 64" in printed
    assert (served / "saved_model.pb").exists()
    assert cli.main(["prune", "--images", "shapes:6", "--params", "0.5", "--macs", "0.5", "--out", "x.keras",
                     "--quiet"]) == 1
    assert "Give --params or --macs, not both." in capsys.readouterr().err


def test_the_installed_command_runs_from_any_folder(tmp_path):
    """`pip install -e .` (the README's set-up) puts `cnn-audit` beside this Python; it runs outside the
    repository, and `python -m audit` names itself so in its usage line."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(sys.executable).with_name("cnn-audit")
    assert script.exists(), "cnn-audit is not installed: run pip install -e . (the README's set-up does)"
    env = {key: value for key, value in __import__("os").environ.items() if key != "PYTHONPATH"}
    shown = subprocess.run([str(script), "--help"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0 and shown.stdout.startswith("usage: cnn-audit"), shown.stderr[-2000:]
    assert "report" in shown.stdout and "prune" in shown.stdout
    module = subprocess.run([sys.executable, "-m", "audit", "--help"], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=120)
    assert module.returncode == 0 and module.stdout.startswith("usage: python -m audit"), module.stderr[-2000:]


def test_help_answers_without_tensorflow_and_a_bug_is_one_line_with_debug_for_the_traceback(monkeypatch, capsys):
    check = ("import sys\nfrom audit import cli\ntry:\n    cli.main(['report', '--help'])\nexcept SystemExit:\n    pass\n"
             "print('tensorflow' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.stdout.strip().endswith("False") and "--preprocessing" in done.stdout, done.stdout[-500:]

    def broken(args):
        raise ValueError("a shape nobody expected\nsecond line")

    monkeypatch.setattr(cli, "_check", broken)
    assert cli.main(["check", "--model", "demo:shapes"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ValueError: a shape nobody expected (a bug of CNN Audit" in err
    assert "--debug" in err and "Traceback" not in err and "second line" not in err
    with pytest.raises(ValueError, match="a shape nobody expected"):
        cli.main(["--debug", "check", "--model", "demo:shapes"])
