"""What the batch-size study asks of the loop (a locked image tower, a validation split carved
from train, evaluation on a geometric schedule, stopping at a target); its fixed-budget and
arms stages at protocol version 1's rates; and the locked-step benchmark against the
library's step. The protocol's own arithmetic is in test_study_protocol.py."""

from __future__ import annotations

import dataclasses
import doctest
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given
from hypothesis import strategies as st

from contrastive.configs import Config, ConfigError, parse_config
from contrastive.data import get_spec
from contrastive.mesh import make_mesh, place_params, shard_batch
from contrastive.run import loop
from contrastive.run.assemble import build_model
from contrastive.run.loop import geometric_steps
from contrastive.step.optim import make_optimizer
from contrastive.step.train_step import create_train_state, make_train_step, place_state
from experiments import batch_size_study, bench_locked_step, train
from experiments.study import arms, stages
from experiments.study import fixed_budget as budget
from experiments.study.arms import ArmSettings, arm_updates, matched_batch
from experiments.study.fixed_budget import budget_steps
from experiments.study.runs import (
    StudyRun,
    StudyStopped,
    _negatives_and_refresh,
    first_crossing,
    run_to_target,
)

# A locked-tower run on shapes: 2,048 training examples, 256 for validation, batch 64.
LOCKED = [
    "--dataset", "shapes", "--locked-image", "pretrained", "--text-tower", "bag-of-words",
    "--train-examples", "2048", "--validation-examples", "256", "--eval-examples", "256",
    "--batch-size", "64", "--learning-rate", "4e-3", "--warmup-steps", "2",
    "--end-lr-ratio", "1", "--no-progress", "--log-every", "1000",
]  # fmt: skip


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    """One feature cache for the module: the locked tower is pre-trained once."""
    return str(tmp_path_factory.mktemp("features"))


def _records(workdir: Path) -> list[dict]:
    return [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_locked_run_stops_at_its_target_and_stays_finished(tmp_path, cache):
    argv = ["--workdir", str(tmp_path), *LOCKED, "--feature-cache", cache, "--steps", "400",
            "--eval-growth", "1.2", "--stop-at", "val_zero_shot_top1=0.05"]  # fmt: skip
    records = loop.train(parse_config(argv))
    evals = [r for r in records if "val_zero_shot_top1" in r]
    steps = [r["step"] for r in evals]
    # evaluated exactly on the geometric schedule until the target, then stopped there
    assert steps == sorted(s for s in geometric_steps(1.2, 400) if s <= steps[-1])
    assert steps[-1] < 400 and records[-1]["reached_target"] == "val_zero_shot_top1>=0.05"
    assert evals[-1]["val_zero_shot_top1"] >= 0.05
    assert all(r["val_zero_shot_top1"] < 0.05 for r in evals[:-1])
    # the stop is a full evaluation (test metrics too); the checks before it are quick
    assert "zero_shot_top1" in records[-1] and "zero_shot_top1" not in evals[0]
    # the same command again: the run is finished, nothing is trained or logged twice
    again = loop.train(parse_config(argv))
    assert [r["step"] for r in again] == [r["step"] for r in records]
    assert len(_records(tmp_path)) == len(records)


@pytest.mark.slow
def test_a_run_stopped_by_a_signal_stops_the_study_and_resumes(tmp_path, cache):
    """A run that returns before its last step (SIGTERM/SIGINT: checkpoint saved; here
    --stop-after) is not a finished row: the study stops with one line, and the same run
    later resumes to its last step."""
    argv = ["--workdir", "unused", *LOCKED, "--feature-cache", cache, "--steps", "6"]
    run = StudyRun("budget", "infonce", 64, 4e-3, 0, parse_config([*argv, "--stop-after", "3"]))
    with pytest.raises(
        StudyStopped, match=r"stopped before its last step \(6\) .* same --out to resume"
    ):
        run_to_target(run, tmp_path, "val_zero_shot_top1", [0.9], "1/1")
    done = dataclasses.replace(run, config=parse_config(argv))
    row = run_to_target(done, tmp_path, "val_zero_shot_top1", [0.9], "1/1")
    assert row["final_step"] == 6 and row["steps_to"] == {"0.9": None}
    assert [r["step"] for r in _records(tmp_path / "runs" / run.name)][-1] == 6


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--stop-at", "val_zero_shot_top1"], "--stop-at 'val_zero_shot_top1': give METRIC=VALUE"),
        (["--stop-at", "val_top9=0.5"], "--stop-at: unknown metric 'val_top9'"),
        (["--validation-examples", "0", "--stop-at", "val_zero_shot_top1=0.3"],
         "--stop-at: 'val_zero_shot_top1' is measured on a validation split, and this run has "
         "none: add --validation-examples V"),
        (["--eval-growth", "1.0"], "--eval-growth must be above 1"),
        (["--dataset", "digits", "--validation-examples", "10", "--locked-image", "none"],
         "--validation-examples needs a data set whose validation metric"),
        (["--dataset", "digits", "--validation-examples", "0"], "--locked-image needs an image"),
        (["--train-examples", "999999", "--validation-examples", "4096"],
         "--train-examples 999999 plus --validation-examples 4096 exceed"),
    ],
)  # fmt: skip
def test_bad_study_settings_are_one_line(flags, message, tmp_path, capsys, cache):
    argv = ["--workdir", str(tmp_path / "w"), *LOCKED, "--feature-cache", cache, *flags]
    assert train.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {message}") and len(err.splitlines()) == 1, err


