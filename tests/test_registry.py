"""The server's loaded models: bounded by count and bytes, and a dropped model gives its memory back."""

import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import keras
import numpy as np
import pytest

from audit import models, registry
from audit.errors import ModelFileError
from tests.fixtures import tiny_cnn

ROOT = Path(__file__).resolve().parent.parent


def _loader(calls: list, delay: float = 0.0):
    def load(source: str) -> models.LoadedModel:
        calls.append(source)
        time.sleep(delay)
        return models.LoadedModel(tiny_cnn(seed=len(calls)), source, source, None, (16, 16), "unit", source)
    return load


def test_weight_bytes_counts_every_weight_by_its_dtype():
    model = tiny_cnn()  # conv1 3*3*3*4+4, conv2 3*3*4*8+8, dense 72*3+3 (16 -> pool 8 -> valid stride 2: 3x3x8)
    assert registry.weight_bytes(model) == 4 * (112 + 296 + 219) == 4 * model.count_params()


def test_the_least_recently_used_model_goes_first_past_the_count_bound():
    calls = []
    cache = registry.ModelCache(max_models=2, max_bytes=2**40, load=_loader(calls))
    a = cache.get("a")
    cache.get("b")
    assert cache.get("a") is a  # used again: now b is the oldest
    cache.get("c")
    assert cache.sources() == ["a", "c"] and calls == ["a", "b", "c"]
    cache.get("b")  # loaded again after being dropped
    assert calls == ["a", "b", "c", "b"] and cache.sources() == ["c", "b"]


def test_the_byte_bound_drops_models_but_always_keeps_the_newest():
    size = registry.weight_bytes(tiny_cnn())
    cache = registry.ModelCache(max_models=10, max_bytes=2 * size, load=_loader([]))
    for source in "abc":
        cache.get(source)
    assert cache.sources() == ["b", "c"] and cache.bytes == 2 * size
    alone = registry.ModelCache(max_models=10, max_bytes=size // 2, load=_loader([]))
    alone.get("a")
    alone.get("b")
    assert alone.sources() == ["b"]  # over the bound alone, but the one being used stays


def test_sessions_asking_for_the_same_model_at_once_load_it_once():
    calls = []
    cache = registry.ModelCache(max_models=4, max_bytes=2**40, load=_loader(calls, delay=0.5))
    found = []
    threads = [threading.Thread(target=lambda: found.append(cache.get("same"))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert calls == ["same"] and len(found) == 4 and all(model is found[0] for model in found)


def test_a_failed_load_is_not_kept_and_can_be_tried_again():
    def broken(source):
        raise ModelFileError("corrupt")

    cache = registry.ModelCache(max_models=2, max_bytes=2**40, load=broken)
    with pytest.raises(ModelFileError):
        cache.get("x")
    assert cache.sources() == [] and "x" not in cache


_CHILD = """
import sys
sys.path.insert(0, {root!r})
from audit import registry

def rss():
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmRSS"))

cache = registry.ModelCache(max_models={bound}, max_bytes=2**40)
for path in {paths!r}:
    cache.get("file:" + path)
    print(rss())
"""


def _rss_after_each_load(paths: list[str], bound: int) -> list[int]:
    script = _CHILD.format(root=str(ROOT), bound=bound, paths=paths)
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return [int(line) for line in done.stdout.split()]


@pytest.mark.slow  # about a minute: twelve 25 MB models opened in turn, twice
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the memory of a process from /proc")
def test_dropped_models_give_their_memory_back(tmp_path):
    """Twelve different models of 25 MB of weights opened in turn: with a bound of two the process stays
    flat once the bound is reached; kept, each adds about its size. Judged by the slope over the loads
    after the fourth (the allocator moves single readings by a model's size either way)."""
    paths = []
    for seed in range(12):
        keras.utils.set_random_seed(seed)
        model = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Conv2D(8, 3, activation="relu"),
                                  keras.layers.Flatten(), keras.layers.Dense(800),
                                  keras.layers.Dense(10, activation="softmax")])
        paths.append(str(tmp_path / f"model{seed}.keras"))
        model.save(paths[-1])
    size = registry.weight_bytes(model)
    assert 20 * 2**20 < size < 30 * 2**20
    bounded = _rss_after_each_load(paths, bound=2)
    kept = _rss_after_each_load(paths, bound=100)
    def slope(readings):  # bytes per load, least squares over the loads after the fourth
        return np.polyfit(np.arange(len(readings) - 3), np.array(readings[3:], float), 1)[0]

    assert slope(kept) > size / 2, np.array(kept) / 2**20  # the measurement sees models that stay
    # flat once two are kept: a model kept per load would be a slope of `size`; the allocator's arenas still
    # step by about a model's size every few loads (CI read 0.13 of a size per load, a quiet machine 0.06)
    assert slope(bounded) < size / 4, np.array(bounded) / 2**20
