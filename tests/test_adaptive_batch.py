"""The adaptive batch (``--adaptive-batch``): the growth rule and its alignment, the phases a
checkpoint holds, a real run that grows at an aligned step with the learning rate scaled by
the rule, exact resumes after a growth and between its decision and its switch, the
refused combinations (one line each, before training), and unchanged identities at the
defaults (old checkpoints resume)."""

from __future__ import annotations

import dataclasses
import doctest
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from contrastive.configs import Config, ConfigError, build_parser, differences, parse_config
from contrastive.data import prepare_digits
from contrastive.data.pipeline import TableSource, train_examples
from contrastive.run import adaptive_batch as ab
from contrastive.run import loop
from contrastive.run.checkpoint import Checkpointer
from contrastive.run.noise_meter import measure_checkpoint
from contrastive.step.optim import make_schedule
from experiments import train

# --------------------------------------------------------------------------- the rule


def test_docstring_examples():
    result = doctest.testmod(ab)
    assert result.attempted >= 10 and result.failed == 0


@pytest.mark.parametrize(
    ("b_simple", "batch", "top", "factor", "expected"),
    [
        (64.0, 64, 1024, 1.0, 128),  # exactly f B: grows, to 2B at least
        (63.9, 64, 1024, 1.0, None),
        (511.0, 64, 1024, 1.0, 256),  # the largest power of 2 at or below b / f
        (512.0, 64, 1024, 1.0, 512),
        (1e12, 64, 1024, 1.0, 1024),  # never past the max
        (1e12, 512, 1024, 1.0, 1024),
        (1e12, 1024, 1024, 1.0, None),  # at the max already
        (20.0, 64, 1024, 0.25, 128),  # b / f = 80
        (20.0, 64, 1024, 0.5, None),  # 20 < 0.5 * 64
        (math.inf, 64, 1024, 1.0, None),
        (math.nan, 64, 1024, 1.0, None),
        (-5.0, 64, 1024, 1e-9, None),  # |G|^2 estimated negative: never grows
    ],
)
def test_grown_batch_size(b_simple, batch, top, factor, expected):
    assert ab.grown_batch_size(b_simple, batch, max_batch_size=top, factor=factor) == expected


def test_switch_waits_until_the_examples_fill_whole_new_batches():
    # Decided after step t at B = 16 (16 t examples seen): the first step whose preceding
    # examples are a multiple of B', at most B'/B - 1 steps later.
    for t in range(1, 20):
        for new in (32, 64, 128):
            s = ab.switch_step(16 * t, t, 16, new)
            assert s > t and (s - 1) * 16 % new == 0 and s - (t + 1) <= new // 16 - 1
    with pytest.raises(ValueError, match="multiples of batch_size"):
        ab.switch_step(24, 1, 16, 64)


def test_phases_map_steps_to_contiguous_batches_and_rescale_the_learning_rate():
    phases = [ab.Phase(step=1, batch_size=16, offset=0, learning_rate=1e-3)]
    second = ab.next_phase(phases, decided_after=3, new_batch_size=32, rule="linear")
    assert (second.step, second.offset, second.learning_rate) == (5, 64, 2e-3)
    phases.append(second)
    third = ab.next_phase(phases, decided_after=5, new_batch_size=128, rule="sqrt")
    assert (third.step, third.offset) == (7, 128)  # 96 seen after step 5, then one more of 32
    assert third.learning_rate == pytest.approx(4e-3)
    phases.append(third)
    # Examples before each step at its batch size: one contiguous stream, no gap, no repeat.
    covered = []
    for t in range(1, 12):
        p = ab.phase_at(phases, t)
        first = (ab.data_step(phases, t) - 1) * p.batch_size
        covered += list(range(first, first + p.batch_size))
        assert ab.examples_after(phases, t) == len(covered)
    assert covered == list(range(len(covered)))
    assert ab.phases_from_json(json.loads(json.dumps(ab.phases_to_json(phases)))) == phases
    assert [ab.lr_multiplier(r, 16, 64) for r in ab.LR_RULES] == [2.0, 4.0, 1.0]


