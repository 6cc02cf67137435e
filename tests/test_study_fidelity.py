"""The fidelity study's command end to end on the reference model at a tiny size: every part's table and
figure, and figures that come from the run (density 1.0 reproduces dense, an ``alpha * n**C`` budget
matched at the smallest size spends what the fixed density spends there and less at a larger size)."""

import contextlib
import io
import json
import math
import shutil
import statistics

import pytest

from dit_sparse.eval.studies.fidelity_report import PART_TITLES
from dit_sparse.eval.studies.fidelity import main, plan_study

TINY = ["--prompts", "2", "--part-prompts", "1", "--size", "5", "32", "32", "--length-sizes", "5", "64", "64",
        "--steps", "2", "--warmup", "0", "--methods", "auto", "svg2", "svg2_own", "--length-density", "0.5"]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("fidelity")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main([*TINY, "--densities", "1.0", "--out", str(out)])
    results = json.loads((out / "results" / "fidelity.json").read_text())
    return code, printed.getvalue(), out, results


def _psnr(value):
    return math.inf if value == "inf" else value


def test_the_report_has_a_table_per_part_and_the_figures(study):
    code, printed, out, results = study
    assert code == 0 and "wrote " in printed
    text = (out / "fidelity.md").read_text()
    assert results["command"] in text and "2 held-out prompts for the Pareto part, the first 1 of them" in text
    for title in PART_TITLES.values():
        assert f"## {title}" in text
    assert (out / "img" / "fidelity_pareto.png").stat().st_size > 0
    assert (out / "img" / "fidelity_length.png").stat().st_size > 0
    main_run = results["runs"][results["main_size"]]
    assert {row["part"] for row in main_run["rows"]} == set(PART_TITLES)
    dense_walls = [statistics.median(walls) for walls in main_run["dense"]["per_prompt_wall_seconds"]]
    for row in main_run["rows"]:
        dense_wall = statistics.fmean(dense_walls[: row["prompts"]])   # the dense videos of the same prompts
        assert row["speedup"] == pytest.approx(dense_wall / row["wall_seconds"])
        assert f"| {row['label']} | {row['budget']} |" in text


def test_density_one_reproduces_the_dense_videos(study):
    *_, results = study
    rows = [r for r in results["runs"][results["main_size"]]["rows"] if r["budget"] == "1.0"]
    assert {r["label"] for r in rows} == {"auto", "svg2"}
    for row in rows:
        assert _psnr(row["psnr"]) > 60 and row["ssim"] > 0.9999 and row["agreement"]["all"] == 1.0
        assert row["prompts"] == 2


def test_other_parts_reuse_the_dense_videos_on_fewer_prompts(study):
    *_, results = study
    main_run = results["runs"][results["main_size"]]
    others = [r for r in main_run["rows"] if r["part"] != "pareto"]
    assert others and all(r["prompts"] == 1 and len(r["per_prompt_psnr"]) == 1 for r in others)
    once = next(r for r in others if r["label"] == "recalibrate plan once")
    assert 0 < once["density"] < 1 and _psnr(once["psnr"]) < 60


def test_alpha_budgets_match_the_fixed_density_at_the_smallest_size_only(study):
    *_, results = study
    small, large = sorted(results["runs"].values(), key=lambda run: run["tokens"])
    assert small["tokens"] < large["tokens"]
    for run in (small, large):
        rows = {r["label"]: r for r in run["rows"] if r["part"] == "length"}
        fixed = rows.pop("density 0.5")
        assert set(rows) == {"alpha * n^0.5", "alpha * n^0.75"}
        for row in rows.values():
            if run is small:
                assert row["density"] == pytest.approx(fixed["density"]) and row["psnr"] == fixed["psnr"]
            else:   # fewer keys per query than the fixed share as n grows, fewer still for a smaller C
                assert row["density"] < fixed["density"]
        if run is large:
            assert rows["alpha * n^0.5"]["density"] < rows["alpha * n^0.75"]["density"]


def test_plans_skip_variants_that_coincide_and_check_flags_before_loading(capsys):
    plan = plan_study(["aging", "warmup"], (5, 32, 32), 2, (0.1,), [], prompts=2, part_prompts=2)
    labels = [m.label for m in plan.stages[0].methods]
    assert labels.count("recalibrate plan once") == 1 and "last step dense" not in labels   # 1 + 1 dense of 2
    with pytest.raises(SystemExit):
        main(["--out", "x", "--prompts", "2", "--part-prompts", "3"])
    assert "--part-prompts (3) takes the first of --prompts (2)" in capsys.readouterr().err


