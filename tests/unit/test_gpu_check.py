"""benchmarks/gpu_check.py on the CPU (no GPU here): its cases parse with the scripts' own parsers,
the dry run lists them, and a failing case is recorded as failed while the next ones still run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import gpu_check  # noqa: E402

from sdft.tiny import build_sd, build_sd3, make_images  # noqa: E402


def test_the_cases_cover_the_issue():
    names = " ".join(case.name for case in gpu_check.CASES)
    for part in ("sd15", "sdxl", "sd3", "fp16", "bf16", "xformers", "adamw8bit", "fp8base", "int8base", "nf4base",
                 "blockswap", "compile", "deepspeed-zero2"):
        assert part in names, part
    assert gpu_check.DEEPSPEED_CONFIG.is_file()


def test_every_case_that_can_run_here_parses_with_its_script(tmp_path, tiny_sdxl):
    models = {"sd": build_sd(tmp_path / "sd"), "sdxl": tiny_sdxl, "sd3": build_sd3(tmp_path / "sd3")}
    data = {"metadata": make_images(tmp_path / "meta", num_images=2, layout="metadata"),
            "images": make_images(tmp_path / "images", num_images=2, layout="images")}
    parsed = 0
    for case in gpu_check.CASES:
        if gpu_check.missing(case) is not None:
            continue   # a package not installed here, or a flag still being merged: gpu_check skips it too
        layout = gpu_check.FAMILIES[case.family].data_layout
        argv = gpu_check.case_argv(case, models[case.family], data[layout], tmp_path / case.name)
        args = gpu_check.script_module(case.family).parse_args(argv)
        assert args.resolution == case.resolution and args.mixed_precision == case.mixed_precision
        parsed += 1
    assert parsed >= 12


def test_dry_run_lists_every_case_and_runs_nothing(tmp_path, capsys):
    results = tmp_path / "results.jsonl"
    assert gpu_check.main(["--dry-run", "--results", str(results)]) == 0
    out = capsys.readouterr().out
    for case in gpu_check.CASES:
        assert f"{case.name}: " in out
    assert "accelerate.commands.launch --config_file" in out and "accelerate_deepspeed_zero2.yaml" in out
    assert not results.exists()


def test_a_failed_case_is_recorded_and_the_next_ones_run(tmp_path, monkeypatch):
    cases = [gpu_check.Case("a-breaks", "sd", "sd15-shaped", 512, "bf16"),
             gpu_check.Case("b-runs", "sd", "sd15-shaped", 512, "bf16"),
             gpu_check.Case("c-needs-a-missing-package", "sd", "sd15-shaped", 512, "bf16",
                            needs=("no_such_package_sdft",))]
    monkeypatch.setattr(gpu_check, "result_line", lambda case, outcome: {"case": case.name, "status": outcome.status,
                                                                        "reason": outcome.reason})
    ran = []

    def run(case, seconds_left):
        ran.append(case.name)
        if case.name == "a-breaks":
            raise RuntimeError("CUDA out of memory")
        return gpu_check.Outcome("ok", figures={"steps_per_s": 1.0})

    results = tmp_path / "results.jsonl"
    gpu_check.run_cases(cases, run, budget_s=600, record=gpu_check.appender(results))
    lines = [json.loads(line) for line in results.read_text().splitlines()]
    assert ran == ["a-breaks", "b-runs"]
    assert [(line["case"], line["status"]) for line in lines] == [
        ("a-breaks", "failed"), ("b-runs", "ok"), ("c-needs-a-missing-package", "skipped")]
    assert "CUDA out of memory" in lines[0]["reason"] and "no_such_package_sdft" in lines[2]["reason"]

    results.unlink()
    gpu_check.run_cases(cases[:2], run, budget_s=0, record=gpu_check.appender(results))
    assert {json.loads(line)["reason"] for line in results.read_text().splitlines()} == {"the time budget was spent"}


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a GPU would run the cases")
def test_without_a_gpu_the_check_refuses_to_run(tmp_path, capsys):
    assert gpu_check.main(["--only", "sd15-lora-bf16-sdpa", "--results", str(tmp_path / "r.jsonl")]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