def _cfg(*flags: str) -> Config:
    return parse_config(["--workdir", "w", "--batch-size", "16", *flags])


ADAPTIVE = ["--noise-scale-every", "3", "--adaptive-batch", "--max-batch-size", "64"]


def test_a_growth_waits_for_its_step_and_no_second_one_is_decided_meanwhile():
    phases = ab.BatchPhases(_cfg(*ADAPTIVE, "--learning-rate", "1e-3"))
    assert phases.after_measurement(3, 17.0) == {
        "next_batch_size": 32, "next_batch_from_step": 5, "next_learning_rate": 1e-3 * 2**0.5
    }  # fmt: skip
    assert phases.after_measurement(4, 1e9) == {}  # the growth to 32 has not started yet
    assert phases.record(4) == {"batch_size": 16, "examples": 64}
    assert phases.record(5) == {"batch_size": 32, "examples": 96} and phases.starts(5)
    assert phases.data_step(5) == 3
    assert phases.after_measurement(6, 1e9)["next_batch_size"] == 64  # 2 * 32 = max
    assert phases.after_measurement(9, 1e9) == {}  # (decided, not begun)
    resumed = ab.BatchPhases(_cfg(*ADAPTIVE, "--learning-rate", "1e-3"), phases.meta())
    assert resumed.phases == phases.phases
    fixed = ab.BatchPhases(_cfg())  # one batch size: nothing in the checkpoint, never grows
    assert fixed.meta() == {} and fixed.after_measurement(3, 1e9) == {}
    assert fixed.data_step(7) == 7 and fixed.record(7) == {"batch_size": 16, "examples": 112}


def test_shuffled_examples_batched_at_another_size_are_the_same_stream():
    rng = np.random.default_rng(0)
    n = 96
    table = TableSource(
        image=rng.normal(size=(n, 4)).astype(np.float32),
        text=rng.integers(0, 9, size=(n, 3)).astype(np.int32),
        caption_id=np.arange(n, dtype=np.int32),
    )
    small = train_examples("shapes", global_batch_size=8, seed=3, source=table)
    big = dataclasses.replace(small, global_batch_size=32).batches()
    ids = [small.batches()[s]["caption_id"] for s in range(20)]  # crosses an epoch
    for s in range(5):
        np.testing.assert_array_equal(big[s]["caption_id"], np.concatenate(ids[4 * s : 4 * s + 4]))


# --------------------------------------------------------------------------- settings


def test_help_says_the_rule_the_factor_and_the_learning_rate():
    text = " ".join(build_parser().format_help().split())
    assert "--adaptive-batch" in text and "--max-batch-size" in text
    assert "McCandlish et al. 2018 predict the critical batch B_crit ~ B_simple" in text
    assert "5-10x below the fitted B_crit" in text and "sqrt(B'/B)" in text
    assert "m extra gradient computations" in text and "decides when the batch grows" in text
    field = {f.name: f for f in dataclasses.fields(Config().run)}["adaptive_lr"]
    assert field.metadata["choices"] == ab.LR_RULES


