"""A bounded on-disk cache of arrays and tables, so expensive results survive restarts and serve every viewer.

Entries are named by the SHA-256 of their key: arrays as `.npz` read with `allow_pickle=False`, tables
as Parquet (pyarrow, already a Streamlit dependency), so a cache file can never run code. When the
folder grows past its limit, the least recently used entries go first.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from audit.errors import StorageError


class DiskCache:
    def __init__(self, folder: str | Path, max_bytes: int = 512 * 2**20):
        self.folder = Path(folder)
        self.max_bytes = max_bytes

    def _path(self, key: tuple, suffix: str = ".npz") -> Path:
        return self.folder / (hashlib.sha256(repr(key).encode()).hexdigest() + suffix)

    def has(self, key: tuple) -> bool:
        return self._path(key).exists() or self._path(key, ".parquet").exists()

    def get(self, key: tuple) -> dict[str, np.ndarray] | None:
        path = self._path(key)
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {name: data[name] for name in data.files}
        except (OSError, ValueError):
            return None
        _touch(path)
        return arrays

    def put(self, key: tuple, arrays: dict[str, np.ndarray]) -> None:
        self._write(self._path(key), lambda handle: np.savez_compressed(handle, **arrays))

    def get_table(self, key: tuple) -> pd.DataFrame | None:
        path = self._path(key, ".parquet")
        try:
            table = pd.read_parquet(path)
        except (OSError, ValueError):
            return None
        _touch(path)
        return table

    def put_table(self, key: tuple, table: pd.DataFrame) -> None:
        self._write(self._path(key, ".parquet"), lambda handle: table.to_parquet(handle, index=False))

    def _write(self, path: Path, save) -> None:
        """Write to a part file, then rename it: readers never see half a file, and a failed write
        leaves nothing behind. Several threads or processes may write the same entry at once."""
        part = None
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.folder, suffix=f".{os.getpid()}.part", delete=False) as handle:
                part = Path(handle.name)
                save(handle)
            os.replace(part, path)
        except OSError as exc:
            if part is not None:
                part.unlink(missing_ok=True)
            raise StorageError(f"The results cache {self.folder} cannot be written ({exc.strerror or exc}); "
                               "the result is shown but not kept.") from exc
        self.evict()

    def evict(self) -> None:
        """Drop the least recently used entries past the limit (others may be evicting at the same time)."""
        entries = []
        for path in [*self.folder.glob("*.npz"), *self.folder.glob("*.parquet")]:
            try:
                info = path.stat()
            except FileNotFoundError:
                continue
            entries.append((info.st_mtime, info.st_size, path))
        entries.sort()
        total = sum(size for _, size, _ in entries)
        for _, size, path in entries:
            if total <= self.max_bytes:
                break
            path.unlink(missing_ok=True)
            total -= size


def _touch(path: Path) -> None:
    """Mark an entry as recently used (it may have been evicted meanwhile)."""
    try:
        os.utime(path)
    except FileNotFoundError:
        pass