def test_report_only_writes_the_same_report_from_the_saved_results(study):
    _, _, out, _ = study
    before = (out / "fidelity.md").read_text()
    (out / "fidelity.md").unlink()
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["--out", str(out), "--report-only"]) == 0
    assert (out / "fidelity.md").read_text() == before


def test_report_only_merges_every_saved_run_without_repeating_a_method(study, tmp_path):
    _, _, out, results = study
    (tmp_path / "results").mkdir()
    for name in ("fidelity.json", "fidelity_second_run.json"):
        shutil.copy(out / "results" / "fidelity.json", tmp_path / "results" / name)
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["--out", str(tmp_path), "--report-only"]) == 0
    text = (tmp_path / "fidelity.md").read_text()
    assert "- Run 1: `" in text and "- Run 2: `" in text and "--report-only" in text
    for row in results["runs"][results["main_size"]]["rows"]:
        line = f"| {row['label']} | {row['budget']} |"
        assert text.count(line) == (out / "fidelity.md").read_text().count(line)


def test_the_error_check_changes_nothing_and_a_zero_bound_replans_at_every_check(study):
    _, _, out, results = study
    aging = {r["label"]: r for r in results["runs"][results["main_size"]]["rows"] if r["part"] == "aging"}
    once, checked = aging["recalibrate plan once"], aging["plan once, error checked every step"]
    assert "checks" not in once and checked["per_prompt_psnr"] == once["per_prompt_psnr"]
    assert checked["checks"]["replans_per_call"] == 0 and checked["checks"]["error_by_step"]
    every = aging["re-plan every step, no dense pass"]["checks"]
    assert every["replans_per_call"] > 0 and every["error_by_step"].keys() == checked["checks"]["error_by_step"].keys()
    assert (out / "img" / "fidelity_aging.png").stat().st_size > 0
    assert "| plan once, error checked every step | 0.0 |" in (out / "fidelity.md").read_text()


def test_the_aging_finding_reads_the_first_worst_and_last_checked_step(study):
    from dit_sparse.eval.studies.fidelity_report import findings, read_results

    _, _, out, _ = study
    changed = read_results(out / "results" / "fidelity.json")
    checked = next(r for r in changed["runs"][changed["main_size"]]["rows"]
                   if r["label"] == "plan once, error checked every step")
    checked["checks"]["error_by_step"] = {"4": 0.2, "10": 0.3, "15": 0.1}
    assert ("- A plan made once: its estimated attention error is 0.200 at step 4, 0.300 at its worst (step 10) "
            "and 0.100 at step 15 (mean over layers).") in findings(changed)


def test_the_budget_default_is_picked_among_the_densities_faster_than_dense(study):
    from dit_sparse.eval.studies.fidelity_report import defaults_evidence, read_results

    _, _, out, _ = study
    changed = read_results(out / "results" / "fidelity.json")
    rows = changed["runs"][changed["main_size"]]["rows"]
    auto = next(r for r in rows if r["part"] == "pareto" and r["label"] == "auto")
    rows.remove(auto)
    for budget, psnr, agreement, speedup in (("0.1", 32.0, 0.90, 1.3), ("0.2", 35.0, 0.96, 1.1), ("0.6", 45.0, 0.98, 0.9)):
        rows.append({**auto, "budget": budget, "psnr": psnr, "agreement": {"all": agreement}, "speedup": speedup})
    budget_line = lambda: next(line for line in defaults_evidence(changed) if line.startswith("- Budget"))
    assert "0.6: 45.00 dB, 98%, 0.90x; left out as slower than dense end to end: 0.6; the smallest that meets both: density 0.2." in budget_line()
    rows[-2]["speedup"] = 0.95   # the only density meeting both targets is slower than dense: the most agreement among the rest
    assert "left out as slower than dense end to end: 0.2, 0.6; none meets both, so the one with the most agreement: density 0.1." in budget_line()
    rows[-3]["speedup"] = 0.9   # nothing faster than dense: the line still lists every density and picks none
    assert "left out as slower than dense end to end: 0.1, 0.2, 0.6; none runs faster than dense, so none: density –." in budget_line()


