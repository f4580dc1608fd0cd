"""A link reproduces the view: a second session opened with the first one's query parameters shows the same state.

Each test changes choices on one page in session A, takes the query parameters A wrote (what its address bar
holds, and what the Share box shows), opens session B with them, and compares what both show.
"""

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from tests.fixtures import open_page

DASHBOARD = str(Path(__file__).resolve().parent.parent / "dashboard.py")


def _open(page: str, query: dict) -> AppTest:
    return open_page(page, query)


def _link(at: AppTest) -> dict:
    return {key: value for key, value in at.query_params.items()}


def _widgets(at: AppTest) -> dict:
    """Every widget's value (sidebar and page), under its label."""
    values = {}
    for kind in ("selectbox", "multiselect", "slider", "number_input", "toggle", "radio", "text_input"):
        for widget in at.get(kind):
            values[f"{kind}:{widget.label}"] = widget.value
    return values


def _click(at: AppTest, label: str) -> AppTest:
    next(button for button in at.button if button.label == label).click()
    at.run()
    assert not at.exception, at.exception
    return at


def _reopen(at: AppTest, page: str) -> AppTest:
    link = _link(at)
    assert link, "the session wrote no query parameters"
    return _open(page, link)


def test_the_share_box_gives_the_link_to_the_view():
    at = AppTest.from_file(DASHBOARD, default_timeout=180)
    at.query_params.update({"model": "demo:vgg16", "images": "photos", "image": "coffee", "log": "1"})
    at.run()
    assert not at.exception, at.exception
    assert at.code[-1].value == "?model=demo%3Avgg16&image=coffee&log=1"  # defaults are left out
    assert "Image source" in [r.label for r in at.radio] and not at.warning


def test_model_page_link():
    a = _open("pages/model.py", {"model": "demo:vgg16"})
    a.toggle(key="model_conv_only").set_value(True)
    a.toggle(key="model_log").set_value(True).run()
    b = _reopen(a, "pages/model.py")
    assert _widgets(b) == _widgets(a)
    assert b.toggle(key="model_conv_only").value is True
    assert b.dataframe[0].value.equals(a.dataframe[0].value)
    assert len(b.dataframe[0].value) == 13  # VGG16's conv layers only


def test_activations_page_link_with_statistics():
    a = _open("pages/activations.py", {})
    a.selectbox(key="current_image_60_shape 0").set_value(7).run()
    a.selectbox(key=next(s.key for s in a.selectbox if s.label == "Layer")).set_value("block2_conv1")
    a.run()
    a.number_input(key="act_channel_block2_conv1").set_value(5)
    a.selectbox(key="act_cmap").set_value("Inferno")
    a.slider(key="act_opacity").set_value(0.75)
    a.multiselect(key=next(m.key for m in a.multiselect)).set_value(["block1_conv1", "block3_conv2"])
    _click(a, "Compute statistics")
    b = _reopen(a, "pages/activations.py")
    assert _widgets(b) == _widgets(a)
    assert b.subheader[0].value == a.subheader[0].value == "All 64 channels of block2_conv1"
    assert "image=shape+7" in str(_link(a)) or _link(a)["image"] == "shape 7"
    channel_line = [c.value for c in b.caption if c.value.startswith("Channel 5:")]
    assert channel_line and channel_line == [c.value for c in a.caption if c.value.startswith("Channel 5:")]
    assert list(b.dataframe[0].value["layer"]) == ["block1_conv1", "block3_conv2"]
    assert b.dataframe[-1].value.equals(a.dataframe[-1].value)  # the statistics, shown without a click


def test_filters_page_link_with_a_gallery():
    a = _open("pages/filters.py", {"model": "demo:shapes"})
    a.radio(key="filters_how").set_value("By index").run()
    a.text_input(key="filters_indices").set_value("2, 5").run()
    a.slider(key="filters_size").set_value(32)
    a.slider(key=next(s.key for s in a.slider if s.label == "Steps")).set_value(3)
    a.slider(key=next(s.key for s in a.slider if s.label.startswith("Octaves"))).set_value(1)
    a.run()
    _click(a, "Grow the gallery")
    b = _reopen(a, "pages/filters.py")
    assert _widgets(b) == _widgets(a)
    assert b.subheader[0].value == a.subheader[0].value
    assert b.subheader[0].value.startswith("block1_conv1: 2 filters")


