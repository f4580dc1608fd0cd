"""Streamed image sets and sharded runs (#19): shards merged, here or on Ray, equal one in-memory pass;
an interrupted run resumes to the same figures; a folder, a zip, a list and a tf.data set read alike."""

import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from audit import activations, cli, datasets, filters, images, models, pruning, runs, sampling
from audit.zoo import shapes

STATS = ["mean", "std", "max", "apoz", "fires"]
SCORES = ["l1", "apoz", "mean", "taylor", "fpgm", "redundancy"]


@pytest.fixture(scope="module")
def loaded():
    return models.load("demo:shapes")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("validation")
    shapes.write_folder(shapes.generate(30, 11), path)
    return path


@pytest.fixture(scope="module")
def reference(loaded, folder):
    """One in-memory pass over the same files (the path every other test of the statistics checks)."""
    image_set = datasets.from_folder(folder)
    x = loaded.preprocess([images.read(folder / name) for name in image_set.names])
    labels = np.array([loaded.class_names.index(label) for label in image_set.labels])
    layers = models.conv_layers(loaded.model)
    return activations.filter_stats(loaded.model, layers, x), pruning.filter_scores(loaded.model, x, labels)


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("CNN_AUDIT_DATA", str(tmp_path / "data"))
    return tmp_path / "data"


def assert_same(table, expected, columns, rtol):
    assert list(table.layer) == list(expected.layer) and list(table["filter"]) == list(expected["filter"])
    np.testing.assert_allclose(table[columns].to_numpy(float), expected[columns].to_numpy(float), rtol=rtol, atol=1e-7)
    assert (table.dead.to_numpy() == expected.dead.to_numpy()).all()


def test_four_shards_merged_equal_one_pass(loaded, folder, reference, data_dir):
    image_set = datasets.from_folder(folder)
    stats = runs.run(loaded, runs.Job(loaded.source), image_set, shards=4)
    scores = runs.run(loaded, runs.Job(loaded.source, "scores"), image_set, shards=4)
    assert stats.images == scores.images == 30 and stats.computed == [0, 1, 2, 3]
    assert_same(stats.table, reference[0], STATS, 1e-5)
    assert_same(scores.table, reference[1], SCORES, 1e-3)  # Taylor: float32 batch sums, batches cut elsewhere
    assert reference[1].taylor.gt(0).any()  # the labels reached the scores: the head's gradient flowed
    assert_same(runs.read_result(stats.folder), reference[0], STATS, 1e-5)  # what the dashboard reads


@pytest.mark.slow  # 15-25 s here: the default tier stays near 15 minutes
def test_shards_on_an_embedded_ray_equal_one_pass(loaded, folder, reference, data_dir):
    ray = pytest.importorskip("ray")
    image_set = datasets.from_folder(folder)
    try:
        result = runs.run(loaded, runs.Job(loaded.source, "scores"), image_set, shards=4, address="local")
        found = runs.run(loaded, runs.Job(loaded.source, "examples", ("block2_conv2",), k=3), image_set, shards=4,
                         address="local")
    finally:
        ray.shutdown()
    assert result.computed == [0, 1, 2, 3] and sorted(p.name for p in result.folder.glob("shard-*.npz")) == [
        f"shard-0000{k}.npz" for k in range(4)]
    assert_same(result.table, reference[1], SCORES, 1e-3)
    x = loaded.preprocess([images.read(folder / name) for name in image_set.names])
    expected = filters.top_examples(loaded.model, "block2_conv2", x, k=3)  # one pass in memory
    assert list(found.table["image"]) == list(expected["image"]) and found.computed == [0, 1, 2, 3]
    np.testing.assert_allclose(found.table["activation"], expected["activation"], rtol=1e-5)


