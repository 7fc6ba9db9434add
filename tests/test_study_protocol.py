"""The batch-size study's protocol (version 2) on its own: the fit in log space against an
independent reference on noisy steps, censoring, the seed bootstrap, the self-extending rate
grid, the target rule, the reproduction check and the flags refused before any run."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from experiments import batch_size_study
from experiments.study import protocol as P
from experiments.study.fitting import fit_cells, fit_log, geometric_mean
from experiments.study.steps_to_target import compare, summarise
from experiments.study.targets import choose_targets, margins, plateau
from experiments.study.tuning import choose, end_status, next_exponent


def _reference_fit(b: np.ndarray, s: np.ndarray) -> tuple[float, float]:
    """An independent fit: a dense grid over (log S_min, log E_min), refined twice."""
    y = np.log(s)
    lo_a, hi_a = math.log(s.min()) - 6, math.log(s.max())
    lo_c, hi_c = math.log(s.min() * b.min()) - 6, math.log(s.max() * b.max()) + 2
    for _ in range(4):
        a = np.linspace(lo_a, hi_a, 161)[:, None, None]
        c = np.linspace(lo_c, hi_c, 161)[None, :, None]
        cost = ((np.log(np.exp(a) + np.exp(c) / b) - y) ** 2).sum(-1)
        i, j = np.unravel_index(np.argmin(cost), cost.shape)
        best_a, best_c = float(a[i, 0, 0]), float(c[0, j, 0])
        da, dc = (hi_a - lo_a) / 16, (hi_c - lo_c) / 16
        lo_a, hi_a, lo_c, hi_c = best_a - da, best_a + da, best_c - dc, best_c + dc
    return math.exp(best_a), math.exp(best_c)


@settings(max_examples=25, deadline=None)
@given(
    s_min=st.floats(20, 2000),
    b_crit=st.floats(64, 8192),
    noise=st.floats(0.05, 0.4),
    seed=st.integers(0, 2**16),
)
def test_log_fit_matches_an_independent_reference_on_noisy_steps(s_min, b_crit, noise, seed):
    rng = np.random.default_rng(seed)
    b = np.array([32.0, 128, 512, 2048, 8192])
    s = s_min * (1 + b_crit / b) * np.exp(rng.normal(0, noise, len(b)))
    fit = fit_log(list(zip(b, s, strict=True)))
    ref_a, ref_c = _reference_fit(b, s)

    def cost(a: float, c: float) -> float:
        return float(((np.log(a + c / b) - np.log(s)) ** 2).sum())

    # Both minimise the same cost; ours must be at least as low (the grid is approximate).
    assert cost(fit["s_min"], fit["e_min"]) <= cost(ref_a, ref_c) + 1e-9
    assert fit["rms_log_residual"] == pytest.approx(math.sqrt(cost(fit["s_min"], fit["e_min"]) / 5))
    assert fit["ratios"] == pytest.approx(list(s / (fit["s_min"] + fit["e_min"] / b)))


def test_a_10x_miss_is_seen_in_the_ratios_and_the_fit_says_it_does_not_describe_the_curve():
    sizes = [32, 128, 512, 2048]
    steps = [1000 * (1 + 512 / b) for b in sizes]
    steps[0] *= 10  # the plateau crossing the review found: a 10x outlier at the smallest B
    cells = [
        {"batch_size": b, "steps": [s] * 3, "cap": 10**9} for b, s in zip(sizes, steps, strict=True)
    ]
    fit = fit_cells(cells, resamples=20)
    assert any(p["flagged"] for p in fit["points"])
    assert fit["describes"] is False


def test_intervals_cover_the_truth_about_as_often_as_they_say_and_shrink_with_less_noise():
    """Over 24 simulated studies of 5 seeds a cell, the 90 % interval of B_crit holds the true
    value in at least 80 % (a plain percentile bootstrap of 5 seeds held it in about 70 %:
    the small-sample scaling of the resamples is what this pins), and its width follows the
    seeds' noise."""
    rng = np.random.default_rng(3)
    sizes = [64, 256, 1024, 4096]
    widths = {}
    for noise in (0.05, 0.2):
        hits, w = 0, []
        for r in range(24):
            cells = [{"batch_size": b, "steps": list(500 * (1 + 400 / b)
                      * np.exp(rng.normal(0, noise, 5))), "cap": 10**9} for b in sizes]  # fmt: skip
            lo, hi = fit_cells(cells, resamples=150, seed=r)["b_crit_interval"]
            hits += lo < 400 < hi
            w.append(math.log(hi / lo))
        assert hits / 24 >= 0.8, (noise, hits)
        widths[noise] = float(np.median(w))
    assert widths[0.05] < widths[0.2] / 2