def test_attribution_page_link_for_another_class():
    a = _open("pages/attribution.py", {})
    a.selectbox(key=next(s.key for s in a.selectbox if s.label == "Target class")).set_value(1)  # square
    a.multiselect(key="attr_methods").set_value(["Saliency", "Grad-CAM"])
    a.selectbox(key=next(s.key for s in a.selectbox if s.label == "CAM layer")).set_value("block2_conv2")
    a.run()
    b = _reopen(a, "pages/attribution.py")
    assert _widgets(b) == _widgets(a)
    assert b.subheader[0].value == a.subheader[0].value == "Why square?"
    assert b.dataframe[-1].value.equals(a.dataframe[-1].value)  # trust numbers of both maps


def test_pruning_page_link():
    a = _open("pages/pruning.py", {})
    a.selectbox(key="prune_criterion").set_value("l1").run()
    a.slider(key="prune_share").set_value(0.5)
    a.selectbox(key="prune_scatter_layer").set_value("block2_conv2")
    a.run()
    b = _reopen(a, "pages/pruning.py")
    assert _widgets(b) == _widgets(a)
    assert b.subheader[0].value == a.subheader[0].value
    assert [(m.label, m.value) for m in b.metric] == [(m.label, m.value) for m in a.metric]
    assert _link(b)["criterion"] == "l1" and _link(b)["share"] == "0.5"


HOSTILE = {
    "layer": "../../../etc/passwd",
    "channel": "abc",
    "opacity": "9",
    "cmap": "<script>alert(1)</script>",
    "image": "../../etc/shadow",
    "images": "upload",
    "uploads": ["../../etc/passwd", "0" * 64],
    "count": "-5",
    "stats_layers": "block1_conv1,nope",
    "junk": "1",
    "threshold": "nan",
}


def test_hostile_link_parameters_warn_and_fall_back_to_defaults():
    at = _open("pages/activations.py", HOSTILE)
    assert not at.exception, at.exception
    shown = [w.value for w in at.warning] + [e.value for e in at.error]
    assert any("Unknown link parameter 'junk'" in text for text in shown), shown
    assert any("layer=" in text and "default" in text for text in shown), shown
    assert any("channel='abc'" in text for text in shown), shown
    assert any("threshold='nan'" in text for text in shown), shown  # NaN or infinity is no number here
    assert any("not the SHA-256 name" in text for text in shown), shown
    assert any("upload the file again" in text for text in shown), shown
    # the view is the default one: the first conv layer, the sample photos (the uploads do not exist)
    assert at.subheader[0].value.startswith("All 32 channels of block1_conv1")
    assert at.slider(key="act_opacity").value == 0.5
    # nothing outside the data folder was read or named back in the link
    assert "passwd" not in str(_link(at)) and "shadow" not in str(_link(at)) and "junk" not in _link(at)


@pytest.mark.parametrize("value", [
    "x ![p](http://127.0.0.1:9/t.png) [Session expired: sign in again](http://127.0.0.1:9/login)",
    "keras:<img src=http://127.0.0.1:9/t.png>",
    "file:" + "A" * 100_000,
])
def test_a_hostile_model_value_in_a_link_is_quoted_short_and_inert(value):
    """The sidebar's warning quotes the link's `model` value: escaped (no image fetched, no link drawn) and cut
    to 60 characters (a 100 KB value took 26 s to render)."""
    at = _open("pages/model.py", {"model": value})
    assert not at.exception, at.exception
    warning = next(w.value for w in at.sidebar.warning if "link" in w.value)
    assert len(warning) < 200, len(warning)
    assert "](" not in warning.replace("\\](", "").replace("\\]\\(", "")
    assert "\\!\\[p\\]\\(" in warning or "\\<img" in warning or "AAAA…" in warning, warning
    assert "demo:shapes" in warning


