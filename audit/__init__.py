"""CNN Audit: look inside a trained image CNN and decide what to cut from it.

The engine of the dashboard, free of any UI: notebooks, the command line and the tests use it
directly. Modules: `models` (load, fingerprint, layer table, sub-models), `images` (samples,
decoding, preprocessing), `model_files` (screening untrusted files), `storage` (uploads by content
hash), `device` (CPU/GPU), `errors` (typed exceptions), `zoo` (the demo model).
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from audit import device as _device  # noqa: E402

_device.configure()
