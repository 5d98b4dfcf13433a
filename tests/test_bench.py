"""`unlearn bench`: the quick suite writes its JSON, PNG figures and a report that links them, and
each benchmark's figures hold together (with the checks it makes on the way, e.g. bit-identity)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from worker.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ROOT = Path(__file__).resolve().parent.parent
# what a bare GPU machine lacks: the service clients and the settings' pydantic
SERVICE_PACKAGES = ("psycopg", "kafka", "celery", "kombu", "redis", "pydantic", "pydantic_settings", "pyarrow",
                    "cloudevents", "fastapi", "click")


def _fraction(value: float) -> bool:
    return 0.0 <= value <= 1.0


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    result = CliRunner().invoke(main, ["bench", "--quick", "--only", "sisa,frontier,amnesiac,s3t,budget,arcane,puma,memorising",
                                       "--out", str(out)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return out


@pytest.mark.slow
def test_report_links_a_png_for_every_figure(quick_report):
    # Given a quick run of the in-process benchmarks
    report = (quick_report / "report.md").read_text()

    # Then the report has a section per benchmark that ran, none for e2e, and every figure it links exists
    for title in ("SISA:", "Frontier:", "Amnesiac:", "S3T:", "Deletion budget:", "ARCANE:", "PUMA:",
                  "Membership inference in a memorising setting"):
        assert f"## {title}" in report
    assert "End to end" not in report
    images = re.findall(r"!\[[^\]]+\]\(([^)]+\.png)\)", report)
    assert {"sisa_accuracy.png", "sisa_unlearn_time.png", "frontier.png", "amnesiac_accuracy.png", "amnesiac_cost.png",
            "s3t_deletions.png", "s3t_accuracy.png", "budget.png", "arcane.png", "puma.png",
            "memorising_mia.png"} <= set(images)
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
        # the budget needs a learning curve: slices
        assert model["deletion_budget"] is None if model["slices"] == 1 else model["deletion_budget"] > 0


@pytest.mark.slow
def test_frontier_figures_are_sane(quick_report):
    result = json.loads((quick_report / "frontier.json").read_text())
    (run,) = result["runs"]
    assert run["device"] == "cpu" and run["dataset"] == "digits"
    assert {(p["method"], p["shards"], p["slices"]) for p in run["points"]} == {
        (m, s, r) for m in ("sisa", "s3t") for s in (1, 5) for r in (1, 3)}
    for point in run["points"]:
        assert _fraction(point["accuracy"]) and point["train_seconds"] > 0 and point["unlearn_seconds_median"] > 0
    assert run["stacked"]["one_at_a_time"] > 0 and run["stacked"]["one_stack"] > 0
    report = (quick_report / "report.md").read_text()
    assert "Targets (issue 10)" in report and "SISA one-row unlearning ≥ 5×" in report


@pytest.mark.slow
def test_budget_figures_count_down(quick_report):
    result = json.loads((quick_report / "budget.json").read_text())
    assert [m["method"] for m in result["methods"]] == ["sisa", "s3t", "amnesiac"]
    for method in result["methods"]:
        steps = method["steps"]
        assert len(steps) == result["params"]["subjects"] + 1
        # between retrains the gauge never rises
        for earlier, later in zip(steps, steps[1:]):
            if later["event"] == "unlearned":
                assert later["budget"] <= earlier["budget"]
    sisa = result["methods"][0]["steps"]
    assert sisa[-1]["budget"] < sisa[0]["budget"]


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


def test_an_unknown_benchmark_is_refused_by_name(tmp_path):
    result = CliRunner().invoke(main, ["bench", "--only", "sisa,nope", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "nope" in result.output and "sisa, frontier, amnesiac, s3t, budget, arcane, puma, memorising, e2e, fanout, intake, reliability, scale, examples, gpu" in result.output
    assert not (tmp_path / "report.md").exists()


@pytest.mark.services
@pytest.mark.slow
def test_e2e_quick_measures_sequential_and_burst_erasures_through_real_processes(tmp_path):
    # Given the local stack, a quick e2e run: 3 sequential erasures and a burst of 10 at 20/s on SISA
    from worker.bench import e2e

    result = e2e.measure(quick=True, progress=lambda done, total, note: None)

    # Then every erasure was answered, with a version before or with its receipt
    sequential, burst = result["methods"]
    assert sequential["erasures"] == 3 and burst["erasures"] == 10 and burst["rate"] == 20.0
    for run in (sequential, burst):
        assert len(run["receipt_seconds"]) == len(run["version_seconds"]) == run["erasures"]
        assert all(0 < s < 300 for s in run["receipt_seconds"])
    assert sequential["last_slice_retrain_s"] > 0
    # and the burst's requests were each in one pass, with no shard retrained twice in a pass
    assert sum(burst["requests_per_pass"]) == 10 and 1 <= burst["passes"] <= 10
    assert all(0 <= n <= 3 for n in burst["shards_retrained_per_pass"])
    # and the report states the targets and draws the histogram
    text = "\n".join(e2e.tables(result))
    assert "Targets:" in text and "10 erasures at 20/s" in text
    figures = e2e.figures(result, tmp_path)
    assert (tmp_path / figures[0].file).read_bytes().startswith(PNG_MAGIC)


@pytest.mark.services
def test_scale_quick_run_measures_each_size(tmp_path):
    # Given a quick scale run (10^3 and 10^4 synthetic rows, real SISA and Amnesiac models)
    result = CliRunner().invoke(main, ["bench", "--quick", "--only", "scale", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    scale = json.loads((tmp_path / "scale.json").read_text())

    # Then every size has a median for every operation over its subjects, storage and memory figures
    assert [p["rows"] for p in scale["points"]] == [1_000, 10_000]
    for point in scale["points"]:
        assert 0 < point["train_rows"] < point["rows"]
        assert set(point["median_ms"]) == set(point["timings_ms"]) == {
            "subject_rows_ms", "placement_ms", "batch_log_holders_ms", "batch_log_steps_ms", "delete_rows_ms"}
        assert all(len(values) == scale["params"]["subjects"] for values in point["timings_ms"].values())
        assert all(ms > 0 for ms in point["median_ms"].values())
        assert point["storage"]["batch_log_steps"] > 0 and point["storage"]["batch_log_bytes_per_row_epoch"] > 0
        assert point["memory"]["rows"] == point["rows"] and point["memory"]["peak_growth"] > 0
    # And the report has its table, its verdicts on issue 11's targets and its figure
    report = (tmp_path / "report.md").read_text()
    assert "## Scale:" in report and "per 10x rows" in report and "B per training row per epoch" in report
    assert (tmp_path / "scale.png").read_bytes().startswith(PNG_MAGIC)


@pytest.mark.services
@pytest.mark.slow
def test_examples_quick_run_measures_both_examples_against_their_monolith(tmp_path):
    # Given a quick run of the two examples (imported through the real import path)
    result = CliRunner().invoke(main, ["bench", "--quick", "--only", "examples", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    figures = json.loads((tmp_path / "examples.json").read_text())

    # Then the Adult network is measured as the monolith, SISA and Amnesiac, each erasing a person
    adult = figures["adult"]
    assert adult["train_rows"] + adult["holdout_rows"] == 2000
    assert [m["method"] for m in adult["methods"]] == ["SISA", "Amnesiac"]
    assert adult["monolith"]["accuracy"] > 0.7  # the majority class alone is 0.76 of the people
    assert all(m["accuracy"] > 0.7 and m["unlearn_seconds"] > 0 for m in adult["methods"])
    assert adult["methods"][0]["verification"] == "exact"
    # And MiniLM with LoRA: the base alone, the monolith's adapter and S3T, whose erasures took no step
    text = figures["text"]
    assert all(_fraction(text[k]["accuracy"]) for k in ("monolith", "s3t")) and _fraction(text["base_accuracy"])
    s3t = text["s3t"]
    assert s3t["layers_trained"] == s3t["shards"] * s3t["orders"] * s3t["slices"] == 2
    assert s3t["erasures_tried"] >= 1 and text["monolith"]["retrain_seconds"] > 0
    report = (tmp_path / "report.md").read_text()
    assert "MiniLM-L6 with LoRA" in report and (tmp_path / "examples.png").read_bytes().startswith(PNG_MAGIC)


def test_the_gpu_benchmark_runs_where_no_service_package_is_installed(tmp_path):
    # Given a Python where importing any service client (or pydantic, Arrow, click) fails
    script = (f"import runpy, sys\nfor name in {SERVICE_PACKAGES!r}:\n    sys.modules[name] = None\n"
              f"sys.argv = ['gpu', '--quick', '--out', {str(tmp_path)!r}]\n"
              "runpy.run_module('worker.bench.gpu', run_name='__main__')\n")
    # When `python -m worker.bench.gpu --quick` runs there
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}, check=False)

    # Then it measured every workload on the CPU (and on CUDA where there is one) and wrote its report
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "gpu.json").read_text())
    assert result["runs"][0]["device"] == "cpu"
    for run in result["runs"]:
        cuda = run["device"] == "cuda"  # the graph mode's comparisons
        assert [p["workload"] for p in run["points"]] == ["monolith", *(["monolith eager"] if cuda else []),
                                                          "SISA S=5,R=2", *(["SISA S=5,R=2 eager"] if cuda else []),
                                                          "S3T S=2,L=2"]
        assert run["mode"] == ("graph" if run["device"] == "cuda" else "eager")
        for point in [*run["points"], run["large"]]:
            assert point["samples"] > 0 and point["samples_per_second"] > 0
            assert point["matmul_share"] is None or 0 < point["matmul_share"] < 1
        assert all(point["unlearn_seconds"] > 0 for point in run["points"])  # one erased row, timed
    assert "samples/s vs CPU" in (tmp_path / "report.md").read_text()
    assert "one-row unlearning s" in (tmp_path / "report.md").read_text()


def test_a_gpu_workload_that_fails_is_reported_and_the_others_kept():
    from worker.bench import gpu

    def capture_fails() -> dict:
        raise RuntimeError("operation not permitted when stream is capturing")

    failed = gpu._recorded("SISA S=20,R=5", capture_fails)
    kept = {"workload": "monolith", "stack": 1, "mode": "eager", "seconds": 2.0, "samples": 400,
            "samples_per_second": 200.0, "matmul_share": 0.5}
    report = {"params": {"dataset": "letter", "large": {"cpu_steps": 30}},
              "runs": [{"device": "cpu", "device_name": "cpu", "mode": "eager", "matmul_flops": 1e11,
                        "points": [kept, failed], "large": {**kept, "workload": "larger"}}]}
    assert gpu.failures(report) == ["cpu: SISA S=20,R=5: RuntimeError: operation not permitted when stream is capturing"]
    lines = "\n".join(gpu.tables(report))
    assert "**failed**: RuntimeError" in lines and "| monolith | cpu (cpu) | 1 | eager | 2.00 | 200 | 50.00% |" in lines
