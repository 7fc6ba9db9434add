"""The planner on the toy CLIP config: the JSON line, and the answer is the edge of what fits."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

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


# --- the streamed plan (--stream) ---------------------------------------------------------


def _phase_sum(f: dict, phase: str, in_place: bool) -> int:
    from experiments.common import streamed_plan as sp

    return sum(f[t] for t in sp.phase_terms(phase, in_place))


@given(
    rows=st.integers(1, 10**6),
    n=st.sampled_from([1, 2, 8, 256]),
    d=st.integers(1, 1024),
    itemsize=st.sampled_from([2, 4]),
    parts=st.lists(st.integers(0, 10**10), min_size=7, max_size=7),
    in_place=st.booleans(),
)
def test_streamed_phases_are_the_sums_of_their_named_terms(rows, n, d, itemsize, parts, in_place):
    # The table names a phase's largest term: the phases must be exactly those terms' sums.
    from contrastive.step.streamed.step import streamed_footprint
    from experiments.common import streamed_plan as sp

    params, opt, acc, peak, inputs, ring, update = parts
    f = streamed_footprint(
        batch_size=rows * n, devices=n, embed_dim=d, embed_itemsize=itemsize,
        params_bytes=params, opt_state_bytes=opt, accumulator_bytes=acc,
        chunk_peak_bytes=peak, chunk_input_bytes=inputs, loss_temp_bytes=ring,
        embedding_grads_in_place=in_place, update_temp_bytes=update,
    )  # fmt: skip
    for phase in sp.PHASE_TERMS:
        assert f[phase] == _phase_sum(f, phase, in_place)
    assert f["peak"] == max(f[p] for p in sp.PHASE_TERMS)
    assert f["embeddings"] == f["embedding_grads"] == 2 * rows * d * itemsize
    assert set(sp.BUFFERS) == {t for terms in sp.PHASE_TERMS.values() for t in terms}
    # Whole tiles per device (the plan's quantum): the ring loss pads nothing.
    from losses._tiles import choose_tiling

    t = choose_tiling(rows * sp.DEFAULT_TILE, None)
    assert t.tile * t.count == rows * sp.DEFAULT_TILE


@pytest.mark.slow
def test_streamed_plan_counts_every_program_of_the_step():
    """vit-tiny on 2 devices, two batches: every byte that grows with B is counted once."""
    from experiments.common import benchmarking as bm
    from experiments.common import streamed_plan as sp

    bm.simulate_cpu_devices(2)
    step = sp.build_streamed_step("vit-tiny", 2, chunk_rows=8)
    assert (step.chunk_size, step.quantum) == (16, 2 * 1024)
    small = step.measure(2 * step.quantum, programs=sp.PROGRAMS)
    # The second batch compiles the loss and the embedding programs again (the pull-backs,
    # the slow ones to compile, are checked again at the answer by plan_streamed).
    large = step.measure(3 * step.quantum, programs=("loss", "embed_x", "embed_y"))
    d, rows = small["embed_dim"], step.quantum // 2  # rows per device between the two
    assert d == 16 and small["embedding_dtype"] == "float32"
    buffer = rows * d * 4  # one more (rows, D) float32 block of x (or y, or a gradient)
    grow = {k: large["programs"][k]["total_bytes"] - small["programs"][k]["total_bytes"]
            for k in ("loss", "embed_x", "embed_y")}  # fmt: skip
    fa, fb = small["footprint"], large["footprint"]
    # An embedding program holds the same temporaries at any batch; only its buffer grows.
    for name in ("embed_x", "embed_y"):
        assert small["programs"][name]["temp_bytes"] == large["programs"][name]["temp_bytes"]
        assert grow[name] == buffer
    # Each phase grows as its program plus the resident buffers it does not take.
    assert fb["pass1"] - fa["pass1"] == grow["embed_x"] + buffer  # + the y embeddings
    assert fb["loss"] - fa["loss"] == grow["loss"]  # (opt state and unread params: fixed)
    assert fb["pass2"] - fa["pass2"] == 2 * buffer and fb["update"] == fa["update"]
    # The loss writes dL/dx, dL/dy over the donated embeddings: one set of buffers.
    for point in (small, large):
        f, progs = point["footprint"], point["programs"]
        assert point["in_place"] and progs["loss"]["alias_bytes"] == f["embeddings"]
        assert f["loss"] >= progs["loss"]["total_bytes"]
    # Never less than a program's own count plus what stays resident beside it.
    f, progs = fa, small["programs"]
    assert f["pass1"] >= progs["embed_x"]["total_bytes"] + f["embeddings"] // 2
    assert f["pass2"] >= progs["pull_x"]["total_bytes"] + f["embedding_grads"] // 2
    assert progs["pull_x"]["argument_bytes"] > f["embedding_grads"] // 2  # takes dL/dx
    assert abs(f["update"] - progs["update"]["total_bytes"]) <= 1024  # metrics only
    assert f["chunk_peak"] == max(progs[k]["temp_bytes"] for k in sp.PER_CHUNK)
    assert f["chunk_input"] == 8 * (32 * 32 * 3 + 8 * 4)  # uint8 images, int32 tokens
    assert sp.limiting_buffer(large)[:2] == ("loss", "ring")


def _fake_streamed(ring_per_row: float):
    """build_streamed_step's stand-in: the footprint of made-up programs (no compile), with
    a ring that grows by ``ring_per_row`` per row and a 1 MiB step every 5 tiles."""
    from contrastive.step.streamed.step import streamed_footprint
    from experiments.common import streamed_plan as sp

    def build(model, devices, *, chunk_rows, remat=False, shard_optimizer=False):
        def measure(batch, programs=None):
            b = batch // devices
            ring = int(2**30 + ring_per_row * b + 2**20 * (b // (5 * sp.DEFAULT_TILE)))
            f = streamed_footprint(
                batch_size=batch, devices=devices, embed_dim=768, params_bytes=2 * 10**9,
                opt_state_bytes=4 * 10**9, chunk_peak_bytes=20 * 10**9,
                chunk_input_bytes=chunk_rows * 150_836, loss_temp_bytes=ring,
                embedding_grads_in_place=True, update_temp_bytes=4 * 10**9,
            )  # fmt: skip
            return {"total_bytes": f["peak"], "footprint": f, "programs": {}, "in_place": True,
                    "embed_dim": 768, "embedding_dtype": "float32", "compiles": 1}  # fmt: skip

        q = devices * sp.DEFAULT_TILE
        return sp.StepPlan(model, devices, chunk_rows * devices, remat, measure, q)

    return build


def test_stream_command_writes_the_streamed_table(tmp_path, capsys, monkeypatch):
    from experiments.common import streamed_plan as sp

    monkeypatch.setattr(sp, "build_streamed_step", _fake_streamed(15_000))
    argv = ["--stream", "--model", "vit-tiny", "--devices", "2,4", "--memory", "80GiB"]
    final = plan.run([*argv, "--out", str(tmp_path / "a")])
    lines = capsys.readouterr().out.strip().splitlines()
    assert json.loads(lines[-1]) == final
    records = json.loads((tmp_path / "a" / "plan_streamed.json").read_text())["records"]
    assert not (tmp_path / "a" / "plan.json").exists()
    assert [(r["devices"], r["step"]) for r in records] == [(2, "streamed"), (4, "streamed")]
    for r in records:
        best, q = r["largest_global_batch"], r["quantum"]
        points = {int(b): t for b, t in r["points"].items()}
        assert points[best] == r["per_device_bytes"] <= 80 * 2**30 < points[best + q]
        assert r["peak_phase"] == "loss" and r["limiting_buffer"] == "ring"
        assert r["host_bytes_per_device"] == 2 * 32 * 150_836
        # Per device, per pair: the embeddings (2 x 768 x 4, their gradients in place) and
        # all of the ring's buffers, over the device's rows.
        b = best // r["devices"]
        ring = 2**30 + 15_000 * b + 2**20 * (b // (5 * 1024))
        assert r["bytes_per_pair"] == round((2 * 768 * 4 * b + ring) / b, 1)
    assert final == {k: records[0][k] for k in final} and final["limiting_buffer"] == "ring"
    table = (tmp_path / "a" / "plan_streamed.md").read_text()
    assert "| vit-tiny | 2 | 32 | " in table and "ring loss buffers" in table
    # The table again from the records, nothing compiled.
    monkeypatch.setattr(sp, "build_streamed_step", None)
    rec = str(tmp_path / "a" / "plan_streamed.json")
    plan.run(["--stream", "--model", "vit-tiny", "--devices", "2,4", "--from-records", rec,
              "--out", str(tmp_path / "b")])  # fmt: skip
    assert (tmp_path / "b" / "plan_streamed.md").read_text() == table


@pytest.mark.parametrize("ring_per_row, met", [(15_000, True), (40_000, False)])
def test_streamed_targets_say_met_or_what_limits(monkeypatch, ring_per_row, met):
    from experiments.common import streamed_plan as sp

    monkeypatch.setattr(sp, "build_streamed_step", _fake_streamed(ring_per_row))
    records = [sp.plan_streamed("vit-l-14", n, 80 * 2**30, chunk_rows=16) for n in (8, 32)]
    lines = sp.target_lines(records)
    assert len(lines) == 2
    for r, line, want in zip(records, lines, (16 * 2**20, 64 * 2**20), strict=True):
        assert (r["largest_global_batch"] >= want) == met
        assert ("met" in line) == met and ("short" in line) != met
        if not met:
            assert "ring loss buffers" in line and "bfloat16" in line
    table = sp.markdown(records, 80 * 2**30)
    assert "| vit-l-14 | 8 | 16 | " in table and "4,096k" in table and "12,288k" in table


def test_stream_flags_are_checked_before_any_compile(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a default run directory would land here
    with pytest.raises(ValueError, match="--stream sizes the streamed step only"):
        plan.run(["--stream", "--plain", "--model", "vit-tiny"])
    with pytest.raises(ValueError, match="--stream sizes the streamed step only"):
        plan.run(["--stream", "--cached-only", "--model", "vit-tiny"])
    # In-memory records are not streamed ones.
    (tmp_path / "plan.json").write_text(json.dumps({"records": [
        {"model": "vit-tiny", "devices": 2, "step": "cached"}]}))  # fmt: skip
    with pytest.raises(ValueError, match="no records"):
        plan.run(["--stream", "--model", "vit-tiny", "--devices", "2",
                  "--from-records", str(tmp_path / "plan.json")])  # fmt: skip
    assert not (tmp_path / "runs").exists()


def test_streamed_plan_refuses_an_answer_whose_programs_moved(monkeypatch):
    # The answer is compiled again with every program; per-chunk bytes that changed with
    # the batch would make the search's numbers wrong: say so instead of reporting them.
    from experiments.common import streamed_plan as sp

    real = _fake_streamed(15_000)

    def build(*args, **kwargs):
        step = real(*args, **kwargs)
        measure = step.measure

        def moved(batch, programs=None):
            point = measure(batch)
            return point | {"total_bytes": point["total_bytes"] + (1 if programs else 0)}

        step.measure = moved
        return step

    monkeypatch.setattr(sp, "build_streamed_step", build)
    with pytest.raises(RuntimeError, match="changed with the batch"):
        sp.plan_streamed("vit-l-14", 8, 80 * 2**30, chunk_rows=16)
