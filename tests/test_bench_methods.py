"""`unlearn bench --quick` for ARCANE, PUMA and the memorising setting: JSON that holds together,
PNG figures the report links, and the checks each benchmark makes on the way (bit-identity)."""

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
    result = CliRunner().invoke(main, ["bench", "--quick", "--only", "arcane,puma,memorising", "--out", str(out)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return out


@pytest.mark.slow
def test_report_has_a_section_and_a_png_for_each(quick_report):
    report = (quick_report / "report.md").read_text()
    for title in ("## ARCANE:", "## PUMA:", "## Membership inference in a memorising setting"):
        assert title in report
    images = re.findall(r"!\[[^\]]+\]\(([^)]+\.png)\)", report)
    assert images == ["arcane.png", "puma.png", "memorising_mia.png"]
    for name in images:
        content = (quick_report / name).read_bytes()
        assert content.startswith(PNG_MAGIC) and len(content) > 10_000, name


@pytest.mark.slow
def test_arcane_figures_are_sane(quick_report):
    result = json.loads((quick_report / "arcane.json").read_text())
    assert _fraction(result["monolith"]["accuracy"]) and result["monolith"]["retrain_seconds_median"] > 0
    assert [(v["blocks"], v["keep_fraction"]) for v in result["variants"]] == [(1, 1.0), (3, 0.5)]
    for variant in result["variants"]:
        assert _fraction(variant["accuracy"]) and variant["deletion_budget"] > 0
        # every run's unlearned class models were checked bit-identical to a retrain from scratch
        assert variant["bit_identical_runs"] == len(variant["unlearn_seconds"]) == result["params"]["runs"]
        assert all(seconds > 0 for seconds in variant["unlearn_seconds"])
    assert result["variants"][1]["selected_rows"] < result["variants"][0]["selected_rows"]


@pytest.mark.slow
def test_puma_figures_are_sane(quick_report):
    (digits,) = json.loads((quick_report / "puma.json").read_text())["datasets"]
    assert [e["subjects"] for e in digits["erasures"]] == [1, 4, 20] and digits["factor_bytes"] > 0
    for erasure in digits["erasures"]:
        models = erasure["models"]
        assert set(models) == {"original", "puma", "retrain"}
        assert all(_fraction(m[key]) for m in models.values() for key in ("acc_erased", "acc_retained", "acc_holdout"))
        # the patch pushes the erased rows' loss up, away from what the original model remembered
        assert models["puma"]["erased_loss"] > models["original"]["erased_loss"]
        assert models["retrain"]["verification"] == "exact"
        assert erasure["patch"]["rows_removed"] == erasure["rows"]
    assert digits["erasures"][-1]["default_decision"].startswith("retrain")


@pytest.mark.slow
def test_memorising_figures_are_sane(quick_report):
    result = json.loads((quick_report / "memorising.json").read_text())
    assert result["member_rows"] >= result["params"]["member_rows"]
    assert [(f["subjects"], f["repeats"]) for f in result["forget_sets"]] == [(1, 2), (5, 1)]
    for forget in result["forget_sets"]:
        assert set(forget["models"]) == {"PUMA original", "PUMA unlearned", "Amnesiac original",
                                         "Amnesiac unlearned", "retrain (gold standard)"}
        assert len(forget["rows"]) == forget["repeats"]
        for figures in forget["models"].values():
            assert all(_fraction(figures[key]) for key in ("lira_auc", "loss_auc", "acc_forget", "acc_holdout"))
            assert len(figures["lira_auc_runs"]) == figures["requests"] == forget["repeats"]
            # a request with fewer than 5 rows is reported as such, never scored
            assert figures["requests_insufficient"] == sum(rows < 5 for rows in forget["rows"])
    assert result["forget_sets"][-1]["models"]["retrain (gold standard)"]["requests_insufficient"] == 0
