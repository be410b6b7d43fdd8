"""Memory of a full fine-tune as users launch it: `accelerate launch --cpu --num_processes 1`, the
resident memory (RSS) of the whole process tree (the launcher and the trainer) sampled every 0.2 s
from start to exit, saving included, and the trainer's own resident memory at the end of each step
(its run summary, `sdft.run_stats`).

    flock /tmp/sdft-heavy.lock .venv/bin/python benchmarks/bench_launch_memory.py --family sdxl --model sdxl-shaped
    flock /tmp/sdft-heavy.lock .venv/bin/python benchmarks/bench_launch_memory.py --family sd --model sd15-shaped

The training flags are the low-memory recipe of issue 26 (`--optimizer adafactor --fused_backward_pass
--full_bf16 --gradient_checkpointing --mixed_precision bf16`, batch 1, 64 px, 3 steps, lr 1e-4
constant) on the cached shaped model folders and a captioned image folder of bench_train.py;
arguments after `--` are added. Each run appends one JSON line to benchmarks/launch_memory_results.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import bench_train as bt

RESULTS = bt.HERE / "launch_memory_results.jsonl"
RECIPE = ["--optimizer", "adafactor", "--fused_backward_pass", "--full_bf16", "--gradient_checkpointing",
          "--mixed_precision", "bf16", "--learning_rate", "1e-4", "--lr_scheduler", "constant"]


def rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return 0.0


def descendants(root: int) -> list[int]:
    """`root` and every process below it (from each process's parent id in /proc/*/stat)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    tree, frontier = [root], [root]
    while frontier:
        frontier = [pid for pid, parent in parents.items() if parent in frontier]
        tree += frontier
    return tree


class TreeSampler(threading.Thread):
    """Sums VmRSS over the process tree every `interval` s until the root exits."""

    def __init__(self, root: int, interval: float = 0.2):
        super().__init__(daemon=True)
        self.root, self.interval, self.samples, self.start_time = root, interval, [], time.time()
        self.peak = (0.0, 0.0, {})   # (MiB, seconds from start, MiB per process)

    def run(self) -> None:
        while Path(f"/proc/{self.root}").exists():
            per_process = {pid: rss_mib(pid) for pid in descendants(self.root)}
            total, at = sum(per_process.values()), time.time() - self.start_time
            self.samples.append((round(at, 1), round(total)))
            if total > self.peak[0]:
                self.peak = (total, at, per_process)
            time.sleep(self.interval)


def summary_value(log: str, key: str) -> str | None:
    found = re.findall(rf"{re.escape(key)}: (.*)", log)
    return found[-1].strip() if found else None


def estimate_lines(log: str) -> list[str]:
    """The memory estimate the trainer printed before loading, as printed."""
    lines = log.splitlines()
    start = next((i for i, line in enumerate(lines) if "Memory estimate for training" in line), None)
    if start is None:
        return []
    block = [lines[start]]
    for line in lines[start + 1:]:
        if not line.startswith("  "):
            break
        block.append(line)
    return block


def train_argv(bench: argparse.Namespace, extra: list[str]) -> tuple[list[str], Path]:
    family = bt.FAMILIES[bench.family]
    model, _ = bt.model_folder(bench.family, bench.model)
    data = bt.image_folder(bench.num_images, family.data_layout)
    output = bt.CACHE / "runs" / f"launch-{bench.family}-{bench.model}-{os.getpid()}"
    argv = [str(bt.REPO / f"{family.script}.py"), "--pretrained_model_name_or_path", str(model),
            *(arg.replace("{data}", str(data)) for arg in family.data_args), "--output_dir", str(output),
            "--resolution", "64", "--train_batch_size", "1", "--max_train_steps", str(bench.steps),
            "--checkpointing_steps", str(bench.steps + 1), "--report_to", "none", "--seed", "0", *RECIPE]
    if bench.text_cache:  # the encoded captions are reused by the next run (the encoders are still loaded)
        argv += ["--cache_text_encoder_outputs_to_disk", "--latents_cache_dir",
                 str(bt.CACHE / "launch-text-cache" / f"{bench.family}-{bench.model}")]
    return argv + extra, output


def run(bench: argparse.Namespace, extra: list[str]) -> dict:
    argv, output = train_argv(bench, extra)
    launcher = [str(Path(sys.executable).with_name("accelerate")), "launch", "--cpu", "--num_processes", "1",
                "--num_machines", "1", "--mixed_precision", "bf16", "--dynamo_backend", "no"]
    load_before, started, commit = os.getloadavg(), time.time(), bt.git_commit()   # the code that runs
    process = subprocess.Popen(launcher + argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sampler = TreeSampler(process.pid)
    sampler.start()
    log = process.communicate()[0]
    sampler.join()
    shutil.rmtree(output, ignore_errors=True)
    if process.returncode != 0:
        sys.exit(f"bench_launch_memory.py: the run failed ({process.returncode}):\n{log[-4000:]}")
    peak, peak_at, per_process = sampler.peak
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "launch": " ".join(launcher[1:] + [a.replace(str(bt.REPO), ".") for a in argv]),
        "git_commit": commit, "versions": bt.versions(), "machine": bt.machine(),
        "family": bench.family, "model": bench.model, "steps": bench.steps, "num_images": bench.num_images,
        "text_cache_on_disk": bench.text_cache,
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "wall_s": round(time.time() - started, 1),
        "peak_tree_rss_mib": round(peak), "peak_at_s": round(peak_at, 1),
        "peak_per_process_mib": {str(pid): round(mib) for pid, mib in per_process.items()},
        "trainer_peak": summary_value(log, "peak memory"),
        "trainer_resident_at_step_ends": summary_value(log, "resident at step ends"),
        "estimate": estimate_lines(log),
        "tree_rss_mib_every_1s": sampler.samples[::5],
    }


def print_report(r: dict) -> None:
    print(f"\npeak RSS of the process tree: {r['peak_tree_rss_mib']} MiB ({r['peak_tree_rss_mib'] / 1024:.2f} GiB), "
          f"{r['peak_at_s']} s after the start (per process: {r['peak_per_process_mib']})")
    print(f"trainer: {r['trainer_peak']}; resident at step ends: {r['trainer_resident_at_step_ends']}")
    print("\n".join(r["estimate"]))
    print(f"wall {r['wall_s']} s; load average before {r['load_average_before']}, after {r['load_average_after']}")


def main(argv: list[str]) -> int:
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=sorted(bt.FAMILIES), default="sdxl")
    parser.add_argument("--model", default="sdxl-shaped")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--num-images", type=int, default=32)
    parser.add_argument("--no-text-cache", dest="text_cache", action="store_false",
                        help="encode the captions in RAM (default: a disk cache reused between runs)")
    parser.add_argument("--no-record", action="store_true")
    bench = parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    result = run(bench, extra)
    print_report(result)
    if not bench.no_record:
        with RESULTS.open("a", encoding="utf-8") as f:
            f.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
