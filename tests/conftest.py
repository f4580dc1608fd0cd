import os
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Uploads and cached results of the tests go to a throwaway folder, never the repository's data/.
os.environ.setdefault("CNN_AUDIT_DATA", tempfile.mkdtemp(prefix="cnn-audit-tests-"))