def test_locked_features_of_a_user_are_checked_against_the_data_set(tmp_path, capsys):
    (tmp_path / "feats").mkdir()
    np.save(tmp_path / "feats" / "train.npy", np.zeros((100, 8), np.float32))
    argv = ["--workdir", str(tmp_path / "w"), *LOCKED, "--locked-image", str(tmp_path / "feats")]
    assert train.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "train.npy has 100 rows but" in err and len(err.splitlines()) == 1, err


def test_geometric_steps_are_fixed_by_the_growth_alone():
    assert sorted(geometric_steps(2.0, 20)) == [1, 2, 4, 8, 16]
    assert geometric_steps(0.0, 20) == frozenset()
    assert sorted(geometric_steps(1.05, 30))[:12] == list(range(1, 13))


@pytest.mark.slow
def test_negative_queue_run_resumes_exactly(tmp_path, cache):
    """The queue is part of the checkpoint: a run killed after step 4 and resumed logs the
    uninterrupted run's losses; a queue longer than an epoch is refused in one line."""
    base = [*LOCKED, "--feature-cache", cache, "--steps", "8", "--log-every", "1",
            "--checkpoint-every", "4", "--skip-duplicate-negatives"]  # fmt: skip
    queue = ["--negative-queue", "2"]
    whole = loop.train(parse_config(["--workdir", str(tmp_path / "a"), *base, *queue]))
    cut = ["--workdir", str(tmp_path / "b"), *base, *queue]
    loop.train(parse_config([*cut, "--stop-after", "6"]))  # killed after step 6: resumes at 4
    resumed = loop.train(parse_config(cut))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in whole]
    assert len({r["loss"] for r in whole}) == len(whole)  # the queue changes every step
    with pytest.raises(ConfigError, match="--negative-queue 40 spans more than an epoch"):
        loop.train(
            parse_config(["--workdir", str(tmp_path / "c"), *base, "--negative-queue", "40"])
        )


# ------------------------------------------------ the fixed-budget and arms stages, the bench

# A tiny study's chosen rates: B = 64 reached the higher target, B = 128 only the lower one.
TINY_RATES = {
    "targets": [0.02, 0.04],
    "protocol": {"--dataset": "shapes", "--train-examples": 2048, "--validation-examples": 256},
    "summary": [
        {"loss": "infonce", "batch_size": 64, "target": 0.02, "learning_rate": 4e-3},
        {"loss": "infonce", "batch_size": 64, "target": 0.04, "learning_rate": 2e-3},
        {"loss": "infonce", "batch_size": 128, "target": 0.02, "learning_rate": 4e-3},
        {"loss": "infonce", "batch_size": 128, "target": 0.04, "learning_rate": None},
    ],
    "rows": [{"loss": "infonce", "batch_size": b, "cap": 60} for b in (64, 128)],
}


