"""The benchmarks run end to end at toy sizes; the loss benchmark judges rows by the issue."""

from experiments import bench_losses


def test_bench_losses_writes_every_case(tmp_path):
    out = tmp_path / "bench"
    argv = ["--batch", "40", "--dim", "8", "--repeats", "1", "--matmul-size", "64"]
    rows = bench_losses.main([*argv, "--block-size", "16", "--out", str(out)])
    assert [r["loss"] for r in rows] == [
        name + "".join(f" {k}={v}" for k, v in opts.items()) for name, opts in bench_losses.CASES
    ]
    for r in rows:
        assert r["dense_s"] > 0 and r["tiled_s"] > 0 and r["matmul_gflops"] > 0
        assert r["tiled_temp_mib"] > 0 and isinstance(r["meets_targets"], bool)
    table = (out.with_suffix(".md")).read_text()
    assert table.count("\n| 40 |") == len(bench_losses.CASES)
    assert out.with_suffix(".json").stat().st_size > 0


def test_targets_follow_the_issue_bounds():
    def row(batch, ratio, fraction):
        return {"batch": batch, "tiled_over_dense": ratio, "fraction_of_matmul": fraction}

    assert bench_losses.meets_targets(row(8192, 1.09, 0.8))
    assert not bench_losses.meets_targets(row(8192, 1.11, 0.8))
    assert bench_losses.meets_targets(row(16384, 1.0, 0.75))
    assert not bench_losses.meets_targets(row(16384, 1.01, 0.9))
    assert not bench_losses.meets_targets(row(16384, 0.5, 0.74))
    assert bench_losses.meets_targets(row(2048, 3.0, 0.8))  # small batches: rate bound only


def test_tile_product_forms_agree():
    from experiments import bench_tile_products

    out = bench_tile_products.main(["--tile", "32", "--dim", "8", "--count", "3", "--repeats", "1"])
    assert out["max_abs_difference"] < 1e-4
    assert out["transposed"]["gflops"] > 0 and out["row-contraction"]["gflops"] > 0
