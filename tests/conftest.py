import os
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Uploads and cached results of the tests go to a throwaway folder, never the repository's data/.
os.environ.setdefault("CNN_AUDIT_DATA", tempfile.mkdtemp(prefix="cnn-audit-tests-"))
# Exact numbers by default, whatever the machine: the bfloat16 path is tested where asked (tests/test_precision.py).
os.environ.setdefault("CNN_AUDIT_PRECISION", "float32")

import pytest  # noqa: E402
from streamlit.runtime.pages_manager import PagesManager  # noqa: E402


@pytest.fixture(autouse=True)
def _app_test_runs_like_a_warm_server(monkeypatch):
    """AppTest resets Streamlit's "legacy pages/ folder app" flag before every run, so each rerun would
    execute the page file alone, skipping the frame (and the button press that caused the rerun).
    A server clears that flag for good on its first run (st.navigation does it); do the same here.
    The first-run path itself is covered by the browser tests on a fresh server.
    """
    original = PagesManager.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        PagesManager.uses_pages_directory = False

    monkeypatch.setattr(PagesManager, "__init__", init)


@pytest.fixture(scope="session")
def trained_residual():
    """audit.zoo.residual trained once per test session (75 s here): a function giving a fresh copy of the trained
    network with its training and held-out sets, for the slow tier's recovery test and its browser test."""
    from audit.zoo import residual

    model, train, held_out = residual.trained()
    weights = model.get_weights()

    def fresh():
        copy = residual.build()
        copy.set_weights(weights)
        return copy, train, held_out

    return fresh
