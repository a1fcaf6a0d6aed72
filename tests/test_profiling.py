"""``fedge profile`` on the tiny model: every figure present or null with a reason, a PNG, clear input errors."""

from __future__ import annotations

import json

import pytest
import torch

from fedge.cli import main
from fedge.common.errors import FedgeError
from fedge.edge_client.device import profiling
from fedge.edge_client.device.inventory import Missing, split_missing
from fedge.edge_client.device.profiling import ProfilePlan
from tests.test_inventory import null_paths

QUICK = ["--steps", "2", "--warmup", "1", "--batch", "2", "--seq-len", "32", "--gen-tokens", "4", "--budget", "0"]


def test_profile_of_a_model_fills_every_field_or_gives_the_reason(tiny_model_dir, tmp_path):
    plan = ProfilePlan(
        model=str(tiny_model_dir), precision="fp32", steps=2, warmup=1, batch=2, seq_len=32, gen_tokens=4, gen_reps=2,
        budget_s=None, interval_s=0.05,
    )  # fmt: skip
    plot = tmp_path / "timeline.png"
    report, reasons = split_missing(profiling.run_profile(plan, tmp_path / "cache", lambda _: None, plot))
    assert null_paths(report) <= set(reasons)
    train, gen = report["training"], report["generation"]
    assert train["plan"]["steps_timed"] == 2 and train["step_s"]["n"] == 2
    assert train["tokens_per_s"] > 0 and train["peak_rss_mb"] > 0 and train["energy_j"] >= 0
    assert gen["new_tokens"] == 4 and gen["tokens_per_s"]["n"] == 2 and gen["tokens_per_s"]["median"] > 0
    assert report["matmul_gflops"]["fp32"]["median"] > 0
    assert set(report["energy"]["phases"]) == {"matmul", "load", "train-warmup", "train", "generate-warmup", "generate"}
    assert report["energy"]["method"] in ("estimated", "rapl", "pmic", "ina3221", "battery", "nvml", "rapl+nvml")
    assert report["energy"]["estimated"] == (report["energy"]["method"] == "estimated")
    assert len(report["timeline"]["t_s"]) == len(report["timeline"]["power_w"]) > 3
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_matmul_of_a_dtype_torch_cannot_multiply_is_missing_with_the_error(monkeypatch):
    def broken(a, b):
        raise RuntimeError("\"addmm_impl_cpu_\" not implemented for 'Half'")

    monkeypatch.setattr(torch, "mm", broken)
    result = profiling.matmul_gflops(torch.float16, budget_s=0.01)
    assert isinstance(result, Missing) and "not implemented" in result.reason


def test_fit_reps_fits_the_budget_within_bounds():
    assert profiling.fit_reps(8, each_s=1.0, budget_s=None, least=1) == 8
    assert profiling.fit_reps(8, each_s=10.0, budget_s=35.0, least=1) == 3
    assert profiling.fit_reps(8, each_s=100.0, budget_s=35.0, least=1) == 1
    assert profiling.fit_reps(8, each_s=0.1, budget_s=35.0, least=1) == 8


def test_plan_errors_name_the_field():
    with pytest.raises(ValueError, match="steps"):
        ProfilePlan(steps=0)
    with pytest.raises(ValueError, match="tdp_w"):
        ProfilePlan(tdp_w=-5)


def test_cli_without_a_model_prints_json_with_reasons(tmp_path, capsys):
    code = main(["--cache-dir", str(tmp_path), "profile", "--model", "none", "--json", "--tdp-watts", "12"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["training"] is None and report["unavailable"]["training"] == "skipped (--model none)"
    assert null_paths(report) <= set(report["unavailable"])
    if report["energy"]["estimated"]:
        assert "TDP 12 W (declared with --tdp-watts)" in report["energy"]["description"]


def test_default_model_not_cached_is_skipped_with_the_pull_command(tmp_path):
    model, reason = profiling.resolve_model(None, tmp_path / "empty-cache")
    assert model is None and "fedge model pull smollm2-135m" in reason


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "/no/such/model/dir"], "no such file or directory"),
        (["--model", "not-a-model"], "unknown model"),
        (["--plot", "/no/such/dir/t.png"], "cannot write there"),
        (["--plot", "timeline.jpg"], "expected a .png"),
        (["--steps", "0"], "steps must be >= 1"),
    ],
)
def test_bad_input_is_one_line_and_exit_2_before_measuring(args, message, tmp_path, capsys, monkeypatch):
    def measured():
        raise AssertionError("measured before checking the input")

    monkeypatch.setattr("fedge.edge_client.device.inventory.collect", measured)
    assert main(["--cache-dir", str(tmp_path), "profile", *QUICK, *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_an_unwritable_plot_fails_before_measuring(tmp_path):
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(FedgeError, match="is a directory"):
        profiling.check_plot_path(tmp_path / "dir.png")


def test_cli_table_for_people(tmp_path, capsys):
    assert main(["--cache-dir", str(tmp_path), "profile", "--model", "none", "--plot", str(tmp_path / "t.png")]) == 0
    captured = capsys.readouterr()
    assert "fedge profile" in captured.out and "fp32 GFLOP/s" in captured.out and "skipped" in captured.out
    assert (tmp_path / "t.png").is_file()