def test_identity_at_the_defaults_is_what_older_checkpoints_hold():
    plain = _cfg("--noise-scale-every", "5").identity()
    assert not {"--adaptive-batch", "--max-batch-size", "--adaptive-factor", "--adaptive-lr"} & set(
        plain
    )
    assert "--noise-scale-every" not in plain  # still free to change in a fixed-batch run
    grown = _cfg(*ADAPTIVE).identity()
    changed = differences(plain, grown)
    assert any(c.startswith("--adaptive-batch") for c in changed)
    assert grown["--noise-scale-every"] == 3 and grown["--max-batch-size"] == 64


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--adaptive-batch", "--max-batch-size", "64"],
         "--adaptive-batch grows the batch after the noise scale's measurements: add "
         "--noise-scale-every"),
        (["--adaptive-batch", "--noise-scale-every", "2"],
         "--adaptive-batch needs --max-batch-size"),
        ([*ADAPTIVE[:-1], "48"], "--max-batch-size 48 must be --batch-size 16 times a power of 2"),
        ([*ADAPTIVE[:-1], "16"], "--max-batch-size 16 must be --batch-size 16 times a power"),
        ([*ADAPTIVE, "--train-examples", "40"], "--max-batch-size 64 is more than the --train"),
        (["--max-batch-size", "64"], "--max-batch-size is a setting of --adaptive-batch"),
        (["--adaptive-lr", "linear"], "--adaptive-lr is a setting of --adaptive-batch"),
        (["--adaptive-factor", "0.2"], "--adaptive-factor is a setting of --adaptive-batch"),
        ([*ADAPTIVE, "--adaptive-factor", "0"], "--adaptive-factor must be a positive"),
        ([*ADAPTIVE, "--adaptive-lr", "cubic"], "unknown --adaptive-lr 'cubic'"),
        ([*ADAPTIVE, "--negative-queue", "32"],
         r"--adaptive-batch does not combine with --negative-queue \(its queue"),
        ([*ADAPTIVE, "--stream", "--chunk-size", "16"],
         "--adaptive-batch does not combine with --stream"),
        ([*ADAPTIVE, "--hard-batches"], "--adaptive-batch does not combine with --hard-batches"),
        ([*ADAPTIVE, "--loss", "global-infonce"],
         "--adaptive-batch does not combine with --loss global-infonce"),
    ],
)  # fmt: skip
def test_refused_combinations_are_one_line_before_training(flags, message, tmp_path, capsys):
    argv = ["--workdir", str(tmp_path / "w"), "--batch-size", "16", "--no-progress", *flags]
    with pytest.raises(ConfigError, match=message) as err:
        parse_config(argv)
    assert "\n" not in str(err.value)
    assert train.main(argv) == 2
    out = capsys.readouterr().err.strip().splitlines()
    assert len(out) == 1 and re.search(message, out[0]), out
    assert not (tmp_path / "w").exists()


def test_a_max_batch_beyond_the_training_split_is_one_line_before_training(tmp_path, capsys):
    data_dir = tmp_path / "tfds"
    prepare_digits(data_dir)  # 1438 training examples (no --train-examples to check early)
    argv = ["--workdir", str(tmp_path / "w"), "--data-dir", str(data_dir), "--batch-size", "16",
            *ADAPTIVE[:-1], "2048", "--model", "mlp", "--no-progress"]  # fmt: skip
    assert train.main(argv) == 2
    out = capsys.readouterr().err.strip().splitlines()
    assert len(out) == 1 and "--max-batch-size 2048 is more than the 1438 training" in out[0]
    assert not (tmp_path / "w" / "checkpoints").exists()


# --------------------------------------------------------------------------- real runs

# Locked random features (no image tower to train, no pre-training): steps of a few ms.
# Measured after steps 3 and 6; a tiny factor makes the first measurement grow 16 -> 32,
# decided after step 3 (48 examples), trained from step 5 (64 examples = 2 batches of 32).
RUN = [
    "--dataset", "shapes", "--text-tower", "bag-of-words", "--train-examples", "128",
    "--batch-size", "16", "--steps", "8", "--warmup-steps", "2", "--learning-rate", "2e-3",
    "--eval-examples", "32", "--no-progress", "--num-devices", "2", "--log-every", "1",
    "--checkpoint-every", "2", "--no-tensorboard", "--noise-scale-every", "3",
    "--noise-batches", "2", "--adaptive-batch", "--max-batch-size", "32",
    "--adaptive-factor", "1e-6",
]  # fmt: skip


