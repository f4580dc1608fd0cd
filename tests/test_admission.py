"""One memory budget for the server (audit.admission): first come, first served, places said, quick views
refused when busy, a job's own calls covered by its reservation, and predictions cut to fit."""

import threading
import time

import keras
import numpy as np

from audit import admission, cost
from audit.errors import ServerBusyError


def test_reservations_wait_in_line_in_the_order_they_asked_and_say_their_place():
    budget = admission.Budget(100)
    order, places = [], {}
    first = budget.reserve(80)
    first.__enter__()

    def ask(name, nbytes):
        def waiting(place):
            places.setdefault(name, set()).add(place)
        with budget.reserve(nbytes, waiting=waiting):
            order.append(name)
            time.sleep(0.05)

    big = threading.Thread(target=ask, args=("big", 60))
    big.start()
    time.sleep(0.3)
    small = threading.Thread(target=ask, args=("small", 10))  # would fit now, but asked after the big one
    small.start()
    time.sleep(0.8)
    assert order == [] and budget.taken == 80
    first.__exit__(None, None, None)
    big.join(5)
    small.join(5)
    assert order == ["big", "small"]
    assert places["big"] == {0} and 1 in places["small"]
    assert budget.taken == 0


def _in_another_session(work):
    """Run `work` in its own thread (a session's), returning what it raised."""
    raised = []

    def run():
        try:
            work()
        except BaseException as exc:  # noqa: BLE001 (handed back to the test)
            raised.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(10)
    return raised[0] if raised else None


def test_a_quick_view_that_cannot_be_served_says_the_server_is_busy_and_leaves_the_line():
    budget = admission.Budget(100)

    def quick_view():
        with budget.reserve(1, timeout=0.6):
            pass

    with budget.reserve(100):
        refused = _in_another_session(quick_view)
    assert isinstance(refused, ServerBusyError) and "CNN_AUDIT_MAX_SERVER_BYTES" in str(refused)
    assert _in_another_session(quick_view) is None  # the refused one left the line


def test_giving_up_while_waiting_leaves_the_line_and_a_jobs_own_calls_do_not_reserve_again():
    budget = admission.Budget(100)

    def cancelled_job():
        def cancel(place):
            raise KeyboardInterrupt("Cancel")
        with budget.reserve(50, waiting=cancel):
            pass

    with budget.reserve(90):
        assert isinstance(_in_another_session(cancelled_job), KeyboardInterrupt)
        with budget.reserve(50, timeout=0.1):  # the job's own call: covered by its 90
            assert budget.taken == 90
    assert budget.taken == 0
    with budget.reserve(500):  # more than the whole budget takes the whole budget, not forever
        assert budget.taken == 100


def test_the_budget_is_at_most_a_share_of_the_memory_the_process_may_use(monkeypatch):
    monkeypatch.setenv("CNN_AUDIT_MAX_SERVER_BYTES", str(10**15))
    assert admission.server_bytes() == int(0.4 * admission.usable_memory())
    monkeypatch.setenv("CNN_AUDIT_MAX_SERVER_BYTES", str(2**30))
    assert admission.server_bytes() == 2**30


def test_predict_runs_in_batches_within_the_activation_budget_and_reserves_each(monkeypatch, tmp_path):
    """A 64 x 64 input, Conv2D(8, 1): 128 KB of conv output per image (by hand: 64*64*8*4). With a 300 KB batch
    budget, 7 images go in batches that each hold under it, and the probabilities equal one eager pass."""
    from audit import models

    keras.utils.set_random_seed(0)
    inputs = keras.Input((64, 64, 3))
    x = keras.layers.Conv2D(8, 1, activation="relu", name="wide")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(x)).save(tmp_path / "m.keras")
    loaded = models.load(f"file:{tmp_path / 'm.keras'}")
    images = np.random.default_rng(0).random((7, 64, 64, 3), np.float32)
    expected = np.asarray(loaded.model(images))
    reserved = []
    budget = admission.Budget(10**9)
    original = budget.reserve

    def recording(nbytes, **kwargs):
        reserved.append(nbytes)
        return original(nbytes, **kwargs)

    budget.reserve = recording
    monkeypatch.setattr(admission, "SERVER", budget)
    monkeypatch.setenv("CNN_AUDIT_MAX_BATCH_BYTES", str(300_000))
    per_image = cost.cost(loaded.model).peak_bytes
    assert per_image >= 64 * 64 * 8 * 4
    np.testing.assert_allclose(loaded.predict(images), expected, rtol=1e-5, atol=1e-7)
    step = 300_000 // per_image
    assert len(reserved) == -(-7 // step) and step >= 1
    assert reserved[0] == step * (per_image + 64 * 64 * 3 * 4)
