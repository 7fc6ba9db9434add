"""Hard batches (NGAME) in training, through contrastive.run.loop.train on generated captions.

A locked-tower run (LiT: features of the locked image tower in a .npy file, written here from
the caption attributes) and a two-tower run, both with ``--hard-batches``: after the first
refresh every batch is whole clusters, every example is drawn once per epoch, the loss gets
the caption ids (so equal captions are never negatives: the logged loss is the dense oracle's
with ids), ``hard_negatives`` is the direct count, a run killed before and after a refresh
resumes with the uninterrupted run's batches and losses, and two processes draw the batches
one process draws. Run as ``python -m tests.test_hard_batch_training OUT ARGV...`` this module
is one of those processes (it records its rows of every batch into OUT, an .npz).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import contrastive.inputs.hard_batch_inputs as hbi
from contrastive.configs import ConfigError, parse_config
from contrastive.data.captioned_shapes import ATTRIBUTES, caption_attributes
from contrastive.inputs.hard_batch_inputs import HardBatchInputs
from contrastive.inputs.hard_batches import HardBatchOrder, hard_negative_count
from contrastive.models.locked_tower import shapes_captions
from contrastive.run import loop
from losses import _reference

N, B, C, EVERY, STEPS = 256, 64, 8, 4, 12  # 4 steps an epoch: refreshes before steps 5 and 9
REFRESHES = [5, 9]
LOCKED = [
    "--dataset", "shapes", "--text-tower", "bag-of-words", "--train-examples", str(N),
    "--batch-size", str(B), "--hard-batches", "--cluster-size", str(C), "--refresh-every",
    str(EVERY), "--steps", str(STEPS), "--warmup-steps", "2", "--learning-rate", "3e-3",
    "--eval-examples", "32", "--log-every", "1", "--no-progress", "--num-devices", "4",
]  # fmt: skip
# Two towers on rendered images: 96 examples, 3 steps an epoch, refreshes before steps 4, 7.
TWO_TOWER = [
    "--dataset", "shapes", "--model", "mlp", "--width", "32", "--text-tower", "bag-of-words",
    "--embed-dim", "16", "--train-examples", "96", "--batch-size", "32", "--hard-batches",
    "--cluster-size", "4", "--refresh-every", "3", "--steps", "8", "--eval-examples", "32",
    "--log-every", "1", "--no-progress",
]  # fmt: skip
WALL_CLOCK = ("elapsed_s", "refresh_s", "refresh_total_s")


def attribute_features(split: str, n: int) -> np.ndarray:
    """Locked "image tower" features: the caption's attributes one-hot (31 dims) plus noise."""
    attrs = caption_attributes(shapes_captions(split, n)[1])
    onehot = [np.eye(len(v), dtype=np.float32)[attrs[k]] for k, v in ATTRIBUTES.items()]
    noise = np.random.default_rng(0).normal(scale=0.1, size=(n, 31)).astype(np.float32)
    return np.concatenate(onehot, axis=1) + noise


@pytest.fixture(scope="module")
def features(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("features")
    np.save(d / "train.npy", attribute_features("train", N))
    np.save(d / "test.npy", attribute_features("test", 2000))
    return str(d)


class Recorder:
    """Wraps HardBatchInputs.for_step: every step's global rows, this process's rows, the batch
    (x, y, ids) the loss got, the input metrics, the clustering of each refresh, and (with
    ``keep_params``) the parameters each step starts from, with the graphdef, for the loss
    oracle."""

    def __init__(self, keep_params: bool = False):
        self.rows, self.host, self.batches, self.metrics, self.groups = {}, {}, {}, {}, {}
        self.keep, self.params, self.graphdef = keep_params, {}, None

    def install(self, mp: pytest.MonkeyPatch) -> Recorder:
        for_step, make = HardBatchInputs.for_step, hbi.hard_batch_inputs
        recorder = self

        def recording_for_step(inputs, step, params):
            if recorder.keep:
                recorder.params[step] = jax.tree.map(np.asarray, params)  # before it is donated
            batch, metrics = for_step(inputs, step, params)
            recorder.rows[step] = inputs.order.batch_indices(step - 1)
            recorder.host[step] = inputs.host_examples.copy()
            if jax.process_count() == 1:
                recorder.batches[step] = tuple(np.asarray(a) for a in batch[:3])  # x, y, ids
            recorder.metrics[step] = dict(metrics)
            if "refresh_s" in metrics:
                recorder.groups[step] = inputs.order.state()["group_ids"][-1]
            return batch, metrics

        def recording_make(cfg, data, make_batch, mesh, graphdef, **kwargs):
            recorder.graphdef = graphdef
            return make(cfg, data, make_batch, mesh, graphdef, **kwargs)

        mp.setattr(HardBatchInputs, "for_step", recording_for_step)
        mp.setattr(hbi, "hard_batch_inputs", recording_make)
        return self


def train(argv: list[str], recorder: Recorder | None = None) -> list[dict]:
    with pytest.MonkeyPatch.context() as mp:
        if recorder is not None:
            recorder.install(mp)
        return loop.train(parse_config(argv))


def logged(workdir: Path) -> dict[int, dict]:
    lines = (Path(workdir) / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines)}


