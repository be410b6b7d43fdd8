"""Time a checkpoint save (`sdft.checkpointing.Checkpointer.save`), the work a preempted run must
finish inside its grace period after the current step.

    .venv/bin/python benchmarks/bench_checkpoint.py --model tiny
    flock /tmp/sdft-heavy.lock .venv/bin/python benchmarks/bench_checkpoint.py --model sd15-shaped

It loads the benchmark's cached SD model folder (built by bench_train.py, once), takes one AdamW
step with random gradients so the optimizer holds its two moments, as in a real run, and then saves
`--repeats` checkpoints of it the way the trainer does: the UNet in diffusers format, accelerate's
optimizer, scheduler and RNG states, the manifest, fsync of every file and folder, the rename.
The fsync share is measured by timing `fsync_tree` separately. One JSON line per run is appended
to benchmarks/checkpoint_results.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_train  # noqa: E402  (after the offline switch)
import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from diffusers import StableDiffusionPipeline, UNet2DConditionModel  # noqa: E402

from sdft import checkpointing  # noqa: E402
from sdft.checkpointing import Checkpointer, Position, TrainedWeights  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "checkpoint_results.jsonl"


def trained_unet(folder: Path, accelerator: Accelerator):
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-5, fused=True)
    unet, optimizer = accelerator.prepare(unet, optimizer)
    for param in unet.parameters():
        param.grad = torch.randn_like(param)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return accelerator.unwrap_model(unet)


def timed_saves(checkpointer: Checkpointer, repeats: int) -> tuple[list[float], list[float], int]:
    fsync_s = []
    real_fsync_tree = checkpointing.fsync_tree

    def timed_fsync_tree(folder):
        start = time.perf_counter()
        real_fsync_tree(folder)
        fsync_s.append(time.perf_counter() - start)

    checkpointing.fsync_tree = timed_fsync_tree
    totals, size = [], 0
    try:
        for step in range(1, repeats + 1):
            start = time.perf_counter()
            folder = checkpointer.save(Position(global_step=step, seed=0))
            totals.append(time.perf_counter() - start)
            size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
            shutil.rmtree(folder)   # the next save must write its files anew, not find them cached
    finally:
        checkpointing.fsync_tree = real_fsync_tree
    return totals, fsync_s, size


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["tiny", "sd15-shaped"], default="tiny")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-record", action="store_true")
    bench = parser.parse_args(argv)
    folder, _ = bench_train.model_folder("sd", bench.model)
    output = bench_train.CACHE / "runs" / f"checkpoint-{bench.model}-{os.getpid()}"
    accelerator = Accelerator()
    unet = trained_unet(folder, accelerator)
    weights = TrainedWeights(StableDiffusionPipeline, {"unet": unet}, lora=False)
    try:
        totals, fsync_s, size = timed_saves(Checkpointer(accelerator, output, None, weights), bench.repeats)
    finally:
        shutil.rmtree(output, ignore_errors=True)
    record = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/bench_checkpoint.py " + " ".join(argv),
        "git_commit": bench_train.git_commit(), "versions": bench_train.versions(), "machine": bench_train.machine(),
        "model": f"sd/{bench.model}", "trainable_params": sum(p.numel() for p in unet.parameters()),
        "checkpoint_bytes": size, "save_s": [round(t, 2) for t in totals], "fsync_s": [round(t, 2) for t in fsync_s],
        "load_average_1min": round(os.getloadavg()[0], 2),
    }
    print(json.dumps(record, indent=1))
    if not bench.no_record:
        with RESULTS.open("a") as results:
            results.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