@pytest.mark.slow
def test_fixed_budget_then_arms_stage_at_a_toy_size(tmp_path, cache, capsys):
    """The fixed-budget stage trains every (B, seed) for budget / B steps at the committed
    rate (the higher target's, else the first's) and reports the final test metrics over
    seeds; the arms stage in the same directory reads those runs back as its random arm,
    trains the queue arm, and matches its steps on the random arm's log-log curve."""
    rates = tmp_path / "rates.json"
    rates.write_text(json.dumps(TINY_RATES))
    out = tmp_path / "out"
    common = ["--rates", str(rates), "--losses", "infonce", "--batch-sizes", "64,128",
              "--seeds", "0,1", "--train-examples", "2048", "--validation-examples", "256",
              "--budget-examples", "1280", "--min-steps", "10", "--targets", "0.02,0.04",
              "--feature-cache", cache, "--compile-cache", str(tmp_path / "xla"),
              "--out", str(out)]  # fmt: skip
    assert batch_size_study.main(["--stage", "fixed-budget", *common]) == 0
    fixed = json.loads((out / "batch_size_study_fixed_budget.json").read_text())
    chosen = {(r["batch_size"], r["learning_rate"], r["target"]) for r in fixed["rates"]}
    assert chosen == {(64, 2e-3, 0.04), (128, 4e-3, 0.02)}
    assert sorted((r["batch_size"], r["seed"]) for r in fixed["rows"]) == [
        (64, 0), (64, 1), (128, 0), (128, 1)
    ]  # fmt: skip
    for r in fixed["rows"]:  # the whole budget, no stop; the final evaluation is the last step
        name = StudyRun("budget", "infonce", r["batch_size"], r["learning_rate"], r["seed"], None)
        records = _records(out / "runs" / name.name)
        assert r["final_step"] == r["steps"] == 1280 // r["batch_size"] == records[-1]["step"]
        assert r["final"] == {k: records[-1][k] for k in r["final"]}
        assert {"zero_shot_top1", "zero_shot_top1_novel", "i2t_r@1", "t2i_r@5"} <= set(r["final"])
        steps, values = zip(*r["curve"], strict=True)
        assert all(s == first_crossing(steps, values, float(t)) for t, s in r["steps_to"].items())
    for p in fixed["summary"]:
        runs = [r for r in fixed["rows"] if r["batch_size"] == p["batch_size"]]
        top1 = [r["final"]["zero_shot_top1"] for r in runs]
        assert p["zero_shot_top1"]["mean"] == pytest.approx(sum(top1) / len(top1))
        assert (p["zero_shot_top1"]["min"], p["zero_shot_top1"]["max"]) == (min(top1), max(top1))
    md = (out / "batch_size_study_fixed_budget.md").read_text()
    assert "steps 20 at B = 64, 10 at B = 128" in md and "(chosen for 0.02)" in md
    assert "Is a larger batch better" in md and "`--warmup-steps 10`" in md
    assert (out / "batch_size_study_fixed_budget.png").stat().st_size > 0

    random_logs = {p: p.read_text() for p in (out / "runs").glob("budget_*/metrics.jsonl")}
    argv = ["--stage", "arms", "--arms", "queue", "--arm-batch-sizes", "64",
            "--queue-negatives", "128", *common, "--seeds", "0"]  # fmt: skip
    assert batch_size_study.main(argv) == 0
    arm_record = json.loads((out / "batch_size_study_arms.json").read_text())
    assert {p: p.read_text() for p in random_logs} == random_logs  # read back, not retrained
    random = [r for r in arm_record["rows"] if r["stage"] == "budget"]
    assert random == [r | {"time_s": s["time_s"]} for r, s in zip(
        [r for r in fixed["rows"] if r["seed"] == 0], random, strict=True)]  # fmt: skip
    queue = [r for r in arm_record["rows"] if r["stage"] == "queue-k1"]  # 64 (1 + 1) = 128
    assert [r["seed"] for r in queue] == [0]
    assert all(r["learning_rate"] == 2e-3 and r["final_step"] == 20 for r in queue)
    for m in arm_record["matches"]:
        curve = [p for p in arm_record["summary"] if p["stage"] == "budget"]
        arm = next(p for p in arm_record["summary"] if p["stage"] == "queue-k1")
        t = str(m["target"])
        if arm["not_reached"][t] or any(p["not_reached"][t] for p in curve):
            assert m["matched_batch"] is None
        else:
            want = matched_batch([p["batch_size"] for p in curve],
                                 [p["steps_to"][t]["mean"] for p in curve],
                                 arm["steps_to"][t]["mean"])  # fmt: skip
            assert m["matched_batch"] == want
    md = (out / "batch_size_study_arms.md").read_text()
    assert "| 64 | queue-k1 |" in md and "`--negative-queue 1`" in md
    for r in arm_record["rows"]:  # every run logs its batches' hard negatives on shapes
        assert r["measures"]["hard_negatives"] >= 0 and "refresh_share" not in r["measures"]
    assert "Hard negatives per anchor" in md and "Re-clustering time" not in md
    assert "run directory: " + str(out) in capsys.readouterr().out


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--stage", "sideways"], "argument --stage: invalid choice: 'sideways'"),
        (["--stage", "arms", "--tune"], "unrecognized arguments: --tune"),
        (["--stage", "fixed-budget", "--budget-examples", "1000"],
         "--budget-examples 1000 is not a multiple of the batch size 64: use a multiple of 1024"),
        (["--stage", "fixed-budget", "--budget-examples", "262144"],
         "--budget-examples 262144 gives the largest batch (1024) only 256 steps, fewer than "
         "--min-steps 500: raise it to 512000 or more"),
        (["--stage", "fixed-budget", "--train-examples", "32768"],
         "--rates {rates} was tuned under other settings (--train-examples 65536 -> 32768)"),
        (["--stage", "fixed-budget", "--batch-sizes", "64,128", "--budget-examples", "64000"],
         "--rates {rates} has no chosen rate for infonce at B = 128"),
        (["--stage", "arms", "--arms", "queue,sideways"], "unknown arm 'sideways' in --arms"),
        (["--stage", "arms", "--arms", "queue", "--queue-negatives", "640"],
         "--queue-negatives 640 must be a multiple of every arm batch size"),
        (["--stage", "arms", "--arms", "hard", "--cluster-size", "48"],
         "--cluster-size 48 must divide every arm batch size"),
        (["--stage", "arms", "--arms", "hard", "--cluster-size", "1"],
         "--cluster-size 1 makes every example its own cluster"),
        (["--stage", "fixed-budget", "--batch-sizes", "0,64"], "batch sizes must be positive"),
        (["--stage", "fixed-budget", "--rates", "{tmp}/empty.json"],
         "--rates {tmp}/empty.json: no protocol recorded (TypeError)"),
        (["--stage", "fixed-budget", "--rates", "{fixed}"],
         "--rates {fixed}: not a finished tuned study of protocol version 1 (KeyError)"),
        (["--stage", "arms", "--arms", "queue", "--arm-batch-sizes", "64,128",
          "--queue-negatives", "131072"], "--queue-negatives 131072 at B = 64: --negative-queue "
         "2047 spans more than an epoch"),
    ],
)  # fmt: skip
def test_bad_stage_flags_are_one_line_before_any_run(flags, message, tmp_path, capsys):
    rates = str(stages.V1_RATES)
    (tmp_path / "empty.json").write_text("[]")
    fixed = str(stages.V1_RATES.with_name("batch_size_study_fixed_budget.json"))
    flags = [f.format(tmp=tmp_path, fixed=fixed) for f in flags]
    try:  # argparse's own errors (an unknown choice) exit here; the command's return 2
        status = batch_size_study.main(["--rates", rates, *flags, "--out", str(tmp_path / "out")])
    except SystemExit as e:
        status = e.code
    assert status == 2
    err = capsys.readouterr().err.strip()
    message = message.format(rates=rates, tmp=tmp_path, fixed=fixed)
    assert err.startswith(f"error: {message}") and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_budget_steps_refuses_a_budget_too_small_for_the_largest_batch():
    assert budget_steps(512_000, [1024, 64, 256], min_steps=500) == {64: 8000, 256: 2000, 1024: 500}
    with pytest.raises(ConfigError, match="only 499 steps, fewer than --min-steps 500"):
        budget_steps(499 * 1024, [1024], min_steps=500)


