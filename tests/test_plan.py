"""The planner on the toy CLIP config: the JSON line, and the answer is the edge of what fits."""

from __future__ import annotations

import json

import pytest

from experiments import plan


@pytest.mark.slow
def test_plan_finds_the_largest_batch_that_fits(tmp_path, capsys):
    limit = 48 * 2**20
    argv = ["--model", "vit-tiny", "--devices", "2", "--memory", "48MiB", "--cached-only",
            "--out", str(tmp_path)]  # fmt: skip
    final = plan.run(argv)
    lines = capsys.readouterr().out.strip().splitlines()
    assert json.loads(lines[-1]) == final
    assert set(final) >= {"model", "devices", "memory_limit_bytes", "largest_global_batch",
                          "per_device_bytes", "chunk_size"}  # fmt: skip
    assert (final["model"], final["devices"], final["memory_limit_bytes"]) == ("vit-tiny", 2, limit)
    assert final["chunk_size"] == plan.CHUNK_ROWS["vit-tiny"] * 2
    (record,) = json.loads((tmp_path / "plan.json").read_text())["records"]
    best, q = record["largest_global_batch"], record["quantum"]
    assert best == final["largest_global_batch"] and best % q == 0 and q == final["chunk_size"]
    # The answer was compiled and fits; one quantum more was compiled and does not.
    points = {int(b): t for b, t in record["points"].items()}
    assert points[best] == final["per_device_bytes"] <= limit < points[best + q]
    assert record["compiles"] <= 8
    assert "| vit-tiny | cached" in (tmp_path / "plan.md").read_text()


def test_plan_arguments_are_checked_before_any_compile():
    assert plan.parse_bytes("80GiB") == 80 * 2**30 and plan.parse_bytes("1.5 GB") == 1.5e9
    with pytest.raises(ValueError, match="--memory"):
        plan.parse_bytes("80 parsecs")
    with pytest.raises(ValueError, match="--model 'vit-h-14'"):
        plan.run(["--model", "vit-h-14"])
    with pytest.raises(ValueError, match="--devices"):
        plan.run(["--model", "vit-tiny", "--devices", "0"])


@pytest.mark.parametrize("bend", [0.0, 0.3, 3.0])
def test_search_matches_brute_force_when_memory_is_not_affine(bend):
    # A fixed part, a per-row part that steepens past 40 % of the range, and a staircase
    # of 1 MiB every 7 quanta: the secant misses, the bracket still closes exactly.
    q, limit = 24, 10 * 2**30

    def measure(b):
        rows = b / 8
        t = 2**30 + 150_000 * rows + bend * 150_000 * max(0.0, rows - 20_000)
        return {"total_bytes": int(t + 2**20 * (b // (7 * q)))}

    step = plan.StepPlan("toy", 8, q, False, measure, q)
    found = plan.largest_batch(step, limit)
    brute = max(b for b in range(q, 10**6, q) if measure(b)["total_bytes"] <= limit)
    assert found["largest_global_batch"] == brute
    assert len(found["points"]) <= 20
    # Seeded with the affine fit of that answer, a second search needs two compiles.
    seed = plan.affine_fit(found["points"], 8, limit)
    again = plan.largest_batch(step, limit, seed=seed)
    assert again["largest_global_batch"] == brute and len(again["points"]) == 2