def test_a_link_to_uploaded_images_opens_them_by_content_hash(tmp_path):
    import io

    import numpy as np
    from PIL import Image

    from audit import storage

    buffer = io.BytesIO()
    Image.fromarray(np.full((40, 50, 3), 200, np.uint8)).save(buffer, format="PNG")
    digest = storage.save_upload(buffer.getvalue(), "images", "grey.png")
    at = _open("pages/model.py", {"images": "upload", "uploads": digest})
    current = next(s for s in at.selectbox if s.label == "Current image")
    assert current.options == ["grey.png"] and current.value == 0
    assert _link(at)["uploads"] in (digest, [digest])


@pytest.mark.parametrize("model", ["upload:../../../../etc/passwd", "file:/etc/passwd", "demo:../../x"])
def test_model_parameter_never_opens_a_path(model):
    at = _open("pages/model.py", {"model": model})
    shown = [element.value for element in [*at.error, *at.warning, *at.info]]
    assert shown and not at.exception


def test_finished_results_are_kept_on_disk_for_the_next_viewer_even_after_a_restart():
    import numpy as np
    import pandas as pd

    from pages import jobs

    calls = []
    table = pd.DataFrame({"layer": ["a", "b"], "apoz": [0.5, 1.0]})
    arrays = (np.arange(6.0).reshape(2, 3), np.ones(2))
    assert jobs.shared_result(("test", "table"), lambda: calls.append("t") or table).equals(table)
    assert jobs.shared_result(("test", "arrays"), lambda: calls.append("a") or arrays)[0].shape == (2, 3)
    jobs._results.clear()  # what a server restart does to the memory store
    assert jobs.has_result(("test", "table"))
    assert jobs.shared_result(("test", "table"), lambda: calls.append("t") or table).equals(table)
    again = jobs.shared_result(("test", "arrays"), lambda: calls.append("a") or arrays)
    np.testing.assert_array_equal(again[0], arrays[0])
    assert calls == ["t", "a"]  # each computed once


def test_the_pruning_choice_survives_a_visit_to_the_report_page():
    """L1 and keep 60% of parameters chosen on Pruning, seen on Report: back on Pruning they were "dead or
    near-dead" again and the link had lost `criterion`."""
    at = _open("pages/pruning.py", {"count": "6"})
    at.selectbox(key="prune_criterion").set_value("l1").run()
    at.selectbox(key="prune_target").set_value("params").run()
    at.slider(key="prune_keep").set_value(0.6).run()
    assert not at.exception, at.exception
    at.switch_page("pages/report.py").run()
    assert at.selectbox(key="prune_criterion").value == "l1" and at.slider(key="prune_keep").value == 0.6
    at.switch_page("pages/pruning.py").run()
    assert not at.exception, at.exception
    assert at.selectbox(key="prune_criterion").value == "l1"
    assert at.selectbox(key="prune_target").value == "params" and at.slider(key="prune_keep").value == 0.6
    assert _link(at)["criterion"] == "l1" and _link(at)["keep"] == "0.6"


def test_changing_the_model_keeps_the_uploaded_images():
    """The image source reset to the sample photos when the model changed: the uploads stay in use."""
    import io

    import numpy as np
    from PIL import Image

    from audit import storage

    buffer = io.BytesIO()
    Image.fromarray(np.full((40, 50, 3), 90, np.uint8)).save(buffer, format="PNG")
    digest = storage.save_upload(buffer.getvalue(), "images", "kept.png")
    at = _open("pages/model.py", {"images": "upload", "uploads": digest})
    assert next(s for s in at.selectbox if s.label == "Current image").options == ["kept.png"]
    at.selectbox(key="model_choice").set_value("demo:shapes-gap").run()
    assert not at.exception, at.exception
    assert next(s for s in at.selectbox if s.label == "Current image").options == ["kept.png"]
    assert _link(at)["images"] == "upload"