@given(
    exponent=st.floats(0.1, 2.0),
    scale=st.floats(10.0, 1e5),
    sizes=st.lists(st.integers(1, 20), min_size=2, max_size=6, unique=True),
    where=st.floats(0.0, 1.0),
)
def test_matched_batch_inverts_a_power_law(exponent, scale, sizes, where):
    """On a curve S = c B^-a (a straight line in log-log) the interpolation is exact; outside
    the measured batch sizes it says so instead of extrapolating."""
    sizes = sorted(2**k for k in sizes)
    steps = [scale * b**-exponent for b in sizes]
    b = sizes[0] * (sizes[-1] / sizes[0]) ** where
    assert matched_batch(sizes, steps, scale * b**-exponent) == pytest.approx(b, rel=1e-9)
    slower, faster = 2 * steps[0], steps[-1] / 2
    assert matched_batch(sizes, steps, slower) == {"batch": None, "bound": "<", "of": sizes[0]}
    assert matched_batch(sizes, steps, faster) == {"batch": None, "bound": ">", "of": sizes[-1]}


def test_matched_batch_takes_the_first_bracketing_segment():
    # steps rise again past B = 256: 150 steps are first matched between 64 and 256
    b = matched_batch([64, 256, 1024], [300, 100, 200], 150)
    assert b == pytest.approx(64 * 4 ** (math.log(2) / math.log(3)))
    assert matched_batch([64, 256], [100, 100], 100) == 64.0
    with pytest.raises(ValueError, match="two or more positive"):
        matched_batch([64], [100], 50)


