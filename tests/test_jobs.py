"""Links cannot start hours of work: a costly job named by a link waits for a click, with its estimate."""

import time
from pathlib import Path

from streamlit.testing.v1 import AppTest

DASHBOARD = str(Path(__file__).resolve().parent.parent / "dashboard.py")


def _open(page: str, **query) -> tuple[AppTest, float]:
    at = AppTest.from_file(DASHBOARD, default_timeout=120)
    for key, value in query.items():
        at.query_params[key] = value
    at.run()
    start = time.perf_counter()
    at.switch_page(page).run()
    return at, time.perf_counter() - start


def _has_statistics(at: AppTest) -> bool:
    return any(expander.label == "Dead filters per layer" for expander in at.expander)


def test_a_link_to_hours_of_occlusion_waits_for_a_click(monkeypatch):
    monkeypatch.setenv("CNN_AUDIT_LINK_JOB_SECONDS", "8")  # under the curves' 252 passes of VGG16 here (about 16 s)
    at, seconds = _open("pages/attribution.py", model="demo:vgg16", image="chelsea",
                        methods=["Saliency", "Occlusion"], patch="2", stride="1")
    assert not at.exception, at.exception
    assert seconds < 300  # not the hours the job would take (a loaded CI machine can take a minute to draw it)
    button = next(b for b in at.button if b.label.startswith("Compute Occlusion"))
    assert " min here)" in button.label or " h here)" in button.label  # 49,729 passes of VGG16
    assert [b.label for b in at.get("download_button")] == ["PNG"]  # the cheap map is drawn, occlusion is not
    # its deletion and insertion curves (210 + 42 passes of VGG16) wait for their own click
    assert any(b.label.startswith("Measure deletion and insertion (about ") for b in at.button)


def test_a_link_to_a_huge_gallery_waits_for_a_click_and_says_what_it_would_cost():
    at, seconds = _open("pages/filters.py", model="demo:vgg16", layer="block5_conv3", n="512", size="224",
                        steps="200", octaves="4", gallery="1")
    assert not at.exception, at.exception
    assert seconds < 300  # not the hours the job would take (a loaded CI machine can take a minute to draw it)
    assert not any("filters, " in header.value for header in at.subheader)  # no gallery was grown
    notes = [caption.value for caption in at.caption]
    assert any(note.startswith("The link shows this result, which this server has not computed yet. Estimated "
                               "cost here: about") and " h (" in note for note in notes), notes
    assert "gallery" not in at.query_params  # the link handed on no longer asks for it


def test_a_link_to_statistics_over_2048_images_of_vgg16_waits_for_a_click():
    at, seconds = _open("pages/activations.py", model="demo:vgg16", images="shapes", count="2048", stats="1")
    assert not at.exception, at.exception
    assert seconds < 300  # not the hours the job would take (a loaded CI machine can take a minute to draw it)
    assert not _has_statistics(at)
    assert any("has not computed yet" in caption.value for caption in at.caption)


def test_a_cheap_result_named_by_a_link_is_still_computed():
    at, _ = _open("pages/activations.py", model="demo:shapes", count="12", stats="1")
    assert not at.exception, at.exception
    assert len(at.get("plotly_chart")) >= 1  # the dead-filter chart


def test_quick_views_of_a_model_open_while_another_users_job_holds_it():
    """A long job of another session holds demo:shapes; its Model page (predictions, layer table) and a
    layer's maps still open, and a job of this session waits for its turn, then runs."""
    import threading

    from pages import selection

    at, _ = _open("pages/model.py", model="demo:shapes")  # loads the model into the server-wide cache
    loaded = selection.get_model("demo:shapes")  # the very object every session shares
    assert loaded.job_lock.acquire(timeout=30)
    try:
        at, seconds = _open("pages/model.py", model="demo:shapes", image="chelsea", count="7")  # a new set
        assert not at.exception, at.exception
        assert any("job running on this model now ends" in caption.value for caption in at.caption)
        assert "block1_conv1" in set(at.dataframe[0].value["name"])  # the layer table
        assert any("probability" in frame.value.columns for frame in at.dataframe)  # the predictions
        at, _ = _open("pages/activations.py", model="demo:shapes", image="chelsea")
        assert not at.exception, at.exception
        assert at.get("imgs") or at.get("image")  # the montage of the layer's maps
    finally:
        threading.Timer(3.0, loaded.job_lock.release).start()  # the other job ends in 3 s
    start = time.perf_counter()  # the Model page's accuracy on these 9 shapes is a job too: it waits as well
    at, _ = _open("pages/activations.py", model="demo:shapes", count="9", stats="1")  # not computed yet
    assert not at.exception, at.exception
    assert time.perf_counter() - start > 2.5 and not loaded.job_lock.locked()
    assert _has_statistics(at)


