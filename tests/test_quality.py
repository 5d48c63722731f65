"""benchmarks/quality.py: its statistics, and its --quick mode as a smoke test on the bundled base."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import quality  # noqa: E402


def test_rank_sum_test_exact_values():
    # Complete separation of 5 vs 5: 2 of the 252 splits are as extreme (one each side).
    assert quality.rank_sum_test([6, 7, 8, 9, 10], [1, 2, 3, 4, 5]) == pytest.approx(2 / 252)
    assert quality.rank_sum_test([1, 2, 3, 4, 5], [6, 7, 8, 9, 10]) == pytest.approx(2 / 252)
    assert quality.rank_sum_test([1, 1, 1], [1, 1, 1]) == 1.0  # all tied: no evidence at all
    assert quality.rank_sum_test([0.5, 0.9, 0.1, 0.7, 0.3], [0.6, 0.2, 0.8, 0.4, 1.0]) > 0.5


def test_rank_sum_test_matches_scipy_with_ties():
    stats = pytest.importorskip("scipy.stats")
    cases = [
        ([0.9, 0.8, 0.85, 0.95, 0.7], [0.6, 0.65, 0.8, 0.7, 0.5]),
        ([0.25, 0.5, 0.5, 0.75, 1.0], [0.0, 0.25, 0.25, 0.5, 0.5]),
        ([1, 2, 3], [2, 3, 4, 5]),
    ]
    for x, y in cases:
        ours = quality.rank_sum_test(x, y)
        ref = stats.permutation_test(
            (x, y), lambda a, b: stats.rankdata(list(a) + list(b))[: len(a)].sum(), permutation_type="independent",
            alternative="two-sided", n_resamples=math.inf,
        ).pvalue  # fmt: skip
        assert ours == pytest.approx(ref, abs=1e-9), (x, y)


def test_quick_mode_trains_and_scores_every_method(tmp_path):
    """One seed, a few steps of the real trainer for each method, adapters loaded by stock diffusers, scored."""
    code = quality.main(["--quick", "--output_dir", str(tmp_path), "--threads", "2"])
    assert code == 0
    report = json.loads((tmp_path / "results.json").read_text())
    assert list(report["runs"]) == list(quality.SINGLE_RANK_METHODS)
    assert report["ranks"]["lora_matched"] > report["ranks"]["lora"]  # parameter-matched is a different rank
    assert report["parameters"]["lora_matched"] >= report["parameters"]["moslora"]
    for method, runs in report["runs"].items():
        assert len(runs) == 1
        for metric in ("fidelity", "recolour", "background", "prior"):
            assert 0.0 <= runs[0][metric] <= 1.0, (method, metric)
        assert math.isfinite(runs[0]["final_loss"])
        assert len(report["losses"][method][0]) == 4  # one logged loss per step
    assert (tmp_path / "quality.png").stat().st_size > 0
    # Paths inside the repository are recorded relative to it (the same on every checkout); others as given.
    assert report["args"]["base"] == "samples/tiny-base" and report["args"]["subject"] == "samples/subject"
    assert report["args"]["output_dir"] == str(tmp_path)
    assert "| moslora (" in (tmp_path / "results.md").read_text()


def test_results_record_repository_paths_relative_to_it():
    assert quality.repo_relative(str(quality.REPO / "samples" / "tiny-base")) == "samples/tiny-base"
    assert quality.repo_relative("/elsewhere/base") == "/elsewhere/base"
    assert quality.repo_relative(4) == 4
    recorded = json.loads((quality.REPO / "benchmarks" / "results" / "quality" / "results.json").read_text())
    assert not any(isinstance(v, str) and os.path.isabs(v) for v in recorded["args"].values())


def test_bad_base_is_one_line_error(tmp_path, capsys):
    assert quality.main(["--quick", "--base", str(tmp_path / "nope"), "--output_dir", str(tmp_path)]) == 2
    assert "is not a diffusers pipeline folder" in capsys.readouterr().err


def test_holm_adjusts_step_down_and_stays_monotone():
    # sorted 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1 = 0.02, 0.03, 0.06, 0.04 -> running max 0.06 for the last
    assert quality.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert quality.holm([0.5, 0.9]) == [1.0, 1.0]  # capped at 1, and never below a smaller p's adjustment
    assert quality.holm([0.2]) == [0.2]


def _runs(values, metric="fidelity"):
    return [{m: (v if m == metric else 0.5) for m in quality.METRICS} for v in values]


def test_a_win_needs_a_corrected_p_below_005_in_moslora_s_favour():
    results = {
        ("lora", 8): _runs([0.1, 0.2, 0.15, 0.12, 0.18]),
        ("moslora_orth", 8): _runs([0.8, 0.9, 0.85, 0.95, 0.88]),  # every seed above every LoRA seed
        ("lora_plus", 8): _runs([0.8, 0.9, 0.85, 0.95, 0.88]),  # as good, but not a MoSLoRA setting
        ("moslora", 8): _runs([0.0, 0.05, 0.02, 0.01, 0.03]),  # separated, but worse than LoRA
    }
    cells = [("moslora_orth", 8), ("lora_plus", 8), ("moslora", 8)]
    comparisons = quality.compare(results, ("lora", 8), cells)
    p, q = comparisons["fidelity"][("moslora_orth", 8)]
    assert p == pytest.approx(2 / 252) and q == pytest.approx(3 * 2 / 252)  # Holm over the three settings
    found = quality.wins(results, ("lora", 8), comparisons)
    assert [(cell, metric) for cell, metric, *_ in found] == [(("moslora_orth", 8), "fidelity")]


def test_quick_sweep_writes_its_table_log_and_figure(tmp_path, capsys):
    """LoRA and MoSLoRA at one rank, a few steps each: the table, the per-run log --resume reads, the figure."""
    argv = ["--sweep", "--quick", "--cells", "lora@2,moslora@2", "--captions", "--no_prior_preservation",
            "--output_dir", str(tmp_path), "--threads", "2"]  # fmt: skip
    assert quality.main(argv) == 0
    report = json.loads((tmp_path / "sweep.json").read_text())
    assert sorted((r["method"], r["rank"]) for r in report["runs"]) == [("lora", 2), ("moslora", 2)]
    assert len((tmp_path / "sweep_runs.jsonl").read_text().splitlines()) == 2
    assert (tmp_path / "subject_captioned" / "cross_0.txt").read_text().strip() == (
        "a photo of sks shape on a white background"
    )
    text = (tmp_path / "sweep.md").read_text()
    assert "| 2 | moslora |" in text and "| 2 | lora |" in text and "Holm" in text
    assert (tmp_path / "sweep.png").stat().st_size > 0
    # --resume: every run is already in the log, so nothing trains and the same table is written again.
    assert quality.main([*argv, "--resume"]) == 0
    assert len((tmp_path / "sweep_runs.jsonl").read_text().splitlines()) == 2
    assert (tmp_path / "sweep.md").read_text().split("\n")[2:] == text.split("\n")[2:]  # the first line has the time
    # Without --resume the run log is not thrown away: one line, exit status 2, the log as it was.
    with pytest.raises(SystemExit) as exit_:
        quality.parse_args(argv)
    assert exit_.value.code == 2 and "--resume continues it" in capsys.readouterr().err
    assert len((tmp_path / "sweep_runs.jsonl").read_text().splitlines()) == 2


def test_a_sweep_without_plain_lora_at_a_rank_is_refused(capsys):
    with pytest.raises(SystemExit):
        quality.parse_args(["--sweep", "--cells", "moslora@8"])
    assert "--cells needs lora@RANK at each rank" in capsys.readouterr().err