def test_arm_measures_average_the_last_epoch_and_share_the_refresh_time():
    """hard_negatives: the mean over the logged steps of the last epoch only (the hard arm's
    first epoch is random); refresh_share: all refreshes' seconds over the run's wall time."""
    cfg = Config().with_updates(train_examples=400, batch_size=100)  # 4 steps an epoch
    records = [{"step": s, "hard_negatives": float(s), "refresh_total_s": 0.5 * (s > 4),
                "elapsed_s": 2.0 * s} for s in range(1, 9)]  # fmt: skip
    got = _negatives_and_refresh(records, cfg)
    assert got == {"hard_negatives": (5 + 6 + 7 + 8) / 4, "refresh_share": 0.5 / 16}
    assert _negatives_and_refresh([{"step": 1, "loss": 1.0}], cfg) == {}


def test_arm_settings_give_the_protocols_queue_and_refresh():
    s = ArmSettings()
    assert arm_updates("queue", 64, s) == ("queue-k15", {"negative_queue": 15})
    assert arm_updates("queue", 256, s) == ("queue-k3", {"negative_queue": 3})
    name, updates = arm_updates("hard", 64, s)
    assert name == "hard-c16-r1024" and updates["refresh_every"] == 1024  # one epoch
    assert updates["cluster_size"] == 16 and updates["skip_duplicate_negatives"]