def test_censored_cells_are_bounds_outside_the_fit_and_a_contradicting_fit_is_flagged():
    sizes = [64, 256, 1024, 4096]
    cells = [{"batch_size": b, "steps": [100 * (1 + 512 / b)] * 3, "cap": 10**6} for b in sizes]
    # B = 32: one seed hit its cap of 50,000 steps; the model predicts 1,700.
    cells.append({"batch_size": 32, "steps": [40_000, None, 45_000], "cap": 50_000})
    fit = fit_cells(cells, resamples=20)
    assert fit["batch_sizes"] == sizes  # the censored cell is not fitted
    assert fit["s_min"] == pytest.approx(100, rel=1e-6)
    (bound,) = fit["censored"]
    assert bound["batch_size"] == 32
    assert bound["bound"] == pytest.approx(geometric_mean([40_000, 50_000, 45_000]))
    assert bound["contradicted"] and fit["describes"] is False


def _tune_rows(steps_by_exponent: dict[int, int | None], target: float = 4.0) -> list[dict]:
    return [{"exponent": k, "steps_to": {str(target): s}, "error": None}
            for k, s in steps_by_exponent.items()]  # fmt: skip


def test_the_grid_runs_its_base_then_extends_while_the_choice_is_at_an_end():
    base = (-1, 0, 1)
    assert next_exponent([], [4.0], base=base) == -1
    rows = _tune_rows({-1: 300, 0: 200, 1: 100})  # fastest at the top end
    assert next_exponent(rows, [4.0], base=base) == 2
    rows = _tune_rows({-1: 300, 0: 200, 1: 100, 2: 150})  # the rate beyond is slower
    assert next_exponent(rows, [4.0], base=base) is None
    assert choose(rows, [4.0])["4.0"] == {
        "exponent": 1, "steps": 100, "runner_up": {"exponent": 2, "steps": 150}
    }  # fmt: skip
    assert end_status(rows, [4.0]) == {"4.0": "interior"}
    low = _tune_rows({-1: 90, 0: 200, 1: 300})  # fastest at the bottom end
    assert next_exponent(low, [4.0], base=base) == -2


def test_the_grid_stops_at_a_diverged_rate_and_at_its_limit():
    base = (-1, 0, 1)
    rows = _tune_rows({-1: 300, 0: 200, 1: 100}) + [
        {"exponent": 2, "steps_to": {"4.0": None}, "error": "diverged"}
    ]
    assert next_exponent(rows, [4.0], base=base) is None
    assert end_status(rows, [4.0]) == {"4.0": "interior (the rate above diverged)"}
    steps = {k: 1000 - 100 * k for k in range(-1, 2 + P.MAX_EXTENSIONS)}  # always faster
    rows = _tune_rows(steps)
    assert next_exponent(rows, [4.0], base=base) is None  # 1 + MAX_EXTENSIONS reached
    assert end_status(rows, [4.0]) == {"4.0": "at the grid limit"}


def test_a_missed_target_counts_as_infinitely_many_steps_and_ties_go_to_the_smaller_rate():
    rows = _tune_rows({-1: 200, 0: 200, 1: None})
    assert choose(rows, [4.0])["4.0"]["exponent"] == -1
    assert choose(_tune_rows({0: None, 1: None}), [4.0])["4.0"]["exponent"] is None


