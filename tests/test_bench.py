"""The attention and calibration benchmarks, run end to end at a tiny size."""

from dit_sparse.eval.bench import attention as bench_attention
from dit_sparse.eval.bench import calibration as bench_calibration

TINY = ["--grid", "2", "8", "8", "--heads", "2", "--head-dim", "16", "--warmup", "0", "--repeats", "1"]


def test_bench_attention_on_the_cpu_times_every_method_in_one_run(capsys, tmp_path):
    import json

    out = tmp_path / "rows.json"
    bench_attention.main([*TINY, "--block-size", "16", "--tile", "1", "4", "4", "--densities", "0.15", "1",
                          "--backends", "torch", "--device", "cpu", "--json", str(out)])
    printed = capsys.readouterr().out
    rows = json.loads(out.read_text())["rows"]
    assert [r["backend"] for r in rows] == ["sdpa (dense)"] + ["torch", "torch kernel (plan order)"] * 2
    assert all(r["ms"] > 0 and r["speedup"] > 0 for r in rows)
    assert "torch speedup over dense SDPA at density 0.15" in printed and "torch time at density 1.0" in printed
    assert "other processes used" in printed


def test_bench_calibration_reports_the_ratio_and_peak_memory(capsys):
    bench_calibration.main([*TINY, "--pattern", "adaptive"])
    printed = capsys.readouterr().out
    assert "calibration / one dense SDPA call:" in printed and "| sparse op (density" in printed
    assert "one fp32 S x S score matrix" in printed


def test_bench_calibration_profile_lists_the_ops_of_one_calibration(capsys):
    bench_calibration.main([*TINY, "--pattern", "radial", "--profile"])
    printed = capsys.readouterr().out
    assert "Self CPU" in printed and "aten::" in printed


def test_bench_pipeline_times_dense_and_sparse_calls_of_one_pipeline(capsys, tmp_path):
    import json

    from dit_sparse.eval.bench import pipeline as bench_pipeline

    out = tmp_path / "e2e.json"
    bench_pipeline.main(["--preset", "tiny", "--device", "cpu", "--json", str(out)])
    result = json.loads(out.read_text())["result"]
    assert result["walls_s"]["dense"][0] > 0 and result["calibration_s"] > 0  # the timed sparse call calibrates
    assert result["sparse_calls"] > 0 and result["attention_calls"] == 2 * 2 * 4  # 2 layers, CFG, 4 steps
    assert result["denoise_speedup"] == result["denoise_s"]["dense"] / result["denoise_s"]["sparse"]
    assert "| sparse |" in capsys.readouterr().out

    bench_pipeline.main(["--preset", "tiny", "--device", "cpu", "--plans", "saved", "--json", str(out)])
    result = json.loads(out.read_text())["result"]
    assert result["calibration_s"] == 0 and result["warmup_calibration_s"] > 0  # plans reused from the file
    assert "reuse saved plans" in capsys.readouterr().out
