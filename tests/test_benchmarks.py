"""The benchmarks run end to end at toy sizes; the loss benchmark judges rows by the issue."""

import json

import pytest

from experiments import bench_losses


@pytest.mark.slow
def test_bench_losses_writes_every_case(tmp_path):
    argv = ["--batch", "40", "--dim", "8", "--repeats", "1", "--matmul-size", "64"]
    rows = bench_losses.run([*argv, "--block-size", "16", "--out", str(tmp_path)])
    assert [r["loss"] for r in rows] == [
        name + "".join(f" {k}={v}" for k, v in opts.items()) for name, opts in bench_losses.CASES
    ]
    for r in rows:
        assert r["dense_s"] > 0 and r["tiled_s"] > 0 and r["matmul_gflops"] > 0
        assert r["tiled_temp_mib"] > 0 and isinstance(r["meets_targets"], bool)
    table = (tmp_path / "bench_losses.md").read_text()
    assert table.count("\n| 40 |") == len(bench_losses.CASES)
    assert (tmp_path / "bench_losses.json").stat().st_size > 0


def test_targets_follow_the_issue_bounds():
    def row(batch, ratio, fraction):
        return {"batch": batch, "tiled_over_dense": ratio, "fraction_of_matmul": fraction}

    assert bench_losses.meets_targets(row(8192, 1.09, 0.8))
    assert not bench_losses.meets_targets(row(8192, 1.11, 0.8))
    assert bench_losses.meets_targets(row(16384, 1.0, 0.75))
    assert not bench_losses.meets_targets(row(16384, 1.01, 0.9))
    assert not bench_losses.meets_targets(row(16384, 0.5, 0.74))
    assert bench_losses.meets_targets(row(2048, 3.0, 0.8))  # small batches: rate bound only


def test_tile_product_forms_agree(tmp_path):
    from experiments import bench_tile_products

    argv = ["--tile", "32", "--dim", "8", "--count", "3", "--repeats", "1", "--out", str(tmp_path)]
    out = bench_tile_products.run(argv)
    assert (tmp_path / "bench_tile_products.json").stat().st_size > 0
    assert out["max_abs_difference"] < 1e-4
    assert out["transposed"]["gflops"] > 0 and out["row-contraction"]["gflops"] > 0


def test_alternating_times_time_every_call_in_turn():
    from experiments.common import benchmarking

    calls = []
    fns = [lambda: calls.append("a"), lambda: calls.append("b")]
    times = benchmarking.alternating_times(fns, repeats=3, settle=lambda: calls.append("s"))
    # One untimed warm-up call each, then rounds of (settle, a), (settle, b).
    assert calls == ["a", "b"] + ["s", "a", "s", "b"] * 3
    assert [len(t) for t in times] == [3, 3] and all(w >= 0 for t in times for w, _ in t)
    assert len(benchmarking.median_seconds(fns, repeats=1)) == 2


def test_formatting_and_memory_analysis():
    import jax
    import jax.numpy as jnp

    from experiments.common import benchmarking

    assert benchmarking.fmt_bytes(1536) == "1.5 KiB" and benchmarking.fmt_bytes(None) == "-"
    assert benchmarking.fmt_batch(2**20) == "1M" and benchmarking.fmt_batch(1000) == "1000"
    # A donated (1000,) float32 argument written in place: counted once in the total.
    f = jax.jit(lambda a, b: (a * 2, b.sum()), donate_argnums=(0,))
    spec = jax.ShapeDtypeStruct((1000,), jnp.float32)
    m = benchmarking.compiled_memory(f, spec, jax.ShapeDtypeStruct((10,), jnp.float32))
    assert m["argument_bytes"] == 4040 and m["alias_bytes"] == 4000
    assert m["total_bytes"] == m["temp_bytes"] + 4040 + m["output_bytes"] - 4000


@pytest.mark.slow  # two steps compiled: ~15 s on a quiet 2-core machine, 40 s on a busy one
def test_bench_streamed_times_every_case_and_agrees_with_the_in_memory_step(tmp_path):
    from experiments import bench_streamed

    argv = ["--devices", "2", "--batch", "64", "--chunk", "16", "--width", "16",
            "--input-dim", "8", "--repeats", "1", "--read-latency-ms", "0,1"]  # fmt: skip
    out = bench_streamed.run([*argv, "--out", str(tmp_path)])
    rows = {r["step"]: r for r in out["rows"]}
    assert list(rows) == ["in-memory"] + [
        f"streamed, prefetch {p}, {ms} ms/read" for ms in (0, 1) for p in ("on", "off")
    ]
    assert rows["in-memory"]["vs_in_memory"] == 1.0
    for name, r in rows.items():
        assert r["median_s"] > 0 and r["vs_in_memory"] > 0
        if name != "in-memory":
            # Two towers: each of the 4 chunks read once per pass; the same loss and
            # gradient norm as the in-memory step (float32 rounding).
            assert r["reads_per_step"] == 8 and r["max_rel_diff_loss_grad_norm"] < 1e-5
            assert r["latency_per_step_s"] == 8 * r["read_latency_ms"] / 1e3
    target = out["target"]
    assert target["case"] == "streamed, prefetch on, 0 ms/read"
    assert target["met"] == (target["ratio"] <= 1.25)
    table = (tmp_path / "bench_streamed.md").read_text()
    assert table.count("\n| streamed, prefetch") == 4 and "Target (issue 19)" in table
    assert json.loads((tmp_path / "bench_streamed.json").read_text())["rows"] == out["rows"]


def test_bench_streamed_latency_flag_is_one_line():
    import argparse

    from experiments import bench_streamed

    assert bench_streamed.latency_list("0, 2.5") == [0.0, 2.5]
    for bad in ("zzz", "-1", "", "nan"):
        with pytest.raises(argparse.ArgumentTypeError, match="0,10"):
            bench_streamed.latency_list(bad)
