import pytest

from audit import storage
from audit.errors import AuditError


def test_uploads_are_stored_by_content_and_names_cannot_escape(tmp_path, monkeypatch):
    monkeypatch.setenv("CNN_AUDIT_DATA", str(tmp_path))
    digest = storage.save_upload(b"model bytes", "models")
    assert digest == "9cb7487000bc86ac36ce83c4acfabe8878552be99572a6770f65ab1d048a5c48"
    path = storage.upload_path("models", digest)
    assert path.read_bytes() == b"model bytes" and path.parent == tmp_path / "uploads" / "models"
    assert storage.save_upload(b"model bytes", "models") == digest  # idempotent
    for hostile in ("../../etc/passwd", "/etc/passwd", digest[:-1] + "/", digest.upper(), "", None):
        with pytest.raises(AuditError):
            storage.upload_path("models", hostile)
    with pytest.raises(AuditError, match="upload the file again"):
        storage.upload_path("images", "0" * 64)


def test_upload_size_is_limited(tmp_path, monkeypatch):
    monkeypatch.setenv("CNN_AUDIT_DATA", str(tmp_path))
    monkeypatch.setattr(storage, "MAX_UPLOAD_BYTES", 10)
    with pytest.raises(AuditError, match="limit"):
        storage.save_upload(b"x" * 11, "images")
