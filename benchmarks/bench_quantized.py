"""Peak memory and loss of an SDXL-shaped LoRA run on a quantized base (issue 22), next to the same
run on the bf16 base: one `bench_train.py` process per case (so each has its own peak RSS), the
same seed, data and 20 steps, the per-step training loss read back from the run's TensorBoard log.

    flock /tmp/sdft-heavy.lock .venv/bin/python benchmarks/bench_quantized.py            # bf16, int8, fp8, nf4
    flock /tmp/sdft-heavy.lock .venv/bin/python benchmarks/bench_quantized.py int8 --text-encoders
    flock /tmp/sdft-heavy.lock .venv/bin/python benchmarks/bench_quantized.py --family sd --model sd15-shaped

Results: benchmarks/quantized_results.jsonl (one line per case, with bench_train.py's own line) and
the table in benchmarks/quantized_base.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "quantized_results.jsonl"
BENCH_RESULTS = HERE / "results.jsonl"
STEPS, WARMUP = 18, 2     # 20 optimizer steps in all


def losses(logs: Path) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values = {}
    for events in logs.rglob("events.out.tfevents*"):
        accumulator = EventAccumulator(str(events.parent))
        accumulator.Reload()
        if "train_loss" in accumulator.Tags()["scalars"]:
            values.update({event.step: event.value for event in accumulator.Scalars("train_loss")})
    return [values[step] for step in sorted(values)]


def run_case(fmt: str | None, text_encoders: bool, resolution: int, family: str, model: str) -> dict:
    extra = ["--report_to", "tensorboard"]
    if fmt:
        extra += ["--base_precision", fmt] + (["--text_encoder_precision", fmt] if text_encoders else [])
    before = BENCH_RESULTS.read_text().count("\n") if BENCH_RESULTS.exists() else 0
    subprocess.run([sys.executable, str(HERE / "bench_train.py"), "--family", family, "--model", model,
                    "--use-lora", "--mixed-precision", "bf16", "--resolution", str(resolution), "--steps", str(STEPS),
                    "--warmup-steps", str(WARMUP), "--keep-output", "--", *extra], check=True)
    line = json.loads(BENCH_RESULTS.read_text().splitlines()[before])
    output = Path(line["train_args"][line["train_args"].index("--output_dir") + 1])
    output = output if output.is_absolute() else HERE.parent / output
    result = {"family": family, "model": model, "case": fmt or "bf16",
              "text_encoders": fmt if fmt and text_encoders else "bf16",
              "peak_rss_mib": line["peak_rss_mib"], "peak_rss_mib_incl_save": line["peak_rss_mib_incl_save"],
              "rss_mib_at_last_step": line["rss_mib_at_last_step"], "steps_per_s": line["steps_per_s"],
              "load_average_1min": line["load_average_1min"], "date": line["date"], "git_commit": line["git_commit"],
              "losses": losses(output / "logs")}
    shutil.rmtree(output, ignore_errors=True)
    return result


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="*", default=["bf16", "int8", "fp8", "nf4"])
    parser.add_argument("--text-encoders", action="store_true", help="quantize the text encoders too")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--family", default="sdxl", choices=["sd", "sdxl", "sd3"])
    parser.add_argument("--model", default="sdxl-shaped", help="bench_train.py's --model (sd15-shaped for --family sd)")
    args = parser.parse_args(argv)
    for case in args.cases:
        result = run_case(None if case == "bf16" else case, args.text_encoders, args.resolution, args.family, args.model)
        with RESULTS.open("a") as handle:
            handle.write(json.dumps(result) + "\n")
        print(json.dumps({k: v for k, v in result.items() if k != "losses"}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
