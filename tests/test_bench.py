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
