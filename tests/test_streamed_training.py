"""``--stream`` in training: the same batches, losses and parameters as the in-memory step,
resume after a kill inside a streamed step, chunk faults as one line, two processes."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import signal
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from contrastive.configs import ConfigError, parse_config
from contrastive.data import CaptionedShapes, load_source, prepare_digits
from contrastive.data.pipeline import TableSource, train_examples
from contrastive.run import assemble, loop
from contrastive.step.streamed import inputs as streamed_inputs
from contrastive.step.streamed.inputs import StepSource, StreamedInputs
from contrastive.step.streamed.sources import example_rows
from experiments import train as train_cli
from tests import processes
from tests.loss_cases import assert_close

REPO = Path(__file__).resolve().parents[1]
RTOL = 1e-6  # float32 rounding, relative (the streamed step is exact by construction)

# 40 pairs in chunks of 16: on 1 device 16 + 16 + 8 rows, on 8 devices 2 + 2 + 1 per
# device; a ragged last chunk either way. Dropout on, so the chunk keys matter.
# LARS: its update is linear in the gradient (one trust ratio per layer), so float32
# rounding in a step stays rounding in the parameters. AdamW divides every entry by its own
# gradient's magnitude, which turns the rounding of near-zero entries into relative
# differences of ~5e-6 in the parameters after a few steps, between any two programs that
# compute the same gradient (the in-memory step with chunks of 8 and of 16, dropout off,
# differ as much): a property of the optimiser, not of streaming. AdamW's single step is
# compared, gradients included, in test_two_processes_stream_like_the_in_memory_step.
RUN = [
    "--model", "mlp", "--width", "32", "--embed-dim", "16", "--head-hidden", "none",
    "--batch-size", "40", "--chunk-size", "16", "--steps", "4", "--log-every", "1",
    "--optimizer", "lars", "--warmup-steps", "1", "--learning-rate", "0.01", "--dropout", "0.1",
    "--eval-examples", "16", "--no-progress", "--no-tensorboard",
]  # fmt: skip
DATASETS = {
    # one tower on two SimCLR views (the towers share parameters: pass 2 sweeps twice)
    "digits": ["--dataset", "digits"],
    # image and text towers, caption ids for the loss (duplicates are not negatives), SigLIP
    "shapes": [
        "--dataset",
        "shapes",
        "--text-tower",
        "bag-of-words",
        "--loss",
        "sigmoid",
        "--skip-duplicate-negatives",
    ],
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("tfds")
    prepare_digits(d)
    return str(d)


def _args(workdir: Path, data_dir: str, dataset: str, devices: int, *extra: str) -> list[str]:
    return ["--workdir", str(workdir), "--data-dir", data_dir, *RUN, *DATASETS[dataset],
            "--num-devices", str(devices), *extra]  # fmt: skip


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    env["JAX_PLATFORMS"] = "cpu"
    env["JAX_DEFAULT_MATMUL_PRECISION"] = "highest"  # as tests/conftest.py
    env["PYTHONPATH"] = str(REPO)
    return env


def _losses(workdir: Path) -> dict[int, float]:
    records = [json.loads(x) for x in (workdir / loop.METRICS_FILE).read_text().splitlines()]
    steps = [r["step"] for r in records]
    assert steps == sorted(set(steps)), f"each step is logged once, in order: {steps}"
    return {r["step"]: r["loss"] for r in records}


# --------------------------------------------------------- the order of the examples


def _sources(data_dir: str) -> dict[str, tuple[str, object, dict]]:
    """(data set name, source, train_examples arguments) of every kind of pipeline."""
    rng = np.random.default_rng(0)
    coco = [
        {"image": rng.integers(0, 255, (12, 12, 3), dtype=np.uint8),
         "captions": {"text": np.array([f"a cat {i}".encode(), b"a dog"])}}
        for i in range(37)
    ]  # fmt: skip
    table = TableSource(
        image=rng.normal(size=(45, 5)).astype(np.float32),
        text=rng.integers(0, 9, (45, 4)).astype(np.int32),
        caption_id=np.arange(45, dtype=np.int32),
    )
    return {
        "image, two views": ("digits", load_source("digits", "train", data_dir), {}),
        "own tokens": ("shapes", CaptionedShapes("train", num_examples=53), {}),
        "own tokens, resized": (
            "shapes",
            CaptionedShapes("train", num_examples=53),
            {"image_size": 20},
        ),
        "locked features": ("shapes", table, {}),
        "hashed captions": ("coco_captions", coco, {"image_size": 8}),
    }


KINDS = ["image, two views", "own tokens", "own tokens, resized", "locked features",
         "hashed captions"]  # fmt: skip


@pytest.fixture(scope="module")
def sources(data_dir):
    return _sources(data_dir)


@settings(max_examples=12)
@given(
    kind=st.sampled_from(KINDS),
    hosts=st.integers(1, 4),
    per_host=st.integers(1, 5),
    step=st.integers(0, 40),
    seed=st.integers(0, 3),
)
def test_batches_are_the_examples_collated(sources, kind, hosts, per_host, step, seed):
    """Host p's batch of step s is its rows of global batch s, read one example at a time
    from the per-example view: ``collate([examples[(s P + p) b + j] for j < b])``, bit for
    bit, for every kind of pipeline (epochs past the first included)."""
    name, source, kw = sources[kind]
    b = per_host
    views = [
        train_examples(
            name,
            global_batch_size=b * hosts,
            seed=seed,
            source=source,
            process_index=p,
            process_count=hosts,
            **kw,
        )
        for p in range(hosts)
    ]
    for p, view in enumerate(views):
        batch = view.batches()[step]
        first = (step * hosts + p) * b
        one_by_one = view.collate([view.examples[first + j] for j in range(b)])
        rows = example_rows(
            view.examples, collate=view.collate, host_batch_size=b, process_index=p,
            process_count=hosts,
        )(step, np.arange(b))  # fmt: skip
        assert sorted(batch) == sorted(one_by_one) == sorted(rows)
        for k in batch:
            for got, what in ((one_by_one, "collated"), (rows, "example_rows")):
                assert got[k].dtype == batch[k].dtype, (k, what)
                np.testing.assert_array_equal(got[k], batch[k], err_msg=f"{k} ({what})")


# ------------------------------------------------- the chunks of a step, through setup


def _locked_dir(tmp_path: Path, n_train: int) -> str:
    d = tmp_path / "features"
    d.mkdir()
    rng = np.random.default_rng(5)
    np.save(d / "train.npy", rng.normal(size=(n_train, 6)).astype(np.float32))
    n_test = len(CaptionedShapes("test"))
    np.save(d / "test.npy", rng.normal(size=(n_test, 6)).astype(np.float32))
    return str(d)


def _host(batch) -> list:
    """A placed Batch -> its host arrays (one process: every row is addressable)."""
    return [None if a is None else jax.tree_util.tree_map(np.asarray, a) for a in batch]


@pytest.mark.parametrize("kind", ["digits", "shapes", "locked"])
def test_stream_chunks_are_the_rows_of_the_in_memory_batch(kind, data_dir, tmp_path):
    """With ``--stream`` the run's inputs (``Setup.make_inputs``) are chunk sources whose
    chunk k holds each device's rows ``k c/n ..`` of the very batch the in-memory run gets,
    on 1, 2, 4 and 8 devices; a source answers for its own step only."""
    extra = []
    if kind == "locked":  # a locked image tower's features: rows of a table, as they are
        extra = ["--locked-image", _locked_dir(tmp_path, 90), "--train-examples", "90"]
    dataset = "digits" if kind == "digits" else "shapes"
    for n in (1, 2, 4, 8):
        args = _args(tmp_path / "w", data_dir, dataset, n, *extra)
        memory = assemble.setup(parse_config(args)).make_inputs()
        streamed = assemble.setup(parse_config([*args, "--stream"])).make_inputs()
        assert isinstance(streamed, StreamedInputs)
        per, cl = 40 // n, 16 // n
        for step in (1, 4):  # 4: past the first epoch of the 90 locked examples
            batch = _host(memory.for_step(step, None)[0])
            source, metrics = streamed.for_step(step, None)
            assert metrics == {} and streamed.get_state() == {"position": step}
            assert source.num_chunks == 3 and tuple(source.batch_sizes) == (40, 40)
            for k in range(source.num_chunks):
                rows = np.concatenate(
                    [d * per + np.arange(k * cl, min((k + 1) * cl, per)) for d in range(n)]
                )
                chunk = source.read(step, k)
                # A chunk holds x, y, ids and valid (a batch also example_ids, None here).
                assert len(batch) == 5 and batch[4] is None  # example_ids
                for name, got, want in zip(
                    ("x", "y", "ids", "valid"), chunk, batch[:4], strict=True
                ):
                    if want is None:
                        assert got is None, name
                        continue
                    assert got.dtype == want.dtype, name
                    np.testing.assert_array_equal(got, want[rows], err_msg=f"{kind} n={n} {name}")
            with pytest.raises(ValueError, match=f"source of step {step} was asked for step 9"):
                source.read(9, 0)
        memory.close()
        streamed.close()


def test_stream_refuses_the_noise_probe(data_dir, tmp_path, capsys):
    """``--stream --noise-scale-every K``: one ``error:`` line, exit status 2, before any
    data is read (the noise probe needs the whole batch in memory)."""
    args = _args(tmp_path, data_dir, "digits", 1, "--stream", "--noise-scale-every", "2")
    with pytest.raises(ConfigError, match="--stream does not combine with --noise-scale-every"):
        assemble.setup(parse_config(args))
    assert train_cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --stream does not combine"), err


# ------------------------------------------------- training: streamed == in memory


def _train(args: list[str]) -> tuple[dict[int, float], list, type]:
    """(per-step losses, final parameters as host arrays, the type of a step's input) of
    ``loop.train`` on ``args``; the evaluation is skipped (it is not what is compared)."""
    seen: dict = {}
    real_setup = loop.setup

    def setup(cfg):
        s = real_setup(cfg)
        inner = s.step_fn

        def step_fn(state, inputs, key):
            state, metrics = inner(state, inputs, key)
            seen["params"] = jax.device_get(state.params)  # before the next step donates it
            seen["input"] = type(inputs)
            return state, metrics

        return dataclasses.replace(s, step_fn=step_fn)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loop, "setup", setup)
        mp.setattr(assemble.Setup, "evaluate", lambda self, params, only=None: {})
        records = loop.train(parse_config(args))
    losses = {r["step"]: r["loss"] for r in records}
    return losses, jax.tree_util.tree_leaves(seen["params"]), seen["input"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir):
    """``trained(dataset, devices)``: the in-memory and the streamed run of one config
    (computed once per module: the kill and fault tests resume the digits one)."""
    cache: dict = {}

    def get(dataset: str, devices: int) -> dict:
        if (dataset, devices) not in cache:
            out = {}
            for mode in ("memory", "stream"):
                workdir = tmp_path_factory.mktemp(f"{dataset}-{devices}-{mode}")
                extra = ["--stream"] if mode == "stream" else []
                out[mode] = _train(_args(workdir, data_dir, dataset, devices, *extra))
            cache[dataset, devices] = out
        return cache[dataset, devices]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("devices", [1, 8])
@pytest.mark.parametrize("dataset", ["digits", "shapes"])
def test_stream_trains_like_the_in_memory_step(trained, dataset, devices):
    """Per-step losses and final parameters of ``--stream`` equal the in-memory run's to
    float32 rounding: digits (one tower, two views) and shapes (image-text, caption ids),
    on 1 and 8 devices, ragged last chunk, dropout."""
    runs = trained(dataset, devices)
    (mem_losses, mem_params, mem_input), (st_losses, st_params, st_input) = (
        runs["memory"],
        runs["stream"],
    )
    assert st_input is StepSource and mem_input is not StepSource  # the streamed step ran
    assert sorted(st_losses) == sorted(mem_losses) == [1, 2, 3, 4]
    steps = sorted(mem_losses)
    assert_close([st_losses[s] for s in steps], [mem_losses[s] for s in steps], rtol=RTOL)
    assert_close(st_params, mem_params, rtol=RTOL, what="params")
    # The parameters moved: equal because the steps agree, not because nothing trained.
    assert mem_losses[4] != mem_losses[1]


# ---------------------------------------------------- faults and kills, by example reads


class _Reads:
    """The per-example dataset, with ``act(example)`` on the ``nth`` read of example
    ``target`` (a global example index): raise, change its bytes, or pause."""

    def __init__(self, dataset, target: int, nth: int, act):
        self.dataset, self.target, self.nth, self.act = dataset, target, nth, act
        self.count = 0

    def __getitem__(self, i: int):
        example = self.dataset[i]
        if i == self.target:
            self.count += 1
            if self.count == self.nth:
                return self.act(example)
        return example


def _patch_reads(mp: pytest.MonkeyPatch, target: int, nth: int, act) -> None:
    """Every StreamedInputs built from now on reads its examples through :class:`_Reads`."""

    def rows(dataset, **kw):
        return example_rows(_Reads(dataset, target, nth, act), **kw)

    mp.setattr(streamed_inputs, "example_rows", rows)


# Step 3, chunk 1 on one device: example (3 - 1) * 40 + 16 of the global order. Its second
# read is in pass 2 (the first of pass 2's two sweeps: digits' towers share parameters).
STEP, CHUNK = 3, 1
TARGET = (STEP - 1) * 40 + CHUNK * 16


def _run_paused(marker: str, argv: list[str]) -> int:
    """The training command, paused for good inside pass 2 of step STEP (run in a child
    process by the kill test): ``marker`` is created when the pause begins."""

    def pause(example):
        Path(marker).write_text("in pass 2")
        time.sleep(3600)
        return example

    with pytest.MonkeyPatch.context() as mp:
        _patch_reads(mp, TARGET, 2, pause)
        return train_cli.main(argv)


@pytest.mark.slow
def test_resume_after_sigkill_inside_a_streamed_step(trained, data_dir, tmp_path):
    """SIGKILL while step 3 is inside its second pass (after checkpoint 2): the same command
    resumes and logs exactly the uninterrupted run's per-step losses."""
    want = trained("digits", 1)["stream"][0]
    workdir, marker = tmp_path / "run", tmp_path / "paused"
    args = _args(workdir, data_dir, "digits", 1, "--stream", "--checkpoint-every", "2")
    code = (
        "import sys; from tests.test_streamed_training import _run_paused; "
        f"_run_paused({str(marker)!r}, sys.argv[1:])"
    )
    (proc,) = processes.start([[sys.executable, "-c", code, *args]], _env())
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and not marker.exists():
            time.sleep(0.05)
        assert marker.exists(), (
            f"the run never reached pass 2 of step {STEP}:\n{proc.stdout.read()[-3000:]}"
        )
        assert (workdir / "checkpoints" / "2").is_dir()  # renamed into place: complete
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    assert _losses(workdir).keys() == {1, 2}  # killed inside step 3: nothing of it logged
    _train(args)  # the same command again (in process: the compiled programs are reused)
    assert _losses(workdir) == want


def _digest(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def _fail(_example):
    raise OSError("Input/output error")


def _change(example):
    return {**example, "view1": example["view1"] + np.float32(1e-3)}


@pytest.mark.slow
def test_a_bad_chunk_in_pass_two_ends_the_run_with_one_line(
    trained, data_dir, tmp_path, capsys, monkeypatch
):
    """A chunk unreadable in pass 2, then one that reads different bytes: each ends the
    command with one line naming the step and the chunk (exit status 1), nothing applied,
    checkpoint 2 bit for bit as it was; the same command then finishes like an
    uninterrupted run."""
    want = trained("digits", 1)["stream"][0]
    monkeypatch.setattr(assemble.Setup, "evaluate", lambda self, params, only=None: {})
    workdir = tmp_path / "run"
    args = _args(workdir, data_dir, "digits", 1, "--stream", "--checkpoint-every", "2")
    assert train_cli.main([*args, "--stop-after", "2"]) == 0
    checkpoints = workdir / "checkpoints"
    before = _digest(checkpoints)
    assert any(p.startswith("2/") for p in before)
    capsys.readouterr()
    faults = (
        (_fail, r"could not be read in the second pass \(OSError: Input/output error\)"),
        (_change, "differs from the first"),
    )
    for act, why in faults:
        with pytest.MonkeyPatch.context() as mp:
            _patch_reads(mp, TARGET, 2, act)
            assert train_cli.main(args) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1, err
        assert re.fullmatch(
            rf"error: step {STEP}, chunk {CHUNK}: .*{why}.*; no update was applied; checkpoint "
            r"2 is intact: repair or rebuild the data set, then run the same command",
            err[0],
        ), err[0]
        assert _digest(checkpoints) == before  # untouched, and no checkpoint of step 3
        assert _losses(workdir).keys() == {1, 2}
    assert train_cli.main(args) == 0
    assert _losses(workdir) == want


# ------------------------------------------------------------- two processes, 2 devices


@pytest.mark.slow
def test_two_processes_stream_like_the_in_memory_step(tmp_path):
    """2 processes x 2 devices: the streamed step of a ``--stream`` run (each process reads
    its rows, chunk by chunk) equals the in-memory step on the same global batch: the loss,
    the gradients and the new parameters (see tests/multihost_cases.py)."""
    out = tmp_path / "two.npz"
    env = _env()
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    code = (
        "import sys; from tests.multihost_cases import streamed_training_case as f; "
        "f(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])"
    )
    port = str(processes.free_port())
    cmds = [[sys.executable, "-c", code, port, str(i), str(out), str(tmp_path)] for i in range(2)]
    results = processes.finish(processes.start(cmds, env), timeout=400)
    for i, (code_, log) in enumerate(results):
        assert code_ == 0, f"process {i} failed:\n{log[-3000:]}"
    got = np.load(out)
    names = sorted({k.split("/", 1)[1] for k in got.files})
    assert {"loss", "new_params/0", "grads/0"} <= set(names)
    for name in names:
        assert_close(got[f"stream/{name}"], got[f"memory/{name}"], rtol=RTOL, what=name)
    moved = [i for i in range(len(names)) if f"params/{i}" in names]
    for i in moved:  # every parameter took a step (AdamW, no warm-up)
        assert not np.array_equal(got[f"memory/new_params/{i}"], got[f"memory/params/{i}"]), i