def without_wall_clock(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in WALL_CLOCK}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, features):
    """An uninterrupted locked-tower run on 4 devices, recorded."""
    workdir = tmp_path_factory.mktemp("reference")
    recorder = Recorder(keep_params=True)
    records = train(["--workdir", str(workdir), "--locked-image", features, *LOCKED], recorder)
    return recorder, records, workdir


def assert_whole_clusters_and_epochs(rec: Recorder, n: int, b: int, c: int, refreshes: list):
    steps = sorted(rec.rows)
    assert sorted(rec.groups) == refreshes
    stream = np.concatenate([rec.rows[s] for s in steps])
    for e in range(len(stream) // n):  # every example exactly once per epoch
        np.testing.assert_array_equal(np.sort(stream[e * n : (e + 1) * n]), np.arange(n))
    for s in steps:
        live = [r for r in refreshes if r <= s]
        if not live:
            continue
        groups = rec.groups[max(live)]  # the refresh step's batch starts the epoch it clusters
        counts = np.bincount(groups[rec.rows[s]], minlength=n // c)
        assert sorted(set(counts.tolist()) - {0}) == [c] and (counts == c).sum() == b // c, s


def test_batches_after_each_refresh_are_whole_clusters_once_per_epoch(reference):
    rec, records, _ = reference
    assert sorted(rec.rows) == list(range(1, STEPS + 1))
    assert_whole_clusters_and_epochs(rec, N, B, C, REFRESHES)
    # Random batches before the first refresh: HardBatchOrder's documented permutation.
    np.testing.assert_array_equal(
        np.concatenate([rec.rows[s] for s in range(1, 5)]),
        np.random.default_rng([0, 0]).permutation(N),
    )
    assert not np.array_equal(rec.groups[5], rec.groups[9])  # re-clustered by the new model


def test_hard_negatives_is_the_direct_count_and_refreshes_are_timed(reference):
    rec, _, workdir = reference
    ids = shapes_captions("train", N)[1]
    records = logged(workdir)
    for s in range(1, STEPS + 1):
        want = hard_negative_count(ids[rec.rows[s]]).mean()
        assert records[s]["hard_negatives"] == rec.metrics[s]["hard_negatives"] == want
        assert ("refresh_s" in records[s]) == (s in REFRESHES)
    assert all(records[s]["refresh_s"] > 0 for s in REFRESHES)
    total = sum(records[s]["refresh_s"] for s in REFRESHES)
    assert records[STEPS]["refresh_total_s"] == pytest.approx(total, rel=1e-12)


def test_caption_ids_reach_the_loss_so_equal_captions_are_never_negatives(reference):
    rec, _, workdir = reference
    ids = shapes_captions("train", N)[1]
    for s in rec.rows:
        np.testing.assert_array_equal(rec.batches[s][2], ids[rec.rows[s]])
    # A batch with equal captions (the clusters gather them): there the ids change the loss.
    step = min(s for s in rec.rows if len(np.unique(rec.batches[s][2])) < B)
    x, y, batch_ids = rec.batches[step]
    model = nnx.merge(rec.graphdef, rec.params[step])
    ex, ey, t = model.embed_x(x), model.embed_y(y), model.temperature()
    with_ids = float(_reference.infonce(ex, ey, temperature=t, ids=batch_ids))
    without = float(_reference.infonce(ex, ey, temperature=t))
    loss = logged(workdir)[step]["loss"]
    np.testing.assert_allclose(loss, with_ids, rtol=1e-5)
    assert abs(loss - without) > 1e-3 * abs(without)


@pytest.mark.slow
def test_resume_after_a_kill_across_a_refresh_draws_the_same_batches(reference, features, tmp_path):
    """Killed after step 10 with the checkpoint of step 6: the resumed run draws steps 7 and 8
    from the step-5 clustering restored from the checkpoint (not recomputed), recomputes the
    refresh before step 9 that the kill lost, and logs the uninterrupted run's losses."""
    rec, _, ref_dir = reference
    argv = ["--workdir", str(tmp_path), "--locked-image", features, *LOCKED,
            "--checkpoint-every", "6"]  # fmt: skip
    killed, resumed = Recorder(), Recorder()
    train([*argv, "--stop-after", "10"], killed)
    train(argv, resumed)
    assert sorted(killed.groups) == [5, 9] and sorted(resumed.groups) == [9]
    assert sorted(resumed.rows) == list(range(7, STEPS + 1))
    for part in (killed, resumed):
        for s in part.rows:
            np.testing.assert_array_equal(part.rows[s], rec.rows[s])
        for s in part.groups:
            np.testing.assert_array_equal(part.groups[s], rec.groups[s])
    want, got = logged(ref_dir), logged(tmp_path)
    assert sorted(got) == sorted(want)
    for s in want:  # every step's loss and metrics exactly equal
        assert without_wall_clock(got[s]) == without_wall_clock(want[s]), s


@pytest.mark.slow
def test_two_tower_run_draws_whole_clusters_of_rendered_images(tmp_path):
    """Images rendered and converted as the random pipeline converts them, clustered by the
    text tower, with two extra captions one attribute away per image (--hard-negatives 2):
    the loss gets every caption row's id, in the ring layout."""
    from contrastive.data.captioned_shapes import CaptionedShapes, caption_id, decode
    from contrastive.data.pipeline import get_spec, own_token_arrays

    rec = Recorder()
    argv = ["--workdir", str(tmp_path), *TWO_TOWER, "--cluster-tower", "text",
            "--hard-negatives", "2"]  # fmt: skip
    train(argv, rec)
    assert_whole_clusters_and_epochs(rec, 96, 32, 4, [4, 7])
    src = CaptionedShapes("train")
    for s in (2, 5):  # a random batch and a clustered one
        x, y, ids = rec.batches[s]
        want = own_token_arrays(get_spec("shapes"), [src[int(i)] for i in rec.rows[s]])
        np.testing.assert_array_equal(x, want["image"])
        # 8 devices: each holds its 4 images' captions, then their 8 hard negatives.
        assert y.shape[0] == ids.shape[0] == 3 * 32
        rows = ids.reshape(8, 12)
        own, extra = rows[:, :4].reshape(-1), rows[:, 4:].reshape(-1)  # extra: 2 per image
        np.testing.assert_array_equal(own, want["caption_id"])
        a, b = caption_attributes(np.repeat(own, 2)), caption_attributes(extra)
        assert all(sum(a[k][i] != b[k][i] for k in ATTRIBUTES) == 1 for i in range(64))
        for row, tokens in zip(ids, y, strict=True):  # each id names its row's caption
            attrs = decode(tokens)
            assert caption_id(*(attrs[k] for k in ATTRIBUTES)) == row
    records = logged(tmp_path)
    assert all(records[s]["hard_negatives"] == rec.metrics[s]["hard_negatives"] for s in rec.rows)


# ---------------------------------------------------------------------- two processes


def _worker(out: str, argv: list[str]) -> int:
    """One process of a multi-host run: its rows of every step's batch into ``out``."""
    from experiments import train as command

    rec = Recorder()
    with pytest.MonkeyPatch.context() as mp:
        rec.install(mp)
        code = command.main(argv)
    np.savez(out, **{str(s): rows for s, rows in rec.host.items()})
    return code


@pytest.mark.slow
def test_two_processes_draw_the_batches_of_one(reference, features, tmp_path):
    from tests import processes

    rec, _, ref_dir = reference
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_DEFAULT_MATMUL_PRECISION="highest")
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    port = processes.free_port()
    argv = ["--workdir", str(tmp_path / "run"), "--locked-image", features,
            *LOCKED[: LOCKED.index("--num-devices")], "--coordinator-address",
            f"127.0.0.1:{port}", "--num-processes", "2", "--peer-timeout", "60"]  # fmt: skip
    commands = [
        [sys.executable, "-m", "tests.test_hard_batch_training", str(tmp_path / f"rows{i}.npz"),
         *argv, "--process-id", str(i)]
        for i in range(2)
    ]  # fmt: skip
    for i, (code, log) in enumerate(processes.finish(processes.start(commands, env), 300)):
        assert code == 0, f"process {i}:\n{log[-3000:]}"
    hosts = [np.load(tmp_path / f"rows{i}.npz") for i in range(2)]
    for s in range(1, STEPS + 1):
        np.testing.assert_array_equal(np.concatenate([h[str(s)] for h in hosts]), rec.rows[s])
    want, got = logged(ref_dir), logged(tmp_path / "run")
    assert sorted(got) == sorted(want)
    for s in want:
        assert got[s]["hard_negatives"] == want[s]["hard_negatives"]
        np.testing.assert_allclose(got[s]["loss"], want[s]["loss"], rtol=1e-5)


# ---------------------------------------------------------------------- bad input, state


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--cluster-size", "1"], "--cluster-size 1 makes every example its own cluster"),
        (["--train-examples", "32"], "--hard-batches: 32 training examples make 8 clusters of 4"),
    ],
)
def test_bad_settings_end_in_one_line_before_training(flags, message, tmp_path, capsys):
    from experiments import train as command

    argv = ["--workdir", str(tmp_path), *TWO_TOWER, *flags]
    assert command.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {message}") and len(err.splitlines()) == 1, err
    assert not (tmp_path / "metrics.jsonl").exists() or not logged(tmp_path)