def test_dataset_examples_in_shards_name_the_right_files_past_an_unreadable_one(loaded, folder, data_dir, tmp_path):
    copied = tmp_path / "set"
    shutil.copytree(folder, copied)
    first_class = sorted(p for p in copied.iterdir() if p.is_dir())[0]
    (first_class / "0000_broken.png").write_bytes(b"not an image")  # early in the order: later indices would shift
    image_set = datasets.from_folder(copied)
    readable = [name for name in image_set.names if "broken" not in name]
    x = loaded.preprocess([images.read(copied / name) for name in readable])
    expected = filters.top_examples(loaded.model, "block2_conv2", x, k=3)
    result = runs.run(loaded, runs.Job(loaded.source, "examples", ("block2_conv2",), k=3), image_set, shards=3)
    assert result.skipped == 1 and result.images == len(readable)
    assert list(result.table["file"]) == [readable[i] for i in expected["image"]]
    assert list(result.table[["filter", "rank", "row", "col"]].itertuples(index=False)) == list(
        expected[["filter", "rank", "row", "col"]].itertuples(index=False))
    np.testing.assert_allclose(result.table["activation"], expected["activation"], rtol=1e-5)
    assert list(runs.read_result(result.folder)["file"]) == list(result.table["file"])


def test_an_interrupted_run_resumes_from_its_shards(loaded, folder, reference, data_dir):
    image_set = datasets.from_folder(folder)
    first_shard = len(image_set.shard(0, 4))

    def interrupt(done, total):
        if done > first_shard:  # inside the second shard
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        runs.run(loaded, runs.Job(loaded.source), image_set, shards=4, progress=interrupt)
    folder_of = runs.folder_of(runs.Job(loaded.source, layers=tuple(models.conv_layers(loaded.model)),
                                        precision="float32"),  # as the run resolved it (tests/conftest.py)
                               loaded.fingerprint, image_set, 4)
    written = sorted(p.name for p in folder_of.iterdir() if p.name != runs.LOCK)
    assert written == ["job.json", "shard-00000.npz"]  # no half shard, no result
    kept = (folder_of / "shard-00000.npz").stat().st_mtime_ns
    seen = []
    resumed = runs.run(loaded, runs.Job(loaded.source), image_set, shards=4, progress=lambda d, t: seen.append(d))
    assert resumed.computed == [1, 2, 3] and seen[0] == first_shard
    assert (folder_of / "shard-00000.npz").stat().st_mtime_ns == kept
    assert_same(resumed.table, reference[0], STATS, 1e-5)


def test_a_zip_a_list_and_a_tfrecord_dataset_read_like_the_folder(loaded, folder, tmp_path):
    image_set = datasets.from_folder(folder)
    layers = models.conv_layers(loaded.model)[:2]
    model_in = datasets.model_input(loaded)

    def stats(source, count):
        return activations.filter_stats(loaded.model, layers, datasets.batches(source, model_in), total=count)

    expected = stats(image_set, len(image_set))
    archive = tmp_path / "set.zip"
    with zipfile.ZipFile(archive, "w") as out:
        for name in image_set.names:
            out.write(folder / name, name)
        out.writestr("circle/broken.png", b"not a png")  # skipped and counted, not fatal
    zipped = datasets.open_set(archive)
    assert len(zipped) == 31
    assert_same(stats(zipped, 31), expected, STATS, 1e-6)
    assert len(zipped.skipped) == 1 and "broken.png" in zipped.skipped[0]
    listing = tmp_path / "files.txt"
    listing.write_text("\n".join(str(folder / name) for name in image_set.names))
    assert_same(stats(datasets.open_set(listing), 30), expected, STATS, 1e-6)
    records = str(tmp_path / "set.tfrecord")
    with tf.io.TFRecordWriter(records) as writer:
        for name in image_set.names:
            feature = {"image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[(folder / name).read_bytes()]))}
            writer.write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())
    parsed = tf.data.TFRecordDataset(records).map(
        lambda record: tf.io.parse_single_example(record, {"image": tf.io.FixedLenFeature([], tf.string)})["image"])
    assert_same(stats(parsed, None), expected, STATS, 1e-6)


