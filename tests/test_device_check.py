"""``python -m experiments.device_check`` in its reduced (CPU) size: every part of the report
is there and says what it measured, so that the check is known to work before a GPU is."""

import dataclasses
import json

import jax
import pytest

from experiments import device_check as dc


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("device_check")
    # The whole budget for the losses whatever the machine's load: every case must run.
    rep = dc.run(["--out", str(out), "--budget-s", "1e6"])
    return rep, out


@pytest.mark.slow
def test_report_records_the_machine_and_every_part(report):
    rep, out = report
    assert json.loads((out / "device_check.json").read_text()) == rep
    assert rep["reduced"] and rep["errors"] == {}
    stack = rep["stack"]
    assert stack["packages"]["jax"] == jax.__version__ and stack["cpu"]
    assert stack["device_kind"] == jax.devices()[0].device_kind and stack["backend"] == "cpu"
    assert set(rep["section_seconds"]) == {"planner", "losses", "streamed"}
    md = (out / "device_check.md").read_text()
    for title in ("Planner against the device", "Tiled losses", "Streamed step"):
        assert f"## {title}" in md
    assert "Failed" not in md


@pytest.mark.slow
def test_planner_part_brackets_the_limit_and_runs_the_planned_step(report):
    p = report[0]["planner"]
    limit, batch, chunk = p["memory_limit_bytes"], p["planned_batch"], p["chunk_size"]
    assert batch is not None and batch >= chunk and batch % chunk == 0
    points = {int(b): v for b, v in p["planner_points"].items()}
    assert p["predicted_peak_bytes"] == points[batch] <= limit
    assert points[batch + chunk] > limit  # the next batch the search compiled does not fit
    # On the CPU the device's compiler is XLA:CPU itself: the same figure; no allocator stats.
    assert p["device_compiled_bytes"] == p["predicted_peak_bytes"]
    assert p["measured_peak_bytes"] is None and p["measured"].startswith("not available")
    assert p["loss_finite"] is True
    assert "| not available |" in (report[1] / "device_check.md").read_text()


@pytest.mark.slow
def test_loss_part_times_every_loss_dtype_and_batch_beside_dense(report):
    rep = report[0]
    sizes = dc.REDUCED
    assert set(rep["matmul"]) == {"bfloat16", "float32"}
    assert all(m["flops_per_s"] > 0 and m["n"] == sizes.matmul for m in rep["matmul"].values())
    got = {(r["batch"], r["dtype"], r["loss"]) for r in rep["losses"]}
    assert got == {(b, d, n) for b in sizes.batches for d in dc.DTYPES for n in dc.LOSS_NAMES}
    for r in rep["losses"]:
        assert "skipped" not in r and r["tiled_s"] > 0 and r["dim"] == sizes.dim
        share = r["tiled_tflops"] * 1e12 / rep["matmul"][r["dtype"]]["flops_per_s"]
        assert share == pytest.approx(r["tiled_share_of_matmul"])
        # Dense fits the reduced cap at these sizes: timed beside the tiled loss.
        assert r["dense_s"] > 0 and r["tiled_over_dense"] == pytest.approx(
            r["tiled_s"] / r["dense_s"]
        )


@pytest.mark.slow
def test_streamed_part_compares_with_the_in_memory_step(report):
    st = report[0]["streamed"]
    steps = [r["step"] for r in st["rows"]]
    assert steps[0] == "in-memory" and st["rows"][0]["vs_in_memory"] == 1.0
    assert any("prefetch on" in s for s in steps) and any("prefetch off" in s for s in steps)
    for r in st["rows"][1:]:
        assert r["median_s"] > 0 and r["max_rel_diff_loss_grad_norm"] < 1e-4
    assert st["target"]["ratio"] == pytest.approx(st["rows"][1]["vs_in_memory"])
    # The benchmark's own file in the run directory records the stack as well.
    own = json.loads((report[1] / "streamed" / "bench_streamed.json").read_text())
    assert own["rows"] == st["rows"] and own["stack"] == report[0]["stack"]


def test_a_case_that_would_overrun_the_budget_is_skipped_and_says_so():
    sizes = dataclasses.replace(dc.REDUCED, batches=(64, 128), matmul=64, repeats=1)
    rates, rows = dc.time_losses(sizes, jax.devices()[0], budget_s=0.0)
    assert set(rates) == set(dc.DTYPES) and len(rows) == 2 * 2 * 3
    assert all(r["skipped"] == "no time left of --budget-s" for r in rows)
    assert "skipped: no time left" in "\n".join(dc._losses_md(rates, rows))


def test_bad_plan_memory_is_one_line_before_any_work(tmp_path, capsys):
    assert dc.main(["--plan-memory", "lots", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: --plan-memory 'lots': give a")
    assert not (tmp_path / "o").exists()