@pytest.fixture(scope="module")
def features(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("features")
    rng = np.random.default_rng(0)
    np.save(d / "train.npy", rng.normal(size=(128, 8)).astype(np.float32))
    np.save(d / "test.npy", rng.normal(size=(2000, 8)).astype(np.float32))
    return str(d)


def _argv(workdir: Path, features: str, *extra: str) -> list[str]:
    return ["--workdir", str(workdir), "--locked-image", features, *RUN, *extra]


def _records(workdir: Path) -> list[dict]:
    return [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def whole(tmp_path_factory, features) -> tuple[Config, list[dict]]:
    workdir = tmp_path_factory.mktemp("whole")
    cfg = parse_config(_argv(workdir, features))
    loop.train(cfg)
    return cfg, _records(workdir)


def test_the_batch_doubles_at_an_aligned_step_with_the_learning_rate_by_the_rule(whole):
    cfg, records = whole
    by_step = {r["step"]: r for r in records}
    assert sorted(by_step) == list(range(1, 9))
    decided = by_step[3]
    assert decided["noise_b_simple"] > 0
    assert (decided["next_batch_size"], decided["next_batch_from_step"]) == (32, 5)
    assert decided["next_learning_rate"] == pytest.approx(2e-3 * math.sqrt(2))
    assert [by_step[t]["batch_size"] for t in range(1, 9)] == [16] * 4 + [32] * 4
    assert [by_step[t]["examples"] for t in range(1, 9)] == [16, 32, 48, 64, 96, 128, 160, 192]
    assert "next_batch_size" not in by_step[6]  # at the max: measured, no growth
    assert by_step[6]["noise_batches"] == 2
    # The schedule goes on at the optimiser's step count, its peak multiplied by sqrt(2).
    before = make_schedule(cfg.train.optim)
    after = make_schedule(dataclasses.replace(cfg.train.optim, learning_rate=2e-3 * 2**0.5))
    for t in range(1, 9):
        expected = (before if t < 5 else after)(t - 1)
        assert by_step[t]["learning_rate"] == pytest.approx(float(expected), rel=1e-5)
    ckpt = Checkpointer(cfg.run.workdir, every=2)
    try:  # the phases travel with the checkpoints
        assert [p["batch_size"] for p in ckpt.read_meta(4)["batch_phases"]] == [16, 32]
        assert ckpt.read_meta(8)["batch_phases"] == ckpt.read_meta(4)["batch_phases"]
    finally:
        ckpt.close()


@pytest.mark.slow  # about 20 s each
@pytest.mark.parametrize(
    "stop_after",
    [5, 6],  # resumed from checkpoint 4 (growth decided, not begun), and 6 (after it)
)
def test_resume_across_a_growth_gives_identical_losses(whole, features, tmp_path, stop_after):
    _, reference = whole
    loop.train(parse_config(_argv(tmp_path, features, "--stop-after", str(stop_after))))
    loop.train(parse_config(_argv(tmp_path, features)))
    resumed = _records(tmp_path)
    keys = ("step", "loss", "learning_rate", "batch_size", "examples", "noise_b_simple")
    assert [[r.get(k) for k in keys] for r in resumed] == [
        [r.get(k) for k in keys] for r in reference
    ]


@pytest.mark.slow  # about 10 s
def test_a_checkpoint_after_a_growth_is_measured_at_its_own_batch(whole):
    cfg, records = whole
    logged = next(r for r in records if r["step"] == 6)
    est = measure_checkpoint(cfg, step=6, num_batches=2)  # what the meter measured after 6
    assert est.batch_size == 32 == logged["batch_size"]
    np.testing.assert_allclose(est.variance, logged["noise_variance"], rtol=1e-6)
    np.testing.assert_allclose(est.g2, logged["noise_g2"], rtol=1e-6)
    assert measure_checkpoint(cfg, step=4, num_batches=2).batch_size == 16  # before the growth
