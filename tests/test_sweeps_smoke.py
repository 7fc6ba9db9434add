"""Smoke test of the memory sweep and the ring benchmark: tiny sizes, every output written."""

from __future__ import annotations

import json

import pytest

from experiments import bench_ring, sweep_memory


@pytest.mark.slow
def test_memory_sweep_and_ring_bench_write_their_results(tmp_path, capsys):
    argv = ["--batch", "256", "1024", "--dim", "16", "--block-size", "128",
            "--methods", "dense,tiled,ring,gathered", "--time-max-batch", "256",
            "--repeats", "1", "--fit", "ring", "--fit-quantum", "256",
            "--fit-tol", "0.1", "--budget-gib", str(1 / 1024), "--out", str(tmp_path)]  # fmt: skip
    rows = sweep_memory.run(argv)
    for ext in ("csv", "json", "md", "png"):
        assert (tmp_path / f"memory_sweep.{ext}").stat().st_size > 0
    temp = {(r["method"], r["batch"]): r["temp_bytes"] for r in rows}
    assert temp[("tiled", 1024)] < temp[("dense", 1024)]
    assert temp[("ring", 1024)] < temp[("dense", 1024)]
    assert {r["time_s"] is not None for r in rows if r["batch"] == 256} == {True}
    fit = json.loads((tmp_path / "memory_sweep.json").read_text())["largest_batch"]
    assert [f["method"] for f in fit] == ["ring"] and fit[0]["largest_batch"] >= 1024
    printed = capsys.readouterr().out
    assert "| infonce | ring | 8 |" in printed and f"to {tmp_path}" in printed

    ring_dir = tmp_path / "ring"
    rows = bench_ring.run(["--time-batch", "256", "--memory-batch", "1024", "--dim", "16",
                            "--repeats", "1", "--out", str(ring_dir)])  # fmt: skip
    for ext in ("json", "md"):
        assert (ring_dir / f"bench_ring.{ext}").stat().st_size > 0
    assert [r["batch"] for r in rows] == [256, 1024]
    assert rows[0]["ring_s"] > 0 and rows[1]["ring_s"] is None
    assert rows[1]["ring_temp_bytes"] < rows[1]["gathered_temp_bytes"]