def test_targets_clear_every_plateau_by_the_margin_and_margins_are_reported():
    rng = np.random.default_rng(0)
    cells = []
    for b, level in ((64, 4.2), (256, 3.9), (1024, 3.8)):
        steps = list(range(10, 1001, 10))
        curve = [[s, level + 2.0 * math.exp(-s / 100) + rng.normal(0, 0.01)] for s in steps]
        cells.append({"loss": "infonce", "batch_size": b, **plateau(curve, 1000)})
    chosen = choose_targets(cells)
    harder, easier = chosen["targets"]
    assert chosen["binding"] == {"loss": "infonce", "batch_size": 64}
    assert easier == pytest.approx(harder + P.EASIER_OFFSET)
    assert harder == pytest.approx(round(harder / P.TARGET_STEP) * P.TARGET_STEP)
    rows = margins(cells, chosen["targets"])
    assert all(m["clears"] and m["margin_sd"] >= P.MARGIN_SD for m in rows)
    assert min(m["margin_sd"] for m in rows if m["target"] == harder) < 10  # the binding cell
    # A plateau above a given target is a cell that cannot clear it.
    assert not margins(cells, [4.0])[0]["clears"]


def test_the_tuning_seed_never_enters_a_reported_mean():
    target = 4.0
    tuning = {("infonce", 64): _tune_rows({-1: 130, 0: 110, 1: 150})}
    for r in tuning[("infonce", 64)]:
        r.update(loss="infonce", batch_size=64, seed=0, stage="tune")
    seeds = [{"loss": "infonce", "batch_size": 64, "seed": s, "exponent": 0,
              "steps_to": {str(target): 210 + 10 * s}} for s in (1, 2, 3)]  # fmt: skip
    (cell,) = summarise(["infonce"], [64], [target], tuning, seeds, {("infonce", 64): 1000})
    assert cell["seeds"] == [1, 2, 3]
    assert cell["steps"] == [210, 220, 230]  # after the 10 warm-up steps
    assert cell["geomean"] == pytest.approx(geometric_mean([210, 220, 230]))
    assert cell["tuning_steps"] == 100 and cell["runner_up"] == {"exponent": -1, "steps": 120}
    lo, hi = cell["interval"]
    assert lo < cell["geomean"] < hi and hi / lo < 1.2