def test_samples_are_seeded_and_grow_by_adding_images(folder):
    image_set = datasets.from_folder(folder)
    small, large = image_set.sample(10, 3), image_set.sample(20, 3)
    assert small == image_set.sample(10, 3) and set(small.names) < set(large.names)
    assert list(small.names) == sorted(small.names)  # kept in the set's order
    assert small != image_set.sample(10, 4)
    shards = [image_set.shard(k, 4) for k in range(4)]
    assert sum((list(s.names) for s in shards), []) == list(image_set.names)
    assert sorted(len(s) for s in shards) == [7, 7, 8, 8]  # as even as whole images allow


def test_two_replicas_give_the_one_device_figures(folder):
    """MirroredStrategy over two logical CPUs (the multi-GPU path, on this machine): same statistics and
    Taylor scores."""
    script = textwrap.dedent(f"""
        import numpy as np, tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        from audit import activations, datasets, models
        loaded = models.load("demo:shapes")
        image_set = datasets.from_folder({str(folder)!r})
        layers = models.conv_layers(loaded.model)
        def stats(strategy):
            batches = datasets.batches(image_set, datasets.model_input(loaded), 7)
            sums = activations.filter_sums(loaded.model, layers, batches, strategy=strategy)
            return activations.stats_frame(sums)
        one = stats(None)
        two = stats(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))
        columns = ["mean", "std", "max", "apoz", "fires"]
        np.testing.assert_allclose(two[columns].to_numpy(float), one[columns].to_numpy(float), rtol=1e-5, atol=1e-7)
        assert (two.dead == one.dead).all() and two["fires"].gt(0).any()
        from audit import pruning
        def taylor(strategy):
            batches = datasets.batches(image_set, datasets.model_input(loaded, labels=image_set.labels), 7)
            return pruning.taylor_of(pruning.score_sums(loaded.model, batches, strategy=strategy)[1])
        one, two = taylor(None), taylor(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))
        for layer in one:
            np.testing.assert_allclose(two[layer], one[layer], rtol=1e-3, atol=1e-9)
        print("same")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).parent.parent, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert done.stdout.strip().endswith("same"), done.stderr[-2000:]


def test_the_command_line_streams_a_folder_and_reads_shards_back(loaded, folder, reference, data_dir, tmp_path,
                                                                capsys):
    out = tmp_path / "stats.csv"
    assert cli.main(["stats", "--images", str(folder), "--shards", "3", "--csv", str(out), "--quiet"]) == 0
    assert "0 of 3 shards read back" in capsys.readouterr().err
    assert_same(pd.read_csv(out), reference[0], STATS, 1e-5)
    assert cli.main(["scores", "--images", str(folder), "--shards", "3", "--quiet"]) == 0
    assert cli.main(["scores", "--images", str(folder), "--shards", "3", "--quiet"]) == 0
    assert "3 of 3 shards read back" in capsys.readouterr().err
    assert cli.main(["scores", "--images", "shapes:10", "--quiet"]) == 1  # only sets on disk stream
    capsys.readouterr()
    examples = tmp_path / "examples.csv"
    assert cli.main(["examples", "--images", str(folder), "--layer", "block3_conv1", "--filters", "2", "5", "--k", "2",
                     "--shards", "2", "--csv", str(examples), "--quiet"]) == 0
    table = pd.read_csv(examples)
    assert list(table["filter"]) == [2, 2, 5, 5] and set(table["file"]) <= set(datasets.from_folder(folder).names)
    assert (table.groupby("filter")["activation"].apply(lambda a: a.is_monotonic_decreasing)).all()
    capsys.readouterr()
    pruned = tmp_path / "pruned.keras"
    assert cli.main(["prune", "--images", str(folder), "--shards", "3", "--share", "0.25", "--out", str(pruned),
                     "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "pruned against the model on the whole set: agreement" in out and "accuracy" in out
    assert models.load(f"file:{pruned}").model.count_params() < loaded.model.count_params()


def test_a_growing_sample_adds_images_and_ends_at_one_pass_over_them(loaded, folder, reference):
    image_set = datasets.from_folder(folder)
    layers = models.conv_layers(loaded.model)
    steps = list(sampling.growing(loaded.model, layers, image_set, datasets.model_input(loaded), 4, 30, seed=0))
    assert [count for count, _ in steps] == sampling.sizes(4, 30) == [4, 8, 16, 30]
    assert_same(steps[-1][1], reference[0], STATS, 1e-5)  # the whole set, read a piece at a time
    first = image_set.sample(4, 0)
    x = loaded.preprocess([first.read(i) for i in range(len(first))])
    assert_same(steps[0][1], activations.filter_stats(loaded.model, layers, x), STATS, 1e-5)


def test_counts_have_settled_when_the_last_three_sizes_agree():
    def history(rows):
        return pd.DataFrame(rows, columns=["images", "layer", "dead", "near_dead"])

    moving = history([(100, "a", 3, 1), (200, "a", 2, 1), (400, "a", 2, 1), (100, "b", 0, 0), (200, "b", 0, 0),
                      (400, "b", 0, 0)])
    assert not sampling.settled(moving)  # layer a lost a dead filter between 100 and 200
    grown = pd.concat([moving, history([(800, "a", 2, 1), (800, "b", 0, 0)])])
    assert sampling.settled(grown)
    assert not sampling.settled(history([(100, "a", 1, 0), (200, "a", 1, 0)]))  # two sizes are not enough
    assert not sampling.settled(pd.concat([grown, history([(1600, "b", 0, 1)])]))  # a near-dead count moved


def test_sensitivity_and_what_if_stream_to_the_figures_of_the_masked_model(loaded, folder):
    """Streamed in batches of 7: the same agreement, KL and accuracy as numpy on the masked model's outputs."""
    image_set = datasets.from_folder(folder)
    x = loaded.preprocess([images.read(folder / name) for name in image_set.names])
    labels = np.array([loaded.class_names.index(label) for label in image_set.labels])
    scores = pruning.filter_scores(loaded.model, x, labels)
    layer = models.conv_layers(loaded.model)[2]

    def stream():
        return datasets.batches(image_set, datasets.model_input(loaded, labels=image_set.labels), 7)

    def by_hand(selection):
        p = np.clip(loaded.predict(x), 1e-12, 1)
        q = np.clip(np.asarray(pruning.masked(loaded.model, selection).predict(x, verbose=0), np.float64), 1e-12, 1)
        return {"agreement": np.mean(p.argmax(1) == q.argmax(1)), "kl": np.mean(np.sum(p * np.log(p / q), axis=1)),
                "accuracy": np.mean(q.argmax(1) == labels)}

    table = pruning.sensitivity(loaded.model, scores[scores.layer == layer], "l1", stream(), fractions=[0.5],
                                total=30)
    half = pruning.ranking(scores, layer, "l1")[:round(0.5 * (scores.layer == layer).sum())]
    expected = by_hand({layer: half})
    assert expected["kl"] > 1e-4  # half the layer cut: the outputs moved
    for column, value in expected.items():
        assert table[column].iloc[0] == pytest.approx(value, rel=1e-4, abs=1e-6), column
    selection = {layer: [0, 3, 5]}
    measured = pruning.what_if(loaded.model, selection, stream(), total=30)
    for column, value in by_hand(selection).items():
        assert measured[column] == pytest.approx(value, rel=1e-4, abs=1e-6), column


def test_two_runs_of_one_job_at_once_compute_each_shard_once(loaded, folder, reference, monkeypatch):
    """Two command lines started together: the second waits for the first's shards and only merges them."""
    import threading

    computed = []
    original = runs.shard_sums

    def counted(*args, **kwargs):
        computed.append(threading.get_ident())
        return original(*args, **kwargs)

    monkeypatch.setattr(runs, "shard_sums", counted)
    image_set = datasets.from_folder(folder)
    results = {}

    def command_line(name):
        results[name] = runs.run(loaded, runs.Job(loaded.source, threshold=0.0123), image_set, shards=3)

    threads = [threading.Thread(target=command_line, args=(name,)) for name in "ab"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert len(computed) == 3  # not 6
    assert sorted(len(result.computed) for result in results.values()) == [0, 3]
    assert_same(results["a"].table, results["b"].table, STATS, 0)
