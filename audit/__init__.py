"""CNN Audit: look inside a trained image CNN and decide what to cut from it.

The engine of the dashboard, free of any UI: notebooks, the command line and the tests use it
directly. Modules: `models` (load, fingerprint, layer table, sub-models), `images` (samples,
decoding, preprocessing), `model_files` (screening untrusted files), `storage` (uploads by content
hash), `device` (CPU/GPU), `errors` (typed exceptions), `zoo` (the demo model).
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# TensorFlow is imported by the modules that run models (audit.device sets GPU memory growth as it is imported),
# not here: `cnn-audit --help` and a mistyped command answer without it.