@pytest.mark.parametrize("module", [budget, arms, bench_locked_step])
def test_stage_and_bench_examples_run(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_bench_locked_step_imports_no_data_pipeline():
    """The benchmark runs on machines without tensorflow_datasets or grain."""
    code = ("import sys, experiments.bench_locked_step; "
            "print(sorted(m for m in ('tensorflow_datasets', 'grain', 'array_record') "
            "if m in sys.modules))")  # fmt: skip
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=Path(__file__).parents[1], timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["infonce", "sigmoid"])  # decoupled: infonce's code path
def test_bench_locked_step_is_the_librarys_step(loss):
    """The benchmark's towers and step are the library's: the same parameters and
    embeddings as :func:`contrastive.run.assemble.build_model`'s locked model, and two steps give
    the losses and parameters of :func:`contrastive.step.train_step.make_train_step`."""
    cfg = Config().with_updates(dataset="shapes", locked_image="pretrained", loss=loss,
                                text_tower="bag-of-words", model="mlp", steps=10)  # fmt: skip
    ours = bench_locked_step.locked_model(loss)
    theirs = build_model(cfg, get_spec("shapes"), feature_width=128)
    leaves = lambda m: jax.tree_util.tree_leaves(nnx.state(m, nnx.Param))
    for a, b in zip(leaves(ours), leaves(theirs), strict=True):
        np.testing.assert_array_equal(a, b)
    feats, tokens = bench_locked_step.synthetic_batch(64, seed=1)
    for method, inputs in (("embed_x", feats), ("embed_y", tokens)):
        np.testing.assert_array_equal(
            getattr(ours, method)(inputs), getattr(theirs, method)(inputs)
        )
    mesh = make_mesh(num_devices=2)  # a ring of two: the ring loss and the all-reduce
    tx = make_optimizer(cfg.train.optim)
    graphdef, state = create_train_state(theirs, tx)
    library = make_train_step(graphdef, cfg.train, mesh, tx=tx)
    bench = bench_locked_step.make_locked_step(graphdef, loss, mesh, tx)
    lib_state = place_state(state, mesh)
    copy = lambda tree: jax.tree_util.tree_map(jnp.array, tree)  # each step donates its own
    bench_state = place_params(copy((state.params, state.opt_state)), mesh)
    for step in range(2):
        batch = shard_batch(bench_locked_step.synthetic_batch(64, seed=step), mesh)
        lib_state, lib_m = library(lib_state, batch, None)
        bench_state, bench_m = bench(bench_state, batch)
        np.testing.assert_allclose(bench_m["loss"], lib_m["loss"], rtol=1e-6)
        np.testing.assert_allclose(bench_m["grad_norm"], lib_m["grad_norm"], rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(bench_state[0]),
                    jax.tree_util.tree_leaves(lib_state.params), strict=True):  # fmt: skip
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_bench_locked_step_runs_at_a_toy_size(tmp_path):
    summary = bench_locked_step.run(["--batch", "64", "--losses", "sigmoid", "--repeats", "1",
                                     "--devices", "2", "--out", str(tmp_path)])  # fmt: skip
    (row,) = summary["rows"]
    assert row["step_s"] > 0 and row["loss_s"] > 0
    assert row["ratio"] == pytest.approx(row["step_s"] / row["loss_s"])
    assert (
        summary["devices"] == 2 and "| sigmoid |" in (tmp_path / "bench_locked_step.md").read_text()
    )
    with pytest.raises(ValueError, match="--devices 3 with --batch 64"):
        bench_locked_step.run(["--batch", "64", "--devices", "3", "--out", str(tmp_path)])


def _stage_value_flags() -> list[str]:
    return [a.option_strings[-1] for a in stages.build_parser()._actions
            if a.option_strings and a.nargs != 0 and a.option_strings[-1] != "--help"]  # fmt: skip


@pytest.mark.parametrize("flag", _stage_value_flags())
def test_every_stage_flag_refuses_a_bad_value_in_one_line(flag, tmp_path, monkeypatch, capsys):
    """The stages' own parser, walked as tests/test_cli_errors.py walks every command's: a
    bad value (a path below a file, a negative number, an unknown name) is one line naming
    the flag, exit 2, and nothing is created."""
    (tmp_path / "a-file").write_text("x")
    monkeypatch.chdir(tmp_path)
    action = next(a for a in stages.build_parser()._actions if a.option_strings[-1] == flag)
    typename = getattr(action.type, "__name__", "")
    if typename in ("directory", "output_dir", "path", "existing_file"):
        value = str(tmp_path / "a-file" / "below")
    elif typename in ("positive_int", "positive_float", "int", "float"):
        value = "-5"
    else:
        value = "zzz"
    argv = ["--stage", "fixed-budget", f"{flag}={value}"]
    if flag == "--stage":
        argv = [f"--stage={value}"]
    try:
        code = batch_size_study.main(argv)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error:"), (flag, err)
    assert flag in err[0], (flag, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]
