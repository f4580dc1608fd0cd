"""The app's data folder: uploads stored by content hash, so a link can name them safely.

A link carries only a SHA-256 hex digest, never a path; the digest is checked to be exactly 64 hex
characters before it becomes a file name, so no parameter can reach outside the data folder.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from audit import limits
from audit.errors import AuditError, StorageError

_DIGEST = re.compile(r"[0-9a-f]{64}")
KINDS = ("models", "images")


def data_dir() -> Path:
    """The folder for uploads and cached results: $CNN_AUDIT_DATA, else `data/` beside the package."""
    default = Path(__file__).resolve().parent.parent / "data"
    return Path(os.environ.get("CNN_AUDIT_DATA", default)).resolve()


def save_upload(data: bytes, kind: str, name: str | None = None) -> str:
    """Store uploaded bytes under their SHA-256 and return the digest (the name a link uses).

    `name` (the uploader's file name) is kept beside it for display only, never used as a path.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown upload kind {kind!r}")
    limits.UPLOAD_BYTES.check(len(data), f"The upload ({name or kind})")
    digest = hashlib.sha256(data).hexdigest()
    path = upload_path(kind, digest, must_exist=False)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = part_path(path)
        try:
            partial.write_bytes(data)
            partial.replace(path)  # atomic: a reader never sees half a file
        except OSError as exc:
            partial.unlink(missing_ok=True)
            raise StorageError(f"The upload cannot be stored in {path.parent} ({exc.strerror or exc}).") from exc
    if name:
        path.with_suffix(".name").write_text(Path(name).name[:200], encoding="utf-8")
    evict_uploads(keep=path)
    return digest


def part_path(path: Path) -> Path:
    """Where `path` is written before its atomic rename: named by the writing process, so a part file whose
    writer is gone (killed mid-write) is known as such and swept (sweep_parts)."""
    return path.with_name(f"{path.name}.{os.getpid()}.part")


def sweep_parts(folder: Path | None = None) -> int:
    """Delete the part files under `folder` (the data folder) whose writing process no longer runs: what a
    kill -9 during a write leaves. Returns how many went. Finished files are never touched."""
    removed = 0
    for part in (folder or data_dir()).rglob("*.part"):
        pid = part.suffixes[-2][1:] if len(part.suffixes) >= 2 else ""
        if pid.isdigit() and _running(int(pid)):
            continue
        part.unlink(missing_ok=True)
        removed += 1
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def evict_uploads(keep: Path | None = None) -> None:
    """Keep the stored uploads under their limit: the least recently used go first (never `keep`)."""
    folder = data_dir() / "uploads"
    entries = []
    for path in folder.glob("*/*"):
        if path.suffix:  # the .name files go with their upload
            continue
        try:
            info = path.stat()
        except FileNotFoundError:
            continue
        entries.append((info.st_mtime, info.st_size, path))
    total = sum(size for _, size, _ in entries)
    for _, size, path in sorted(entries):
        if total <= limits.UPLOADS_BYTES.value:
            break
        if path == keep:
            continue
        path.unlink(missing_ok=True)
        path.with_suffix(".name").unlink(missing_ok=True)
        total -= size


def upload_name(kind: str, digest: str) -> str:
    """The file name an upload was made with, or the start of its digest."""
    try:
        return upload_path(kind, digest, must_exist=False).with_suffix(".name").read_text(encoding="utf-8")
    except OSError:
        return digest[:12]


def is_digest(text: str) -> bool:
    return isinstance(text, str) and _DIGEST.fullmatch(text) is not None


def upload_path(kind: str, digest: str, must_exist: bool = True) -> Path:
    """The file of a stored upload, refusing anything that is not a plain SHA-256 digest."""
    if kind not in KINDS or not is_digest(digest):
        raise AuditError(f"{digest!r} is not the SHA-256 name of an upload.")
    path = data_dir() / "uploads" / kind / digest
    if must_exist and not path.is_file():
        raise AuditError(f"No upload named {digest[:12]}… on this server (removed to make room, or never "
                         "uploaded here); upload the file again.")
    if must_exist:
        try:
            os.utime(path)  # recently used: evicted last
        except OSError:
            pass
    return path


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file, read in chunks (weights files are tens of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def image_root() -> Path:
    """Where a server keeps image sets too big to upload: $CNN_AUDIT_IMAGE_ROOT, else data/image_sets. Each
    folder or .zip directly inside it is offered by name; nothing outside it can be named."""
    return Path(os.environ.get("CNN_AUDIT_IMAGE_ROOT", data_dir() / "image_sets")).resolve()


def server_sets() -> list[str]:
    """The names of the image sets in image_root(), sorted (folders and .zip files, hidden ones left out)."""
    root = image_root()
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir()
                  if not p.name.startswith(".") and (p.is_dir() or p.suffix.lower() == ".zip"))


def server_set_path(name: str) -> Path:
    """The path of a server image set, by a name that must be one of server_sets() (a link cannot reach out)."""
    if name not in server_sets():
        raise StorageError(f"No image set named {name!r} in this server's {image_root()}.")
    return image_root() / name
