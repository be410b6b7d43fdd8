"""The disk caches measured: steps/s with and without them, time to the first step with a cold and a
warm cache, and peak RSS as the data set grows.

    flock /tmp/sdft-heavy.lock .venv/bin/python benchmarks/bench_caches.py speed          # every family, tiny
    flock /tmp/sdft-heavy.lock .venv/bin/python benchmarks/bench_caches.py rss            # 100, 1,000, 10,000 images
    flock /tmp/sdft-heavy.lock .venv/bin/python benchmarks/bench_caches.py speed --family sd --model sd15-shaped

Each measurement is one run of bench_train.py in its own process (so peak RSS is that run's), which
appends its line to results.jsonl as usual; this script only orders the runs (uncached, cold cache,
warm cache) and prints the comparison. The cache folder lives under benchmarks/.cache/caches/ and
is emptied before each cold run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
CACHES = HERE / ".cache" / "caches"
RESULTS = HERE / "results.jsonl"
CACHE_FLAGS = ["--cache_latents_to_disk", "--cache_text_encoder_outputs_to_disk"]


def bench(own: list[str], extra: list[str]) -> dict:
    """One bench_train.py run; its result line."""
    before = RESULTS.read_text().count("\n") if RESULTS.exists() else 0
    command = [sys.executable, str(HERE / "bench_train.py"), *own, "--", *extra]
    print("+", " ".join(command), flush=True)
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    lines = RESULTS.read_text().splitlines()
    if len(lines) <= before:
        raise RuntimeError("bench_train.py recorded no result")
    return json.loads(lines[-1])


def row(label: str, r: dict) -> str:
    return (f"| {label} | {r['num_images']} | {r['steps_per_s']:.2f} | {r['first_step_s_from_train_call']:.1f} | "
            f"{r['first_step_s_by_phase'].get('vae', 0.0):.2f} | {r['peak_rss_mib']} |")


def cold_and_warm(own: list[str], name: str, extra: list[str]) -> tuple[dict, dict]:
    folder = CACHES / name
    shutil.rmtree(folder, ignore_errors=True)
    flags = [*CACHE_FLAGS, "--latents_cache_dir", str(folder), *extra]
    return bench(own, flags), bench(own, flags)


def speed(family: str, model: str, steps: int | None) -> list[str]:
    own = ["--family", family, "--model", model] + (["--steps", str(steps)] if steps else [])
    name = f"{family}-{model}"
    plain = bench(own, ["--random_flip"])
    cold, warm = cold_and_warm(own, name, ["--random_flip"])
    return [row(f"{name}, no caches", plain), row(f"{name}, cold disk caches", cold),
            row(f"{name}, warm disk caches", warm)]


def rss(counts: list[int], steps: int) -> list[str]:
    rows = []
    for count in counts:
        own = ["--family", "sd", "--model", "tiny", "--num-images", str(count), "--steps", str(steps)]
        cold, warm = cold_and_warm(own, f"sd-tiny-{count}", [])
        rows += [row("sd-tiny, cold disk caches", cold), row("sd-tiny, warm disk caches", warm)]
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["speed", "rss"])
    parser.add_argument("--family", choices=["sd", "sdxl", "sd3"], action="append",
                        help="speed: the families (default all three)")
    parser.add_argument("--model", default="tiny", help="speed: the bench_train.py --model (default tiny)")
    parser.add_argument("--steps", type=int, help="timed steps (default: bench_train.py's; 20 for rss)")
    parser.add_argument("--counts", type=int, nargs="+", default=[100, 1000, 10000], help="rss: data set sizes")
    args = parser.parse_args(argv)
    if args.what == "speed":
        rows = [line for family in args.family or ["sd", "sdxl", "sd3"]
                for line in speed(family, args.model, args.steps)]
    else:
        rows = rss(args.counts, args.steps or 20)
    print("\n| run | images | steps/s | first step from main() (s) | of which VAE encoding (s) | peak RSS (MiB) |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
