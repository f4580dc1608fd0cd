"""A bounded on-disk cache of arrays, so expensive results survive restarts and serve every viewer.

Entries are `.npz` files named by the SHA-256 of their key and read with `allow_pickle=False`, so a
cache file can never run code. When the folder grows past its limit, the least recently used
entries go first.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np


class DiskCache:
    def __init__(self, folder: str | Path, max_bytes: int = 512 * 2**20):
        self.folder = Path(folder)
        self.max_bytes = max_bytes

    def _path(self, key: tuple) -> Path:
        return self.folder / (hashlib.sha256(repr(key).encode()).hexdigest() + ".npz")

    def get(self, key: tuple) -> dict[str, np.ndarray] | None:
        path = self._path(key)
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {name: data[name] for name in data.files}
        except (OSError, ValueError):
            return None
        os.utime(path)  # mark as recently used
        return arrays

    def put(self, key: tuple, arrays: dict[str, np.ndarray]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=self.folder, suffix=".part", delete=False) as handle:
            np.savez_compressed(handle, **arrays)
        os.replace(handle.name, self._path(key))  # atomic: readers never see half a file
        self.evict()

    def evict(self) -> None:
        entries = sorted(self.folder.glob("*.npz"), key=lambda p: p.stat().st_mtime)
        total = sum(p.stat().st_size for p in entries)
        while entries and total > self.max_bytes:
            oldest = entries.pop(0)
            total -= oldest.stat().st_size
            oldest.unlink(missing_ok=True)
