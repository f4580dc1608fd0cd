import numpy as np
import pytest
from pathlib import Path

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
    monkeypatch.setenv("CNN_AUDIT_MAX_UPLOAD_BYTES", "10")
    with pytest.raises(AuditError, match="11 bytes, over this server's limit of 10 .set CNN_AUDIT_MAX_UPLOAD_BYTES"):
        storage.save_upload(b"x" * 11, "images")


def test_disk_cache_round_trips_arrays_and_evicts_the_least_recently_used(tmp_path):
    import os
    import time

    import numpy as np

    from audit.disk_cache import DiskCache

    cache = DiskCache(tmp_path, max_bytes=10**9)
    first = {"images": np.arange(12, dtype=np.uint8).reshape(2, 2, 3), "scores": np.array([0.5, 1.5])}
    cache.put(("gallery", "abc", 1), first)
    got = cache.get(("gallery", "abc", 1))
    assert set(got) == {"images", "scores"}
    np.testing.assert_array_equal(got["images"], first["images"])
    assert cache.get(("gallery", "abc", 2)) is None
    big = {"x": np.random.default_rng(0).random(5000)}  # about 40 kB, incompressible
    cache.put(("a",), big)
    cache.put(("b",), big)
    old = time.time() - 100
    os.utime(cache._path(("a",)), (old, old))
    cache.max_bytes = 60_000
    cache.evict()
    assert cache.get(("a",)) is None and cache.get(("b",)) is not None


def test_disk_cache_keeps_tables_with_their_types(tmp_path):
    import pandas as pd

    from audit.disk_cache import DiskCache

    cache = DiskCache(tmp_path)
    table = pd.DataFrame({"layer": ["conv1", "conv1", "conv2"], "filter": [0, 1, 0], "apoz": [0.25, 1.0, 0.5],
                          "dead": [False, True, False]})
    key = ("filter_stats", "f1ngerprint", ("conv1", "conv2"), 0.0)
    assert cache.get_table(key) is None and not cache.has(key)
    cache.put_table(key, table)
    assert cache.has(key)
    pd.testing.assert_frame_equal(cache.get_table(key), table)
    (tmp_path / next(p.name for p in tmp_path.glob("*.parquet"))).write_bytes(b"not parquet")
    assert cache.get_table(key) is None  # a damaged entry is a miss, not an error


def test_four_threads_writing_one_cache_at_once_raise_nothing_and_leave_no_parts(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from audit.disk_cache import DiskCache

    cache = DiskCache(tmp_path, max_bytes=40_000)  # small: eviction runs while the others write

    def write(i):
        cache.put(("key", i % 7), {"values": np.full(1000, i, np.float32)})
        cache.get(("key", (i + 3) % 7))
        return i

    with ThreadPoolExecutor(4) as pool:
        assert len(list(pool.map(write, range(1200)))) == 1200
    assert not list(tmp_path.glob("*.part"))
    assert sum(p.stat().st_size for p in tmp_path.iterdir()) <= 40_000


def test_a_full_cache_folder_says_so_and_leaves_no_part(tmp_path, monkeypatch):
    import errno

    from audit.disk_cache import DiskCache
    from audit.errors import StorageError

    def full(handle, **arrays):
        handle.write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "savez_compressed", full)
    with pytest.raises(StorageError, match="cannot be written .No space left on device"):
        DiskCache(tmp_path).put(("key",), {"values": np.zeros(3)})
    assert not list(tmp_path.iterdir())


def test_uploads_are_bounded_and_the_least_recently_used_go_first(tmp_path, monkeypatch):
    import os
    import time

    monkeypatch.setenv("CNN_AUDIT_DATA", str(tmp_path))
    monkeypatch.setenv("CNN_AUDIT_MAX_UPLOADS_BYTES", "250")
    first = storage.save_upload(b"a" * 100, "images", "a.png")
    second = storage.save_upload(b"b" * 100, "models")
    past = time.time() - 100
    os.utime(storage.upload_path("models", second), (past, past))  # ... and opened again just now:
    storage.upload_path("images", first)
    os.utime(storage.upload_path("images", first), (past + 50, past + 50))
    third = storage.save_upload(b"c" * 100, "images", "c.png")
    assert storage.upload_path("images", first).is_file() and storage.upload_path("images", third).is_file()
    with pytest.raises(AuditError, match="removed to make room"):
        storage.upload_path("models", second)
    assert storage.upload_name("images", third) == "c.png"


def _child(script: str, data: Path):
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    return subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "CNN_AUDIT_DATA": str(data), "PYTHONPATH": str(root)})


def test_a_full_data_folder_refuses_the_write_keeps_earlier_results_and_leaves_no_part(tmp_path):
    """A real full disk, not a mock: the child's files may not grow past 100 kB (RLIMIT_FSIZE, as a full
    filesystem would stop them); an earlier upload and cached result stay readable."""
    done = _child("""
import resource, signal
import numpy as np
from audit import storage
from audit.disk_cache import DiskCache
from audit.errors import StorageError
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing
first = storage.save_upload(b"a" * 1000, "images", "first.png")
cache = DiskCache(storage.data_dir() / "cache")
cache.put(("kept",), {"x": np.arange(10)})
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
for write in (lambda: storage.save_upload(b"b" * 400_000, "images", "big.png"),
              lambda: cache.put(("big",), {"x": np.random.default_rng(0).standard_normal(100_000)})):
    try:
        write()
        print("stored")
    except StorageError as exc:
        print("refused:", exc)
print(first)
""", tmp_path)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("refused: The upload cannot be stored in") and "too large" in lines[0].lower()
    assert lines[1].startswith("refused: The results cache") and "not kept" in lines[1]
    # the earlier upload and cache entry are intact
    first = tmp_path / "uploads" / "images" / lines[2]
    assert first.read_bytes() == b"a" * 1000
    from audit.disk_cache import DiskCache

    assert list(DiskCache(tmp_path / "cache").get(("kept",))["x"]) == list(range(10))
    assert not list(tmp_path.rglob("*.part"))


def test_a_kill_during_an_upload_write_loses_nothing_earlier_and_its_part_file_is_swept(tmp_path, monkeypatch):
    """The writer killed with SIGKILL half-way through its part file: the upload never appears half-written,
    the next server start sweeps the orphaned part, and a live writer's part is left alone."""
    import os

    done = _child("""
import os, signal
from pathlib import Path
from audit import storage
print(storage.save_upload(b"a" * 1000, "images", "first.png"), flush=True)
def killed_half_way(self, data):
    with open(self, "wb") as handle:
        handle.write(data[:len(data) // 2])
        handle.flush()
    os.kill(os.getpid(), signal.SIGKILL)
Path.write_bytes = killed_half_way
storage.save_upload(b"b" * 100_000, "images", "second.png")
""", tmp_path)
    assert done.returncode == -9
    first = tmp_path / "uploads" / "images" / done.stdout.split()[0]
    orphans = list(tmp_path.rglob("*.part"))
    assert len(orphans) == 1 and orphans[0].stat().st_size == 50_000
    live = tmp_path / "uploads" / "images" / f"someone.{os.getpid()}.part"  # a write in progress here
    live.write_bytes(b"x")
    monkeypatch.setenv("CNN_AUDIT_DATA", str(tmp_path))
    assert storage.sweep_parts() == 1
    assert list(tmp_path.rglob("*.part")) == [live] and first.read_bytes() == b"a" * 1000
    assert sorted(p.name for p in first.parent.iterdir() if p.suffix != ".name") == [first.name, live.name]
