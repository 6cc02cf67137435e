import math

from dit_sparse.eval.studies.peers import PATTERNS, markdown, run


def test_peer_study_reports_every_pattern_with_full_and_sampled_errors():
    for error_rows in (None, 64):
        results = run((4, 8, 16), heads_per_type=1, head_dim=16, densities=(0.25,), error_rows=error_rows, seed=0)
        rows = {(r["pattern"], r["budget"]): r for r in results["rows"]}
        assert {name for name, budget in rows if budget == 0.25} == {*PATTERNS, "svg2 (cluster blocks)"}
        assert all(math.isfinite(r["error"]) and 0 < r["density"] <= 1 for r in rows.values())
        assert rows[("auto", 0.25)]["density"] <= 1.1 * 0.25 + 1e-6
        assert rows[("auto (no fallback)", 0.25)]["density"] <= 0.25 + 1e-6
        assert "| auto |" in markdown(results)