def test_bad_settings_are_refused_by_the_checks():
    with pytest.raises(ConfigError, match="--cluster-size 48 must divide --batch-size 32"):
        parse_config(["--workdir", "x", "--hard-batches", "--batch-size", "32", "--cluster-size",
                      "48"])  # fmt: skip
    cases = [
        (dict(num_examples=99, batch_size=32, cluster_size=3), "must divide --batch-size 32"),
        (dict(num_examples=99, batch_size=32, cluster_size=1), "--cluster-size 2 or more"),
        (dict(num_examples=32, batch_size=32, cluster_size=8), "4 clusters of 8, no more than"),
        (
            dict(
                num_examples=99, batch_size=32, cluster_size=8, kind="image", cluster_tower="text"
            ),
            "--cluster-tower text needs an image-text",
        ),  # fmt: skip
    ]
    for kw, message in cases:
        kw = {"cluster_tower": "image", "kind": "image_text", **kw}
        with pytest.raises(ConfigError, match=message) as info:
            hbi.check_hard_batches(**kw)
        assert "\n" not in str(info.value)


@settings(max_examples=20)
@given(
    n=st.integers(8, 300),
    c=st.sampled_from([2, 4]),
    refreshes=st.integers(0, 3),
    seed=st.integers(0, 99),
)
def test_order_state_survives_json_exactly(n, c, refreshes, seed):
    order = HardBatchOrder(n, 8, c, seed)
    rng = np.random.default_rng(seed)
    for i in range(refreshes):
        order.set_clustering(rng.permutation(np.arange(n) // c), refresh_step=3 * i + 1)
    state = json.loads(json.dumps(hbi.encode_order_state(order.state())))
    back = HardBatchOrder.from_state(hbi.decode_order_state(state))
    original = order.state()
    np.testing.assert_array_equal(back.state()["group_ids"], original["group_ids"])
    first = original["first_step"]
    for s in range(first, first + 3 * -(-n // 8)):
        np.testing.assert_array_equal(back.batch_indices(s), order.batch_indices(s))


def test_random_batches_log_the_same_metric(features):
    """BatchInputs (random batches) logs hard_negatives too: the direct count of its batch."""
    from contrastive.data.pipeline import TableSource, train_dataset
    from contrastive.inputs.step_inputs import BatchInputs
    from contrastive.mesh import make_mesh
    from contrastive.step.train_step import Batch

    tokens, ids = shapes_captions("train", N)
    table = TableSource(image=attribute_features("train", N), text=tokens, caption_id=ids)
    dataset = train_dataset("shapes", global_batch_size=B, seed=0, source=table)
    inputs = BatchInputs(dataset, lambda h, s: Batch(h["image"], h["text"]), make_mesh())
    try:
        for step in (1, 2, 7):
            _, metrics = inputs.for_step(step, None)
            want = hard_negative_count(dataset[step - 1]["caption_id"]).mean()
            assert metrics == {"hard_negatives": want}
    finally:
        inputs.close()


def fake_source(kind: str, n: int = 40) -> list[dict]:
    """Raw examples as TFDS gives them: uint8 images, and labels or caption strings."""
    rng = np.random.default_rng(1)
    if kind == "digits":
        return [{"image": rng.integers(0, 256, (16, 16, 1), np.uint8), "label": i % 10}
                for i in range(n)]  # fmt: skip
    return [
        {"image": rng.integers(0, 256, (20, 20, 3), np.uint8),
         "captions": {"text": np.array([f"photo {i}".encode(), f"picture {i} b".encode()])}}
        for i in range(n)
    ]  # fmt: skip


@pytest.mark.parametrize("dataset", ["digits", "coco_captions"])
def test_image_examples_are_read_as_the_random_pipeline_makes_them(dataset):
    """Augmented views from a per-position generator, with the pipeline's keys, shapes and
    dtypes; the cluster tower's inputs un-augmented; the loss's ids are the example indices."""
    from contrastive.data.augment import eval_view
    from contrastive.data.pipeline import get_spec, train_dataset
    from contrastive.data.text import HashTokenizer
    from contrastive.run.assemble import run_tokenizer
    from contrastive.step.train_step import Batch

    cfg = parse_config(["--workdir", "x", "--dataset", dataset, "--image-size", "16"])
    spec, source = get_spec(dataset, 16), fake_source(dataset)
    tokenizer = run_tokenizer(cfg, spec) if dataset == "coco_captions" else None
    read = hbi._batch_reader(spec, source, seed=0, tokenizer=tokenizer)
    examples, positions = np.array([3, 17, 3, 8]), np.array([64, 65, 66, 67])
    host = read(examples, positions)
    random = train_dataset(dataset, global_batch_size=4, seed=0, source=source, image_size=16)[0]
    assert {k: (v.shape, v.dtype) for k, v in host.items()} == {
        k: (v.shape, v.dtype) for k, v in random.items()
    }
    again = read(examples, positions)
    other = read(examples, positions + 4)
    image = "view1" if dataset == "digits" else "image"
    np.testing.assert_array_equal(host[image], again[image])  # a pure function of the position
    assert not np.array_equal(host[image][0], host[image][2])  # one example, two positions
    assert not np.array_equal(host[image], other[image])
    tower = hbi._cluster_reader(spec, source, "image")(examples)
    want = [eval_view(source[i]["image"].astype(np.float32) / 255, 16) for i in examples]
    np.testing.assert_allclose(tower, np.stack(want), rtol=1e-6)
    if dataset == "coco_captions":  # the text tower: each image's first caption, hashed
        text = hbi._cluster_reader(spec, source, "text", tokenizer)(examples)
        np.testing.assert_array_equal(text[1], HashTokenizer(8192, 32)("photo 17"))
    batch = hbi._with_ids(Batch(host[image], host[image]), host, examples)
    np.testing.assert_array_equal(batch.ids, examples)  # example 3 twice: not its own negative


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1], sys.argv[2:]))