def test_auto_is_matched_with_each_peer_by_the_density_each_spent(study):
    from dit_sparse.eval.studies.fidelity_report import findings, read_results

    _, _, out, _ = study
    changed = read_results(out / "results" / "fidelity.json")
    rows = {row["label"]: row for row in changed["runs"][changed["main_size"]]["rows"] if row["part"] == "pareto"}
    rows["auto"].update(density=0.3, psnr=31.0, speedup=1.2)
    rows["svg2"].update(density=0.7, psnr=30.0, speedup=0.9)
    assert ("- svg2 asked for 1.0 spent 0.700: `auto` spending no more (density 1.0, spent 0.300) 31.00 dB at 1.20x, "
            "at least as high as its 30.00 dB at 0.90x; at most half (density 1.0, spent 0.300) 31.00 dB at 1.20x, at least "
            "as high as it.") in findings(changed)
    rows["svg2"].update(density=0.5, psnr=32.0)   # auto spent more than half of SVG2's: the equal-spend match only
    assert ("- svg2 asked for 1.0 spent 0.500: `auto` spending no more (density 1.0, spent 0.300) 31.00 dB at 1.20x, "
            "below its 32.00 dB at 0.90x.") in findings(changed)
    rows["svg2"].update(density=0.2)   # auto spent more than SVG2: no match
    assert not any(line.startswith("- svg2 asked for 1.0") for line in findings(changed))


def test_a_run_whose_dense_calls_spread_has_its_speedups_marked(study, tmp_path):
    from dit_sparse.eval.studies.fidelity_report import read_results, write_report

    _, _, out, _ = study
    steady = read_results(out / "results" / "fidelity.json")
    steady["runs"][steady["main_size"]]["dense"]["per_prompt_wall_seconds"] = [[1.0], [1.2]]   # within the spread
    loaded = read_results(out / "results" / "fidelity.json")
    loaded["runs"][loaded["main_size"]]["dense"]["per_prompt_wall_seconds"] = [[1.0], [2.0]]   # one prompt twice as slow
    text = write_report(loaded, tmp_path, save=False).read_text()
    assert "its dense calls took from 1.0 to 2.0 s per prompt" in text
    assert all(row["unsteady"] for row in loaded["runs"][loaded["main_size"]]["rows"])
    for row in loaded["runs"][loaded["main_size"]]["rows"]:
        if row["part"] == "pareto":
            assert f"{row['speedup']:.2f}x (load)" in text
    text = write_report(steady, tmp_path / "steady", save=False).read_text()
    assert "Timing:" not in text and not any(row["unsteady"] for row in steady["runs"][steady["main_size"]]["rows"])


def test_a_run_records_the_weights_it_measured_and_the_page_names_them(study):
    from dit_sparse.eval.reference import reference_weights_id

    _, _, out, results = study
    assert results["weights"] == reference_weights_id()
    assert f"fingerprint `{reference_weights_id()}`" in (out / "fidelity.md").read_text()


def test_report_only_leaves_out_runs_on_other_weights_and_refuses_when_none_is_on_the_shipped_ones(study, tmp_path):
    from dit_sparse.eval.studies.fidelity_report import merge_results, read_results

    _, _, out, results = study
    (tmp_path / "results").mkdir()
    shutil.copy(out / "results" / "fidelity.json", tmp_path / "results" / "fidelity.json")
    earlier = json.loads((out / "results" / "fidelity.json").read_text())
    earlier.pop("weights")   # a run saved before runs recorded their weights
    (tmp_path / "results" / "fidelity_earlier.json").write_text(json.dumps(earlier))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["--out", str(tmp_path), "--report-only"]) == 0
    assert "left out 1 run(s) measured on other weights: fidelity_earlier.json (weights not recorded)" in printed.getvalue()
    text = (tmp_path / "fidelity.md").read_text()
    assert "- Run 1: `" in text and "- Run 2: `" not in text
    with pytest.raises(ValueError, match="different weights"):
        merge_results([results, read_results(tmp_path / "results" / "fidelity_earlier.json")])

    (tmp_path / "results" / "fidelity.json").unlink()
    errors = io.StringIO()
    with contextlib.redirect_stderr(errors):
        assert main(["--out", str(tmp_path), "--report-only"]) == 2
    assert "none of the 1 runs" in errors.getvalue() and "run the study again on them" in errors.getvalue()


def test_the_weights_fingerprint_changes_with_any_weight_byte(tmp_path):
    from dit_sparse.eval.reference import reference_model_dir, reference_weights_id

    copy = shutil.copytree(reference_model_dir(), tmp_path / "model")
    assert reference_weights_id(copy) == reference_weights_id()
    weights = copy / "vae" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert reference_weights_id(copy) != reference_weights_id()
