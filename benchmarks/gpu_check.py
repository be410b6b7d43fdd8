"""One unattended GPU check (issue 22): the shaped SD 1.5, SDXL and SD3 models through the real scripts
on one CUDA GPU, with fp16 and bf16, SDPA and xformers, 8-bit AdamW, fp8/int8/nf4 bases, block swap,
torch.compile and a 1-GPU DeepSpeed ZeRO-2 full fine-tune, each case's steady steps/s and
`torch.cuda.max_memory_allocated` (the run summary's "peak memory") appended to benchmarks/results.jsonl.

    .venv/bin/python benchmarks/gpu_check.py --dry-run      # the cases, what each needs, the commands
    .venv/bin/python benchmarks/gpu_check.py                 # run them (one CUDA GPU, no network)
    .venv/bin/python benchmarks/gpu_check.py --only sd15     # the cases whose name contains "sd15"

Each case is its own `accelerate launch` (so each has its own CUDA peak, and one that crashes cannot
stop the others): a case that fails is recorded as failed with the end of its output, and the next one
runs. A case whose package (xformers, bitsandbytes, deepspeed, torchao) is not installed, or whose
flag this build of the scripts does not have yet, is recorded as skipped. The cases run in order of
importance within a time budget (--budget-s, 5 minutes by default); those left when it runs out are
recorded as skipped too. The shaped models are built first, once, into benchmarks/.cache
(bench_train.py's folders; on this project's 2-core CPU machine that took 1-2 minutes each, a
16-core GPU machine should be quicker), so a first check stays near 8 minutes on one H100, a second
one near 5. Not yet run on a GPU: no GPU machine was lent to the session that wrote it.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

from bench_train import FAMILIES, git_commit, image_folder, model_folder, versions  # noqa: E402

RESULTS = HERE / "results.jsonl"
DEEPSPEED_CONFIG = HERE / "accelerate_deepspeed_zero2.yaml"
STEPS = 6                       # the summary's steady rate leaves out the first (and any compiling) step
CASE_TIMEOUT_S = 240


@dataclass(frozen=True)
class Case:
    name: str
    family: str                  # sd, sdxl, sd3 (bench_train.FAMILIES)
    model: str                   # the shaped model of that family
    resolution: int
    mixed_precision: str
    flags: tuple[str, ...] = ()
    needs: tuple[str, ...] = ()  # importable packages
    new_flags: tuple[str, ...] = ()   # flags of features still being merged: skipped when the script lacks them
    deepspeed: bool = False      # launched with DEEPSPEED_CONFIG


LORA = ("--use_lora", "--rank", "16")
LOW_MEMORY_FULL = ("--optimizer", "adafactor", "--fused_backward_pass", "--full_bf16")

CASES = [
    Case("sd15-full-bf16-sdpa", "sd", "sd15-shaped", 512, "bf16"),
    Case("sd15-full-fp16-sdpa", "sd", "sd15-shaped", 512, "fp16"),
    Case("sd15-lora-bf16-sdpa", "sd", "sd15-shaped", 512, "bf16", LORA),
    Case("sd15-lora-bf16-xformers", "sd", "sd15-shaped", 512, "bf16",
         (*LORA, "--enable_xformers_memory_efficient_attention"), needs=("xformers",)),
    Case("sd15-full-bf16-adamw8bit", "sd", "sd15-shaped", 512, "bf16", ("--use_8bit_adam",),
         needs=("bitsandbytes",)),
    Case("sd15-lora-bf16-compile", "sd", "sd15-shaped", 512, "bf16", (*LORA, "--torch_compile")),
    Case("sd15-full-bf16-compile", "sd", "sd15-shaped", 512, "bf16", ("--torch_compile",)),
    Case("sd15-full-bf16-blockswap4", "sd", "sd15-shaped", 512, "bf16", ("--blocks_to_swap", "4")),
    Case("sd15-full-bf16-deepspeed-zero2", "sd", "sd15-shaped", 512, "bf16", needs=("deepspeed",),
         deepspeed=True),
    Case("sdxl-lora-bf16", "sdxl", "sdxl-shaped", 1024, "bf16", (*LORA, "--gradient_checkpointing")),
    Case("sdxl-lora-bf16-fp8base", "sdxl", "sdxl-shaped", 1024, "bf16",
         (*LORA, "--gradient_checkpointing", "--base_precision", "fp8"), needs=("torchao",),
         new_flags=("--base_precision",)),
    Case("sdxl-lora-bf16-int8base", "sdxl", "sdxl-shaped", 1024, "bf16",
         (*LORA, "--gradient_checkpointing", "--base_precision", "int8"), needs=("torchao",),
         new_flags=("--base_precision",)),
    Case("sdxl-lora-bf16-nf4base", "sdxl", "sdxl-shaped", 1024, "bf16",
         (*LORA, "--gradient_checkpointing", "--base_precision", "nf4"), needs=("bitsandbytes",),
         new_flags=("--base_precision",)),
    Case("sdxl-full-bf16-fused-blockswap6", "sdxl", "sdxl-shaped", 1024, "bf16",
         (*LOW_MEMORY_FULL, "--gradient_checkpointing", "--blocks_to_swap", "6")),
    Case("sd3-lora-bf16", "sd3", "sd3-medium-shaped", 1024, "bf16", LORA),
    Case("sd3-lora-bf16-compile", "sd3", "sd3-medium-shaped", 1024, "bf16", (*LORA, "--torch_compile")),
    Case("sd3-full-bf16-blockswap2", "sd3", "sd3-medium-shaped", 1024, "bf16", ("--blocks_to_swap", "2")),
    Case("sd3-full-bf16-fused-blockswap2", "sd3", "sd3-medium-shaped", 1024, "bf16",
         (*LOW_MEMORY_FULL, "--blocks_to_swap", "2")),
    Case("sd3-lora-bf16-nf4base", "sd3", "sd3-medium-shaped", 1024, "bf16", (*LORA, "--base_precision", "nf4"),
         needs=("bitsandbytes",), new_flags=("--base_precision",)),
]


@dataclass
class Outcome:
    status: str                  # ok, failed, skipped
    reason: str = ""
    figures: dict = field(default_factory=dict)


def script_module(family: str):
    return importlib.import_module(FAMILIES[family].script)


def case_argv(case: Case, model: Path, data: Path, output: Path) -> list[str]:
    """The training script's arguments for this case."""
    data_args = [arg.replace("{data}", str(data)) for arg in FAMILIES[case.family].data_args]
    return ["--pretrained_model_name_or_path", str(model), *data_args, "--output_dir", str(output),
            "--resolution", str(case.resolution), "--train_batch_size", "1", "--max_train_steps", str(STEPS),
            "--checkpointing_steps", str(STEPS + 1), "--report_to", "none", "--seed", "0",
            "--mixed_precision", case.mixed_precision, "--learning_rate", "1e-5", "--lr_warmup_steps", "0",
            "--skip_memory_check", *case.flags]


