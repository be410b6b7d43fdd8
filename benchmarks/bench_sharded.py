"""Peak resident memory per process of a 2-process full fine-tune of the SD 1.5-shaped UNet on the
CPU (gloo): DDP against FSDP2 (`accelerate launch --use_fsdp --fsdp_version 2`).

Each engine is one real `accelerate launch train_text_to_image.py` run; the workers' RSS is sampled
every 50 ms (psutil) and the peak of each is reported. The optimizer is plain SGD on fp32 weights
(--optimizer_type torch.optim.SGD, no state): fp32 AdamW DDP (16 bytes per parameter, 14 GB per
process for 860 M parameters) does not fit twice in a 24 GiB machine; SGD DDP still needs weights,
gradients and DDP's gradient buckets (about 10 GB per process), so run it on an otherwise idle
machine. (--full_bf16 is not used: on 2 CPU processes DDP with --full_bf16 --optimizer adafactor
ended with "Trained weights differ between processes" on 2026-12-07.) Results are appended to
benchmarks/sharded_results.jsonl and described in benchmarks/README.md. Heavy: run it under
`flock /tmp/sdft-heavy.lock`.

    flock /tmp/sdft-heavy.lock .venv/bin/python benchmarks/bench_sharded.py [--steps 2] [--model tiny]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
RESULTS = HERE / "sharded_results.jsonl"
ENGINES = {"ddp": ["--multi_gpu"], "fsdp2": ["--use_fsdp", "--fsdp_version", "2"]}


def run_engine(engine: str, model: Path, data: Path, output: Path, steps: int) -> dict:
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0", *ENGINES[engine],
               str(REPO / "train_text_to_image.py"), "--pretrained_model_name_or_path", str(model),
               "--train_data_dir", str(data), "--output_dir", str(output), "--resolution", "64",
               "--train_batch_size", "1", "--max_train_steps", str(steps), "--learning_rate", "1e-4",
               "--lr_warmup_steps", "0", "--seed", "0", "--optimizer_type", "torch.optim.SGD",
               "--checkpointing_steps", "100000"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}
    started = time.perf_counter()
    launcher = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peaks = sample_workers(launcher)
    log = launcher.stdout.read()
    if launcher.returncode != 0:
        raise SystemExit(f"{engine} run failed:\n{log[-4000:]}")
    return {"engine": engine, "peak_rss_gib": sorted(round(v / 2**30, 2) for v in peaks.values()),
            "wall_s": round(time.perf_counter() - started, 1)}


def sample_workers(launcher: subprocess.Popen) -> dict[int, int]:
    """Peak RSS of each training worker (the launcher's descendants running the script)."""
    parent, peaks = psutil.Process(launcher.pid), {}
    while launcher.poll() is None:
        for child in parent.children(recursive=True):
            try:
                if "train_text_to_image.py" in " ".join(child.cmdline()):
                    peaks[child.pid] = max(peaks.get(child.pid, 0), child.memory_info().rss)
            except psutil.NoSuchProcess:
                continue
        time.sleep(0.05)
    return peaks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=list(ENGINES))
    parser.add_argument("--model", default="sd15-shaped", choices=["sd15-shaped", "tiny"],
                        help="tiny: a quick check of the script itself (the libraries dominate its RSS)")
    args = parser.parse_args()
    from bench_train import model_folder

    from sdft.tiny import make_images

    model, _ = model_folder("sd", args.model)
    with tempfile.TemporaryDirectory() as scratch:
        data = make_images(Path(scratch) / "images", num_images=4, layout="metadata", size=64)
        rows = [run_engine(engine, model, data, Path(scratch) / engine, args.steps) for engine in args.engines]
    load = os.getloadavg()
    for row in rows:
        row.update(date=datetime.now(timezone.utc).isoformat(timespec="seconds"), steps=args.steps,
                   loadavg=[round(x, 2) for x in load], model=args.model, torch=__import__("torch").__version__)
        print(json.dumps(row))
        with RESULTS.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
    if len(rows) == 2:
        print(f"FSDP2 / DDP peak RSS per process: {max(rows[1]['peak_rss_gib']) / max(rows[0]['peak_rss_gib']):.2f}")


if __name__ == "__main__":
    main()
