"""AppTest smoke tests: every page runs on real small inputs with no exception and shows its content."""

import pytest
from streamlit.testing.v1 import AppTest

TIMEOUT = 120


def _app(**query) -> AppTest:
    at = AppTest.from_file("dashboard.py", default_timeout=TIMEOUT)
    for key, value in query.items():
        at.query_params[key] = value
    return at


def test_model_page_on_the_default_model():
    at = _app().run()
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    assert at.title[0].value.startswith("Model: demo:shapes")
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Conv layers"] == "6"
    table = at.dataframe[0].value
    assert "block1_conv1" in set(table["name"])
    assert len(at.get("plotly_chart")) == 1


def test_model_page_on_vgg16_with_a_sample_photo():
    at = _app(model="demo:vgg16", image="chelsea").run()
    assert not at.exception, at.exception
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Parameters"] == "14,714,688"
    assert any("no class output" in m.value for m in at.markdown)
    assert "HED" in at.caption[0].value


@pytest.mark.parametrize("source, message", [
    ("keras:NotANet", "Unknown keras.applications model"),
    ("upload:../../etc/passwd", "not the SHA-256 name"),
    ("upload:" + "0" * 64, "upload the file again"),
    ("file:/etc/passwd", "cannot be opened here"),
])
def test_bad_model_sources_give_a_clear_message_not_a_traceback(source, message):
    at = _app(model=source).run()
    assert not at.exception, at.exception
    shown = [element.value for element in [*at.error, *at.warning, *at.info]]
    assert any(message in text for text in shown), shown
