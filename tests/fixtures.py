"""Tiny models shared by the tests: small enough to build in milliseconds, with known answers."""

import keras
import numpy as np


def tiny_cnn(input_shape=(16, 16, 3), classes=3, seed=0) -> keras.Model:
    """A Functional conv-pool-dense classifier with seeded weights."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input(input_shape, name="image")
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="conv1")(inputs)
    x = keras.layers.MaxPooling2D(name="pool1")(x)
    x = keras.layers.Conv2D(8, 3, strides=2, padding="valid", activation="relu", name="conv2")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    outputs = keras.layers.Dense(classes, activation="softmax", name="predictions")(x)
    return keras.Model(inputs, outputs, name="tiny_cnn")


def nested_cnn(seed=0) -> keras.Model:
    """A Sequential that wraps a Functional base, as users wrap keras.applications bases."""
    base = tiny_cnn(seed=seed)
    base = keras.Model(base.inputs[0], base.get_layer("conv2").output, name="base")
    return keras.Sequential(
        [keras.Input((16, 16, 3)), base, keras.layers.GlobalAveragePooling2D(name="gap"),
         keras.layers.Dense(2, name="head")],
        name="wrapped",
    )


def random_images(n=2, shape=(16, 16, 3), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, size=(n, *shape)).astype(np.float32)


DASHBOARD = str(__import__("pathlib").Path(__file__).resolve().parent.parent / "dashboard.py")


def open_page(page: str, query: dict, timeout: int = 180):
    """An AppTest of the dashboard opened with a link's query, switched to `page`, without an exception."""
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(DASHBOARD, default_timeout=timeout)
    for key, value in query.items():
        at.query_params[key] = value
    at.run()
    if page != "pages/model.py":
        at.switch_page(page).run()
    assert not at.exception, at.exception
    return at


LOAD_IN_A_CHILD = """
import json, resource, sys, time
from audit import models
from audit.errors import AuditError
results = {}
for label, path in json.loads(sys.argv[1]).items():
    start = time.perf_counter()
    try:
        models.load("file:" + path)
        results[label] = ["loaded", "", time.perf_counter() - start]
    except AuditError as exc:
        results[label] = [type(exc).__name__, str(exc), time.perf_counter() - start]
    except BaseException as exc:
        results[label] = ["crashed " + type(exc).__name__, str(exc)[:300], time.perf_counter() - start]
# VmHWM: this process's own peak (ru_maxrss would carry the forking parent's over the exec); the trial
# children's peak from RUSAGE_CHILDREN
own = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM")) * 1024
trials = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
print(json.dumps({"results": results, "peak": own, "trial_peak": trials}))
"""
"""A child process that opens each file of a {label: path} JSON through models.load, as a server would, and
prints each outcome, its time, and the peaks of its own memory and of its trial children."""