def test_the_reproduction_check_counts_standard_errors():
    same = compare([100, 120, 110, 90, 105], [101, 118, 112, 92, 104], cap=1000)
    assert same["within_noise"] and abs(same["z"]) < 1
    far = compare([100, 120, 110, 90, 105], [300, 330, 310, 290, 320], cap=1000)
    assert not far["within_noise"] and far["ratio"] == pytest.approx(2.88, rel=0.05)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--batch-sizes", "0"], "at least 2 pairs"),
        (["--tune", "--batch-sizes", "-64"], "at least 2 pairs"),
        (["--tune", "--seeds", "1,1"], "repeats a value"),
        (["--tune", "--seeds", "0,1"], "tunes the rates"),
        (["--pilot-steps", "50"], "add --tune"),
        (["--tune", "--losses", "cosine"], "unknown loss"),
        (["--update-results"], "publishes nothing"),
        (["--tune", "--batch-sizes", "64,256", "--update-results"], "protocol's own settings"),
        (
            ["--batch-sizes", "63", "--rates", "{tmp}/v2.json"],
            "no chosen rate for infonce at B = 63: its batch sizes are 64",
        ),
        (["--rates", "{tmp}/study.json"], "not a tuned study of protocol version"),
        (["--rates", "{tmp}/missing.json"], "cannot read a study (FileNotFoundError)"),
        (
            ["--seeds", "2,7", "--batch-sizes", "64", "--rates", "{tmp}/v2.json"],
            "--seeds 7 is not a seed of the",
        ),
        (["--noise-scale", "--seeds", "1", "--rates", "{tmp}/v2.json"], "add --tune"),
    ],
)
def test_bad_study_flags_are_one_line_before_any_run(flags, message, tmp_path, capsys):
    (tmp_path / "study.json").write_text("[]")
    cell = {"batch_size": 64, "target": 4.0, "learning_rate": 1e-3, "exponent": -1,
            "steps": [100] * 5, "cap": 400}  # fmt: skip
    summary = [{"loss": x, **cell} for x in ("infonce", "sigmoid", "decoupled")]
    v2 = {"protocol_version": P.VERSION, "complete": True, "targets": {"targets": [4.0, 4.5]},
          "summary": summary}  # fmt: skip
    (tmp_path / "v2.json").write_text(json.dumps(v2))
    flags = [f.format(tmp=tmp_path) for f in flags]
    out = tmp_path / "out"
    assert batch_size_study.main([*flags, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not out.exists()  # refused before the run directory exists


def _fake_train(calls: list, pace: float = 1.0):
    """A stand-in for :func:`contrastive.run.loop.train` with known curves: on validation the rule's
    rate (2^0) learns fastest, on the test split 2^1 does; seed 3 at B = 32 is 100x slower.
    Logs what the loop logs at each evaluation of the geometric schedule and stops at its
    ``--stop-at`` target, as the loop does."""
    from contrastive.configs import parse_stop_at
    from contrastive.run.loop import geometric_steps

    def train(cfg):
        r = cfg.run
        b, lr, seed = r.batch_size, cfg.train.optim.learning_rate, r.seed
        k = round(math.log2(lr / P.rule_rate(b)))
        calls.append((b, k, seed))
        speed = pace * b / 32 * math.exp(-(k**2) / 2) * (0.01 if (b, seed) == (32, 3) else 1.0)
        test_speed = b / 32 * math.exp(-((k - 1) ** 2) / 2)
        wobble = 1 + 0.05 * ((seed * 7919) % 5 - 2) / 2  # a seed's own pace, within 5 %
        plateau = 3.0 + 64 / b  # small batches level off higher

        def curve(step: int, pace: float) -> float:
            return plateau + 4.0 * math.exp(-step * pace * wobble / 40)

        target = parse_stop_at(r.stop_at)
        records = []
        for step in sorted(geometric_steps(P.EVAL_GROWTH, cfg.steps) | {cfg.steps}):
            val = curve(step, speed)
            rec = {
                "step": step,
                "elapsed_s": 0.01 * step,
                "val_zero_shot_xent": val,
                "val_zero_shot_top1": 1 / val,
                "zero_shot_xent": curve(step, test_speed),
            }
            records.append(rec)
            if target and rec[target[0]] <= target[1]:
                rec["reached_target"] = f"{target[0]}<={target[1]:g}"
                break
        return records

    return train


@pytest.mark.slow  # a whole toy study with a stand-in trainer
def test_the_whole_protocol_reads_validation_and_reports_censored_cells(tmp_path, monkeypatch):
    """The study end to end with a stand-in trainer whose validation and test metrics prefer
    different rates: the targets come from the pilots, the grid extends to bracket the best
    rate, every choice and every curve read validation, the tuning seed is in no mean, and a
    cell with a seed that hit its cap is a lower bound outside the fit."""
    from experiments.study import runs

    calls: list = []
    monkeypatch.setattr(runs, "train", _fake_train(calls))
    monkeypatch.setattr(P, "BOOTSTRAP_RESAMPLES", 100)  # the logic, not the intervals' width
    out = tmp_path / "study"
    argv = ["--tune", "--losses", "infonce", "--batch-sizes", "32,64,128,256",
            "--train-examples", "4096", "--pilot-steps", "400", "--rate-exponents=1,2",
            "--seeds", "1,2,3", "--out", str(out)]  # fmt: skip
    assert batch_size_study.main(argv) == 0
    record = json.loads((out / "batch_size_study.json").read_text())
    assert record["protocol_version"] == P.VERSION and record["complete"]
    harder, easier = record["targets"]["targets"]
    assert record["targets"]["binding"] == {"loss": "infonce", "batch_size": 32}
    assert harder > 3.0 + 64 / 32  # above the highest plateau
    for p in record["summary"]:
        assert p["exponent"] == 0, p  # validation's best, never the test split's (1)
        assert p["end_status"].startswith("interior")
        assert p["grid"] == [-1, 0, 1, 2]  # extended twice below the base grid (1, 2)
        assert p["seeds"] == [1, 2, 3] and 0 not in p["seeds"]
    tuned = sorted({(b, k) for b, k, seed in calls if seed == 0 and k is not None})
    assert {k for _, k in tuned} == {-1, 0, 1, 2}
    slow = [p for p in record["summary"] if p["batch_size"] == 32]
    assert all(p["censored"] == 1 and "lower_bound" in p and "geomean" not in p for p in slow)
    for f in record["fits"]:
        assert f["batch_sizes"] == [64, 128, 256]
        assert [c["batch_size"] for c in f["censored"]] == [32]
        assert f["b_crit_interval"] is None or f["b_crit_interval"][0] <= f["b_crit_interval"][1]
    md = (out / "batch_size_study.md").read_text()
    assert ">= " in md and "Verdicts" in md and f"{harder:g}" in md
    assert (out / "batch_size_study.png").stat().st_size > 0
    # Resumed: every row is read back, nothing trains again.
    calls.clear()
    assert batch_size_study.main(argv) == 0
    assert calls == []


def test_a_second_process_on_the_same_loss_and_out_is_refused_in_one_line(tmp_path, capsys):
    """A study owns its --out per loss: while one process trains infonce there, another that
    asks for infonce stops at once (it never meets the first one's busy runs and never
    records them as failures), and one that trains another loss is let through."""
    from experiments.study.harness import loss_locks

    out = tmp_path / "study"
    argv = ["--tune", "--losses", "infonce,sigmoid", "--run-losses", "infonce",
            "--batch-sizes", "32,64", "--train-examples", "1024", "--out", str(out)]  # fmt: skip
    with loss_locks(out, ["infonce"]):  # the first process, busy
        assert batch_size_study.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1] == (
            f"error: another process is training infonce's runs in {out}: wait for it, or give "
            "this one other --run-losses (or another --out)"
        )
        assert not (out / "rows").exists() or not any((out / "rows").iterdir())
        with loss_locks(out, ["sigmoid"]):  # other losses are free to take
            pass


def test_a_run_stopped_by_a_signal_stops_the_study_with_exit_130(tmp_path, monkeypatch, capsys):
    """SIGINT/SIGTERM during a run: the run saved its checkpoint and returned early; the study
    says so in one line and exits 130 (not 0: the study did not finish)."""
    from experiments.study import runs

    monkeypatch.setattr(runs, "train", lambda cfg: [{"step": 1, "elapsed_s": 0.1}])
    argv = ["--tune", "--losses", "infonce", "--batch-sizes", "32,64", "--train-examples",
            "1024", "--out", str(tmp_path / "study")]  # fmt: skip
    assert batch_size_study.main(argv) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert "stopped before its last step" in err[-1] and "same --out to resume" in err[-1]


# --- the noise stage: B_simple beside B_crit ------------------------------------------------
def test_the_noise_stage_pools_seeds_before_dividing():
    from experiments.study.noise_scale import pooled

    # One seed with a tiny |G|^2 dominates the mean of ratios, not the ratio of means.
    r = pooled([100.0, 100.0, 100.0], [1.0, 1.0, 0.01], resamples=500)
    assert r["b_simple"] == pytest.approx(300.0 / 2.01)
    assert r["interval"][0] <= r["b_simple"] <= r["interval"][1]
    assert pooled([1.0, 2.0], [-1.0, 0.5])["b_simple"] is None  # mean |G|^2 <= 0: no ratio


@pytest.mark.parametrize(
    ("b_simple", "b_crit", "bound", "answer"),
    [
        ((300.0, 900.0), (400.0, 500.0), None, "within 2x"),  # inside [200, 1000]
        ((2000.0, 4000.0), (400.0, 500.0), None, "not within 2x"),  # above 2 x 500
        ((10.0, 150.0), (400.0, 500.0), None, "not within 2x"),  # below 400 / 2
        ((150.0, 900.0), (400.0, 500.0), None, "not resolved at this precision"),  # straddles
        ((300.0, 900.0), None, None, "not resolved at this precision"),
        ((300.0, 900.0), (400.0, 500.0), {"side": ">", "batch_size": 4096},
         "not resolved at this precision"),  # B_crit only bounded
    ],
)  # fmt: skip
def test_the_noise_verdict_follows_from_the_intervals(b_simple, b_crit, bound, answer):
    from experiments.study.noise_scale import verdict

    c = {"loss": "infonce", "target": 3.0, "batch_size": 256,
         "measure": {"phase": "middle", "b_simple": sum(b_simple) / 2, "interval": b_simple},
         "fit": {"b_crit": 450.0, "b_crit_interval": b_crit, "b_crit_bound": bound}}  # fmt: skip
    assert verdict(c)["answer"] == answer


def test_the_noise_stage_compares_the_checkpoint_nearest_each_target():
    from experiments.study.noise_scale import _comparisons, schedule

    k, steps = schedule(80.0)  # 90 steps with the warm-up: checkpoints at 30, 60, 90
    assert (k, steps) == (30, 90)
    phases = zip(("early", "middle", "at the harder target"), (30, 60, 90), strict=True)
    summary = [{"loss": "infonce", "batch_size": 256, "phase": ph, "step": st, "b_simple": 1.0,
                "interval": (1.0, 1.0)} for ph, st in phases]  # fmt: skip
    study = {
        "fits": [{"loss": "infonce", "target": t, "b_crit": 1.0} for t in (3.0, 3.5)],
        "summary": [{"loss": "infonce", "batch_size": 256, "target": 3.0, "geomean": 80.0},
                    {"loss": "infonce", "batch_size": 256, "target": 3.5, "geomean": 45.0}],
    }  # fmt: skip
    got = {c["target"]: c["measure"]["phase"] for c in _comparisons(summary, study)}
    assert got == {3.0: "at the harder target", 3.5: "middle"}  # 90 and 55 -> 60


@pytest.mark.slow  # a toy study and two main jobs with a stand-in trainer
def test_the_main_job_reruns_the_committed_seeds_and_checks_them_one_by_one(tmp_path, monkeypatch):
    """The main job's default reruns every seed of a committed five-seed study, compares each
    cell in units of the seeds' standard error and says whether every rerun seed took exactly
    its committed steps; ``--seeds`` reruns some of them; a trainer whose pace moved (another
    machine) is no longer identical."""
    from experiments.study import runs

    monkeypatch.setattr(runs, "train", _fake_train([]))
    monkeypatch.setattr(P, "BOOTSTRAP_RESAMPLES", 50)
    toy = ["--losses", "infonce", "--batch-sizes", "64,128", "--train-examples", "4096"]
    tuned = tmp_path / "tuned"
    argv = [*toy, "--tune", "--pilot-steps", "400", "--rate-exponents=-1,0,1",
            "--seeds", "1,2,3,4,5", "--out", str(tuned)]  # fmt: skip
    assert batch_size_study.main(argv) == 0
    rates = str(tuned / "batch_size_study.json")
    calls: list = []
    monkeypatch.setattr(runs, "train", _fake_train(calls))
    assert batch_size_study.main([*toy, "--rates", rates, "--out", str(tmp_path / "a")]) == 0
    record = json.loads((tmp_path / "a" / "batch_size_study_main.json").read_text())
    assert record["seeds"] == list(P.MAIN_JOB_SEEDS) == [1, 2, 3, 4, 5]
    assert sorted({seed for _, _, seed in calls}) == [1, 2, 3, 4, 5]
    assert record["identical"] and record["reproduces"]
    assert all(c["now"] == c["committed"] and c["z"] == 0.0 for c in record["comparison"])

    # The same curves 10 % slower: another machine, whose seeds part from the committed ones.
    monkeypatch.setattr(runs, "train", _fake_train([], pace=0.9))
    argv = [*toy, "--rates", rates, "--seeds", "4,5", "--out", str(tmp_path / "b")]
    assert batch_size_study.main(argv) == 0
    record = json.loads((tmp_path / "b" / "batch_size_study_main.json").read_text())
    assert record["seeds"] == [4, 5] and not record["identical"]
    md = (tmp_path / "b" / "batch_size_study_main.md").read_text()
    assert "cells took exactly the committed steps" in md