def launch_command(case: Case, argv: list[str]) -> list[str]:
    launcher = [sys.executable, "-m", "accelerate.commands.launch"]
    if case.deepspeed:
        launcher += ["--config_file", str(DEEPSPEED_CONFIG)]
    else:
        launcher += ["--num_processes", "1", "--num_machines", "1", "--dynamo_backend", "no",
                     "--mixed_precision", case.mixed_precision]
    return [*launcher, str(REPO / f"{FAMILIES[case.family].script}.py"), *argv]


def missing(case: Case) -> str | None:
    """Why this case cannot run in this environment (None: it can)."""
    absent = [name for name in case.needs if importlib.util.find_spec(name) is None]
    if absent:
        return f"not installed: {', '.join(absent)}"
    if case.new_flags:
        known = {option for action in script_module(case.family).build_parser()._actions
                 for option in action.option_strings}
        lacking = [flag for flag in case.new_flags if flag not in known]
        if lacking:
            return f"this build of the scripts has no {', '.join(lacking)} yet"
    return None


def summary_figures(output: str) -> dict:
    """The run summary's steady steps/s and CUDA peak (sdft.run_stats) from a case's log."""
    figures = {}
    rate = re.search(r"steady steps/s: ([\d.]+)", output)
    peak = re.search(r"peak memory: ([\d.]+) GiB CUDA max allocated", output)
    compiled = re.search(r"compile time: ([\d.]+) s", output)
    first = re.search(r"time to first step: ([\d.]+) s", output)
    if rate:
        figures["steps_per_s"] = float(rate.group(1))
    if peak:
        figures["max_memory_allocated_gib"] = float(peak.group(1))
    if compiled:
        figures["compile_s"] = float(compiled.group(1))
    if first:
        figures["time_to_first_step_s"] = float(first.group(1))
    return figures