def test_two_sessions_asking_for_the_same_statistics_at_once_run_one_pass(monkeypatch):
    """The second request follows the first's pass and takes its result: one pass, not two (issue #29)."""
    import threading

    from audit import activations

    passes = []
    original = activations.filter_sums

    def counted(*args, **kwargs):
        passes.append(threading.get_ident())
        time.sleep(1.5)  # long enough for the second session to arrive while it runs
        return original(*args, **kwargs)

    monkeypatch.setattr(activations, "filter_sums", counted)
    _open("pages/model.py", model="demo:shapes")  # loaded once for both sessions
    opened = {}

    def session(name: str, delay: float) -> None:
        time.sleep(delay)
        opened[name] = _open("pages/activations.py", model="demo:shapes", count="11", stats="1")[0]

    threads = [threading.Thread(target=session, args=(name, delay)) for name, delay in (("a", 0), ("b", 0.3))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert sorted(opened) == ["a", "b"]
    for at in opened.values():
        assert not at.exception, at.exception
        assert _has_statistics(at)
    assert len(passes) == 1
    tables = [next(frame.value for frame in at.dataframe if "apoz" in frame.value.columns) for at in opened.values()]
    assert tables[0].equals(tables[1])


def test_estimates_learn_from_finished_jobs_and_grow_while_the_server_is_busy(monkeypatch):
    """A job that took 27% longer than its estimate makes the next estimate 27% longer; a busy server (the
    probe 2x slower) doubles it and says why. Ratios are kept idle: a job on a busy server is divided back."""
    from types import SimpleNamespace

    import numpy as np
    import pytest

    from pages import estimates as jobs

    selection = SimpleNamespace(model=SimpleNamespace(fingerprint="calibrated"), device="cpu", precision="float32")
    jobs._pass_times()[("calibrated", "cpu")] = (0.01, 0.0)  # seconds per image, fixed seconds per call
    monkeypatch.setattr(jobs, "busy_factor", lambda: 1.0)
    assert jobs.pass_seconds(selection) == 0.01
    jobs._calibration()[0][("calibrated", "cpu", "float32", "stats")] = 100  # what job_shown counted
    jobs.learn(selection, "stats", 1.27, busy=1.0)
    assert jobs.pass_seconds(selection) == pytest.approx(0.0127)
    jobs.learn(selection, "stats", 3.0, busy=2.0)  # 1.5 s idle
    assert jobs.pass_seconds(selection) == pytest.approx(0.01 * np.median([1.27, 1.5]))
    jobs.learn(selection, "gallery", 50.0, busy=1.0)  # no estimate was shown for it: nothing learnt
    assert jobs.pass_seconds(selection) == pytest.approx(0.01 * np.median([1.27, 1.5]))
    assert jobs.estimate(selection, 100) == "about 1 s" and jobs.busy_note() == ""
    monkeypatch.setattr(jobs, "busy_factor", lambda: 2.5)
    assert jobs.estimate(selection, 100) == "about 3 s"
    assert jobs.busy_note() == " The server is busy: work runs about 2.5x slower than on an idle one now."
    # preparing 1,000 images at 10 ms each adds 10 s (25 s on the busy server) beside the passes
    monkeypatch.setattr(jobs, "preparation_seconds", lambda selection: 0.01)
    assert jobs.estimate(selection, 100, images=1000) == "about 28 s"
    monkeypatch.setenv("CNN_AUDIT_LINK_JOB_SECONDS", "10")
    assert jobs.within_link_budget(selection, 100) and not jobs.within_link_budget(selection, 100, images=1000)


def test_a_sweep_counts_each_cut_from_its_checkpoint_and_its_default_sample_fits_the_link_budget(monkeypatch):
    """A model of 10 calls of equal cost, 10 ms an image, a 0.5 s trace: a layer whose cuts start at call 8 runs
    a fifth of a pass per cut. Ten such cuts on 3 images: the unpruned pass (3), the work up to the checkpoint once
    (0.8 x 3) and 10 x 0.2 x 3, plus one whole trace (its segments partition the graph) worth 0.5 / 0.01 = 50
    passes: 61.4. From the stem's conv every cut is a whole pass: 3 + 30 + 50 = 83. The default
    sample under a 20 s link budget: (20 - 0.5 - 2 x 0.5) / ((1 + 0.8 + 2) x 0.01) = 486 images."""
    from types import SimpleNamespace

    import numpy as np
    import pytest

    from audit import pruning
    from pages import estimates as jobs

    selection = SimpleNamespace(model=SimpleNamespace(fingerprint="ten calls", trace_seconds=0.5), device="cpu",
                                precision="float32", output=None)
    jobs._pass_times()[("ten calls", "cpu")] = (0.01, 0.05)
    after = np.linspace(1.0, 0.0, 11)
    jobs._sweep_costs()[("ten calls", None)] = pruning.SweepCost({"deep": 8, "stem": 0}, after, 10)
    monkeypatch.setenv("CNN_AUDIT_LINK_JOB_SECONDS", "20")
    assert jobs.sweep_passes(selection, ["deep"] * 10, 3) == pytest.approx(61.4)
    assert jobs.sweep_passes(selection, ["stem"] * 10, 3) == pytest.approx(83.0)
    assert jobs.images_within(selection, ["deep"] * 10, 1000) == 486
    assert jobs.images_within(selection, ["deep"] * 10, 50) == 50
    assert jobs.images_within(selection, ["stem"] * 10_000, 50) == 2  # the floor: a sweep too big for the budget


def test_a_bar_gives_the_time_left_from_its_rate_once_it_has_one():
    from pages import jobs

    assert jobs.time_left(10.0, 5, 5) == ", about 10 s left"  # 2 s a step, 5 steps to go
    assert jobs.time_left(30.0, 10, 190) == ", about 10 min left"  # 3 s a step, 190 steps: 570 s
    assert jobs.time_left(0.5, 5, 5) == ""  # under a second of work: no rate yet
    assert jobs.time_left(10.0, 0, 5) == "" and jobs.time_left(10.0, 5, 0) == ""


def test_pages_start_no_whole_set_work_by_themselves_over_the_link_budget(monkeypatch):
    """With no work within the link budget (0 s), the Model page's accuracy, the Pruning page's scores and the
    Filters page's ranking wait for their buttons, each saying its estimate; pressed, they run and show."""
    monkeypatch.setenv("CNN_AUDIT_LINK_JOB_SECONDS", "0")
    query = dict(model="demo:shapes", images="shapes", count="24", seed="91")  # a set no other test computes
    at, _ = _open("pages/model.py", **query)
    assert not at.exception, at.exception
    assert not any(metric.label == "Accuracy on the images" for metric in at.metric)
    accuracy = at.button(key="accuracy_go")
    assert accuracy.label.startswith("Measure the accuracy on 24 images (about ")
    accuracy.click().run()
    assert not at.exception, at.exception
    assert any(metric.label == "Accuracy on the images" for metric in at.metric)

    at, _ = _open("pages/pruning.py", **query)
    assert not at.exception, at.exception
    assert at.button(key="prune_scores").label.startswith("Score every filter on 24 images (about ")
    assert not any(header.value.startswith("What if") for header in at.subheader)
    at.button(key="prune_scores").click().run()
    assert not at.exception, at.exception
    assert at.button(key="prune_what_if").label.startswith("Run both models on the 24 images")
    assert not any(metric.label == "Top-1 agreement" for metric in at.metric)

    at, _ = _open("pages/filters.py", **query, pick="top")
    assert not at.exception, at.exception
    assert at.button(key="filters_rank").label.startswith("Rank the filters on 24 images")


def test_the_first_trace_is_timed_at_load_and_counted_twice_in_estimates(monkeypatch):
    """The load's warm-up call traces the forward pass the jobs use; what it took beyond a second call is the
    model's trace time, and a job's estimate counts it twice (its function holds a backward graph too). Timing the
    pass later could no longer see it: the warm-up had traced it already."""
    from types import SimpleNamespace

    from audit import models
    from pages import estimates

    loaded = models.load("demo:shapes-gap")
    assert 0.0 < loaded.trace_seconds < 60.0
    selection = SimpleNamespace(model=loaded, device="cpu", precision="float32", output=None)
    assert estimates.trace_seconds(selection) == 2 * loaded.trace_seconds
    monkeypatch.setattr(estimates, "busy_factor", lambda: 1.0)
    monkeypatch.setattr(loaded, "trace_seconds", 60.0)
    assert estimates.estimate(selection, 0) == "about 2 min"  # 120 s of tracing, no passes
