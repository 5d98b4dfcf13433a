"""`unlearn bench`: the quick suite writes its JSON, PNG figures and a report that links them."""

from __future__ import annotations

import json
import re

import pytest
from click.testing import CliRunner

from worker.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _fraction(value: float) -> bool:
    return 0.0 <= value <= 1.0


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    result = CliRunner().invoke(main, ["bench", "--quick", "--only", "sisa,amnesiac,s3t", "--out", str(out)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return out


@pytest.mark.slow
def test_report_links_a_png_for_every_figure(quick_report):
    # Given a quick run of the three in-process benchmarks
    report = (quick_report / "report.md").read_text()

    # Then the report has a section per benchmark that ran, none for e2e, and every figure it links exists
    for title in ("SISA:", "Amnesiac:", "S3T:"):
        assert f"## {title}" in report
    assert "End to end" not in report
    images = re.findall(r"!\[[^\]]+\]\(([^)]+\.png)\)", report)
    assert {"sisa_accuracy.png", "sisa_unlearn_time.png", "amnesiac_accuracy.png", "amnesiac_cost.png",
            "s3t_deletions.png", "s3t_accuracy.png"} <= set(images)
    for name in images:
        content = (quick_report / name).read_bytes()
        assert content.startswith(PNG_MAGIC) and len(content) > 10_000, name
    assert not (quick_report / "e2e.json").exists()


@pytest.mark.slow
def test_sisa_figures_are_sane(quick_report):
    result = json.loads((quick_report / "sisa.json").read_text())
    assert result["benchmark"] == "sisa" and result["quick"] is True and result["threads"] == 1
    assert [m["shards"] for m in result["models"]] == [1, 2, 5]
    for model in result["models"]:
        assert set(model["accuracy"]) == {"mean", "vote", "weighted"}
        assert all(_fraction(a) for a in model["accuracy"].values())
        assert model["train_seconds"] > 0 and model["unlearn_seconds_median"] > 0
        assert model["full_retrain_seconds_median"] > 0
        # every run's unlearned components were checked bit-identical to a retrain
        assert model["bit_identical_runs"] == len(model["unlearn_seconds"]) == result["params"]["runs"]
        assert model["deletion_budget"] >= 1


@pytest.mark.slow
def test_amnesiac_figures_are_sane(quick_report):
    result = json.loads((quick_report / "amnesiac.json").read_text())
    (digits,) = result["datasets"]
    assert digits["dataset"] == "digits" and digits["steps"] > 0
    assert [e["subjects"] for e in digits["erasures"]] == [1, 4, 20]
    for erasure in digits["erasures"]:
        assert set(erasure["models"]) == {"original", "rollback", "rollback+ft10", "retrain"}
        for label, figures in erasure["models"].items():
            for key in ("acc_erased", "acc_retained", "acc_holdout", "mia_auc"):
                assert _fraction(figures[key]), (label, key)
            if label != "original":
                assert figures["seconds"] > 0
        assert erasure["models"]["rollback"]["steps_reverted"] > 0
        assert erasure["models"]["retrain"]["verification"] == "exact"
    assert all(v["update_bytes_total"] > 0 and v["train_seconds"] > 0 for v in digits["storage_variants"])


@pytest.mark.slow
def test_s3t_figures_are_sane(quick_report):
    result = json.loads((quick_report / "s3t.json").read_text())
    assert set(result["accuracy"]) == {"s3t", "s3t_public_base_alone", "sisa", "sisa_with_public_rows"}
    assert all(_fraction(a) for a in result["accuracy"].values())
    assert all(seconds > 0 for seconds in result["train_seconds"].values())
    assert [row["B"] for row in result["budgets"]] == [1, 2, 3]
    for row in result["budgets"]:
        assert len(row["measured"]) == result["params"]["trials"] and min(row["measured"]) >= 1
        assert row["simulated"] > 0 and row["gauge"] > 0 and row["paper_mLH"] > 0
        assert all(_fraction(a) for a in row["accuracy_after"].values())
        assert row["core_ms_median"] > 0 and row["version_ms_median"] >= row["core_ms_median"]


def test_an_unknown_benchmark_is_refused_by_name(tmp_path):
    result = CliRunner().invoke(main, ["bench", "--only", "sisa,nope", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "nope" in result.output and "sisa, amnesiac, s3t, arcane, puma, memorising, e2e" in result.output
    assert not (tmp_path / "report.md").exists()