def run_case(case: Case, work: Path, timeout_s: float) -> Outcome:
    model, _ = model_folder(case.family, case.model)
    data = image_folder(8, FAMILIES[case.family].data_layout)
    command = launch_command(case, case_argv(case, model, data, work / case.name))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": str(REPO)}
    try:
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return Outcome("failed", f"timed out after {timeout_s:.0f} s")
    output = done.stdout + done.stderr
    if done.returncode != 0:
        return Outcome("failed", f"exit {done.returncode}: {output[-1500:]}")
    figures = summary_figures(output)
    if "steps_per_s" not in figures:
        return Outcome("failed", f"no run summary in the output: {output[-1500:]}")
    return Outcome("ok", figures=figures)


def run_cases(cases: list[Case], run, budget_s: float, record) -> list[tuple[Case, Outcome]]:
    """Every case in order: skipped when it cannot run here or the budget is spent, else `run(case,
    seconds left)`; an exception is a failed case, and the next one runs. `record` gets each result."""
    started = time.monotonic()
    results = []
    for case in cases:
        left = budget_s - (time.monotonic() - started)
        reason = missing(case)
        if reason is None and left < 30:
            reason = "the time budget was spent"
        if reason is not None:
            outcome = Outcome("skipped", reason)
        else:
            try:
                outcome = run(case, min(CASE_TIMEOUT_S, left))
            except Exception as err:  # noqa: BLE001 - a broken case must not stop the check
                outcome = Outcome("failed", f"{type(err).__name__}: {err}")
        record(case, outcome)
        results.append((case, outcome))
    return results


def result_line(case: Case, outcome: Outcome) -> dict:
    import torch

    return {"check": "gpu_check", "case": case.name, "status": outcome.status, "reason": outcome.reason,
            **outcome.figures, "family": case.family, "model": case.model, "resolution": case.resolution,
            "mixed_precision": case.mixed_precision, "flags": list(case.flags), "deepspeed": case.deepspeed,
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "commit": git_commit(),
            "versions": versions()}


def appender(path: Path):
    def record(case: Case, outcome: Outcome) -> None:
        line = result_line(case, outcome)
        with path.open("a") as out:
            out.write(json.dumps(line) + "\n")
        shown = ", ".join(f"{k} {v}" for k, v in outcome.figures.items()) or outcome.reason.splitlines()[0][:200]
        print(f"[{outcome.status:7}] {case.name}: {shown}", flush=True)
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="list the cases and their commands; run nothing")
    parser.add_argument("--only", default=None, help="only the cases whose name contains this")
    parser.add_argument("--budget-s", type=float, default=300.0, help="seconds for all cases (default 300)")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--work", type=Path, default=HERE / ".cache" / "gpu_check")
    args = parser.parse_args(argv)
    cases = [c for c in CASES if args.only is None or args.only in c.name]
    if args.dry_run:
        for case in cases:
            reason = missing(case)
            argv_ = case_argv(case, Path(f"<{case.family}-{case.model}>"), Path("<images>"), args.work / case.name)
            print(f"{case.name}: {'runs' if reason is None else 'skipped, ' + reason}\n  "
                  f"{' '.join(launch_command(case, argv_))}")
        return 0
    import torch

    if not torch.cuda.is_available():
        print("gpu_check needs a CUDA GPU (use --dry-run to list the cases).", file=sys.stderr)
        return 2
    for family, model in dict.fromkeys((c.family, c.model) for c in cases if missing(c) is None):
        model_folder(family, model)   # built before the clock starts
    results = run_cases(cases, lambda case, left: run_case(case, args.work, left), args.budget_s,
                        appender(args.results))
    counts = {s: sum(o.status == s for _, o in results) for s in ("ok", "failed", "skipped")}
    print(f"gpu_check: {counts['ok']} ok, {counts['failed']} failed, {counts['skipped']} skipped -> {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
