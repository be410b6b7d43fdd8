"""Time real training steps: steps/s, time to first step, peak RSS, and where a step's time goes.

    .venv/bin/python benchmarks/bench_train.py --model tiny
    .venv/bin/python benchmarks/bench_train.py --model tiny --use-lora
    .venv/bin/python benchmarks/bench_train.py --model sd15-shaped --steps 5
    .venv/bin/python benchmarks/bench_train.py --model sd15-shaped --use-lora -- --rank 8
    .venv/bin/python benchmarks/bench_train.py --family sdxl
    .venv/bin/python benchmarks/bench_train.py --family sdxl --model sdxl-shaped --use-lora
    .venv/bin/python benchmarks/bench_train.py --family sd3 --model sd3-medium-shaped
    .venv/bin/python benchmarks/bench_train.py --print-results      # results.jsonl as a table

It runs the training code users run, in this process (no `accelerate launch`): the script's own
`parse_args` builds the namespace and its own `main(args)` builds, trains and exports the run,
then returns it. The step times are the trainer's own (`sdft.run_stats.RunStats`, `run.stats`):
nothing is patched, so the benchmark times what every run logs in its summary. Memory and CPU use
are sampled from /proc in a thread while main() runs. Arguments after `--` go to the training
script unchanged. Each run appends one JSON line to benchmarks/results.jsonl. Models and images
are built once, offline, under benchmarks/.cache.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

for _name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_name, "1")  # before the Hugging Face libraries read them at import
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))  # the training scripts live at the repository root

import argparse  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from datetime import datetime, timezone  # noqa: E402
from typing import Callable  # noqa: E402

import torch  # noqa: E402
from shaped_models import (  # noqa: E402
    SD3_MEDIUM_LAYERS,
    SD3_T5_LAYERS,
    build_sd3_medium_shaped,
    build_sd15_shaped,
    build_sdxl_shaped,
)

from sdft import memory_estimate, tiny  # noqa: E402
from sdft.builders import memory_setup  # noqa: E402
from sdft.errors import UserError  # noqa: E402
from sdft.run_stats import RunStats  # noqa: E402
from sdft.stepping import OptimizerStepper  # noqa: E402

CACHE = HERE / ".cache"
RESULTS = HERE / "results.jsonl"


# --------------------------------------------------------------------------- memory and CPU


def peak_rss_mib() -> float:
    # ru_maxrss is in KiB on Linux, bytes on macOS.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024) / 2**20


def resident_mib() -> dict[str, float]:
    """VmRSS (resident now) and its RssAnon (allocations) and RssFile (mapped files) parts, from
    /proc/self/status (Linux; zeros elsewhere)."""
    found = dict.fromkeys(("VmRSS", "RssAnon", "RssFile"), 0.0)
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key = line.split(":", 1)[0]
            if key in found:
                found[key] = int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return found


def machine_cpu_s() -> float:
    """Busy CPU seconds of all processes since boot, from /proc/stat (0 where it does not exist)."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0.0
    idle = fields[3] + fields[4]  # idle + iowait; guest time is already inside user
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


@dataclass
class Sample:
    at: float               # time.time(), the clock RunStats stamps its steps with
    peak_rss_mib: float     # ru_maxrss so far
    resident: dict          # resident_mib()
    cpu_s: float            # user + system CPU time of this process so far
    machine_cpu_s: float


class Sampler:
    """Samples memory and CPU use every `interval` s in a thread, so that figures "at the last step"
    can be read off afterwards at the time RunStats stamped (to within one interval). ru_maxrss
    counts mapped weight-file pages, which the kernel can drop and re-read, as if they were
    allocations; the RssAnon/RssFile peaks split them. A peak shorter than the interval can be missed."""

    def __init__(self, interval: float = 0.05):
        self.interval, self.samples, self._stop = interval, [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "Sampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while True:
            self.samples.append(Sample(time.time(), peak_rss_mib(), resident_mib(), time.process_time(), machine_cpu_s()))
            if self._stop.wait(self.interval):
                return

    def at(self, moment: float) -> Sample:
        """The last sample taken at or before `moment`."""
        before = [sample for sample in self.samples if sample.at <= moment]
        return before[-1] if before else self.samples[0]

    def peak(self, key: str) -> float:
        return max(s.resident[key] for s in self.samples)


def cpu_use(sampler: Sampler, start: float, end: float) -> dict:
    """Cores used by this run and by all other processes between two moments: on a shared machine
    the second says how far to trust the timings."""
    a, b = sampler.at(start), sampler.at(end)
    seconds = b.at - a.at
    if seconds <= 0:
        return {"cpu_cores_used": 0.0, "other_processes_cpu_cores": 0.0}
    own = b.cpu_s - a.cpu_s
    return {"cpu_cores_used": round(own / seconds, 2),
            "other_processes_cpu_cores": round(max(0.0, b.machine_cpu_s - a.machine_cpu_s - own) / seconds, 2)}


# --------------------------------------------------------------------------- what the trainer's timers say


def step_figures(stats: RunStats, warmup: int, *, main_start: float, build_s: float = 0.0) -> dict:
    """Throughput and phase times over the steps after `warmup`, and the first step's breakdown,
    from the trainer's own RunStats. A step is RunStats': the wait for its batches and its phases
    (logging, checkpoints and validation between steps are left out)."""
    timed = len(stats.step_s) - warmup
    if timed < 1 or stats.first_step_at is None:
        raise RuntimeError(f"the run recorded {len(stats.step_s)} optimizer steps; {warmup} are warm-up")
    elapsed = sum(stats.step_s[warmup:])
    phases = {phase: sum(seconds[warmup:]) for phase, seconds in stats.step_phase_s.items()}
    first_from_main = stats.first_step_at - main_start
    return {
        "steps_per_s": round(timed / elapsed, 4),
        "s_per_step": round(elapsed / timed, 4),
        # From the process start (/proc), less the one-time build of a cached model folder.
        "first_step_s_from_process_start": round(stats.first_step_at - stats.started - build_s, 2),
        "first_step_s_from_train_call": round(first_from_main, 2),
        # "build": everything before the first batch was asked for (loading and preparing the models, data).
        "first_step_s_by_phase": {"build": round(first_from_main - stats.step_s[0], 2),
                                  **{phase: round(seconds[0], 2) for phase, seconds in stats.step_phase_s.items()}},
        "share": {phase: round(t / elapsed, 4) for phase, t in phases.items()},
        "s_per_step_by_phase": {phase: round(t / timed, 4) for phase, t in phases.items()},
    }


def describe_optimizer(optimizer: torch.optim.Optimizer, stepper: OptimizerStepper | None) -> str:
    """E.g. "AdamW (fused)": torch's AdamW runs a per-tensor loop on CPU unless fused or foreach is set."""
    kernel = [name for name in ("fused", "foreach") if optimizer.defaults.get(name)]
    if stepper is not None and stepper.updater is not None:
        kernel.append("in the backward pass" if stepper.fused else "per parameter")
        kernel += ["stochastic rounding"] if stepper.updater.stochastic_rounding else []
    return type(optimizer).__name__ + (f" ({', '.join(kernel)})" if kernel else "")


def run_facts(run, resolution: int) -> dict:
    """What was trained, read off the finished Run."""
    optimizer = run.optimizer.optimizer if hasattr(run.optimizer, "optimizer") else run.optimizer  # accelerate's wrapper
    vae = run.models.vae.config
    side = resolution // 2 ** (len(vae.block_out_channels) - 1)
    return {"latent_shape": [vae.latent_channels, side, side],
            "trainable_params": sum(p.numel() for group in optimizer.param_groups for p in group["params"]),
            "optimizer": describe_optimizer(optimizer, run.stepper)}


# --------------------------------------------------------------------------- models and data


@dataclass(frozen=True)
class Model:
    build: Callable[..., Path]     # (output folder) for tiny; (output folder, tiny folder for tokenizers) otherwise
    resolution: int                # default --resolution
    steps: int                     # default --steps (timed steps, after the warm-up)
    description: str


@dataclass(frozen=True)
class Family:
    """What the benchmark needs to run one family's script."""

    script: str                    # module at the repository root with parse_args() and main()
    role: str                      # the denoiser's subfolder, for the memory estimate
    data_layout: str               # sdft.tiny.make_images layout
    data_args: tuple[str, ...]     # flags pointing the script at the images; "{data}" is the folder
    models: dict[str, Model]


T2I_DATA = ("--train_data_dir", "{data}")

# Another family or model is one entry here.
FAMILIES = {
    "sd": Family(
        "train_text_to_image", "unet", "metadata", T2I_DATA,
        models={
            "tiny": Model(tiny.build_sd, resolution=32, steps=100,
                          description="sdft.tiny.build_sd: UNet (32, 64), CLIP text 32 wide x 2 layers, "
                                      "VAE (16, 32) with 2x downsampling"),
            "sd15-shaped": Model(build_sd15_shaped, resolution=64, steps=5,
                                 description="SD 1.5 configs, random weights: UNet (320, 640, 1280, 1280), "
                                             "CLIP ViT-L/14 text tower (768 wide x 12 layers, tiny ~900-token "
                                             "vocabulary), SD 1.5 VAE with 8x downsampling"),
        },
    ),
    "sdxl": Family(
        "train_text_to_image_sdxl", "unet", "metadata", T2I_DATA,
        models={
            "tiny": Model(tiny.build_sdxl, resolution=32, steps=100, description="sdft.tiny.build_sdxl"),
            "sdxl-shaped": Model(build_sdxl_shaped, resolution=64, steps=5,
                                 description="SDXL base 1.0 configs, random weights: UNet (320, 640, 1280), "
                                             "transformer depths (1, 2, 10), cross-attention 2048 (2567.5 M); "
                                             "CLIP ViT-L text tower (768 wide x 12 layers) and OpenCLIP bigG text "
                                             "tower (1280 wide x 32 layers, projection 1280), both full depth "
                                             "with tiny ~800-token vocabularies; SDXL VAE (SD 1.5's, scaling "
                                             "0.13025)"),
        },
    ),
    "sd3": Family(
        "train_dreambooth_sd3", "transformer", "images",
        ("--instance_data_dir", "{data}", "--instance_prompt", "a photo of sks shape"),
        models={
            "tiny": Model(tiny.build_sd3, resolution=32, steps=100, description="sdft.tiny.build_sd3"),
            "sd3-medium-shaped": Model(
                build_sd3_medium_shaped, resolution=64, steps=5,
                description=f"SD3-medium configs, random weights: MMDiT 1536 wide (24 heads x 64), patch 2, "
                            f"{SD3_MEDIUM_LAYERS} of its 24 blocks (328.7 M instead of 2028 M); CLIP ViT-L and "
                            f"OpenCLIP bigG text towers at full depth (12 and 32 layers) and a T5 with T5-XXL's "
                            f"widths (4096, d_ff 10240, 64 heads) but {SD3_T5_LAYERS} of its 24 layers, tiny "
                            f"offline tokenizers; SD3 VAE (16 channels, SD 1.5's block widths)"),
        },
    ),
}


def model_folder(family: str, model: str) -> tuple[Path, float]:
    """The cached model folder, and the seconds spent building it now. The build runs in a child
    process so that its memory does not count towards this process's peak RSS."""
    folder = CACHE / "models" / f"{family}-{model}"
    start = time.perf_counter()
    if not (folder / "model_index.json").is_file():
        print(f"Building {family}/{model} into {folder} (once) ...", flush=True)
        subprocess.run([sys.executable, __file__, "--family", family, "--model", model, "--build-only"], check=True)
    return folder, time.perf_counter() - start


def build_model(family: str, model: str) -> Path:
    """A half-written folder from an interrupted build is never used."""
    folder = CACHE / "models" / f"{family}-{model}"
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    build = FAMILIES[family].models[model].build
    if model == "tiny":
        build(partial)
    else:
        build(partial, model_folder(family, "tiny")[0])  # the shaped models take the tiny ones' tokenizers
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)
    return folder


def image_count(batch_size: int, num_images: int | None) -> int:
    """A multiple of the batch size, so every batch is full."""
    return batch_size * max(1, (num_images or 8) // batch_size)


def image_folder(count: int, layout: str) -> Path:
    folder = CACHE / "data" / f"{layout}-{count}"
    if not folder.is_dir():
        tiny.make_images(folder.with_name(folder.name + ".partial"), num_images=count, layout=layout)
        folder.with_name(folder.name + ".partial").rename(folder)
    return folder


# --------------------------------------------------------------------------- the run


def parse_bench_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     epilog="Arguments after -- are passed to the training script.")
    parser.add_argument("--family", choices=sorted(FAMILIES), default="sd")
    parser.add_argument("--model", default="tiny", help="; ".join(
        f"--family {name}: {' | '.join(family.models)}" for name, family in FAMILIES.items()) + " (default tiny)")
    parser.add_argument("--resolution", type=int, help="pixels; default 32 for tiny, 64 for the *-shaped models")
    parser.add_argument("--steps", type=int, help="timed optimizer steps after the warm-up; "
                                                  "default 100 for tiny, 5 for the *-shaped models")
    parser.add_argument("--warmup-steps", type=int, default=2, help="untimed first steps (default 2)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--num-images", type=int, default=None,
                        help="images in the generated data set (default 8; rounded down to a multiple of the batch)")
    parser.add_argument("--use-lora", action="store_true",
                        help="train LoRA adapters (rank 4) instead of the whole denoiser (UNet or transformer)")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="no")
    parser.add_argument("--keep-output", action="store_true", help="keep the run's output folder")
    parser.add_argument("--no-record", action="store_true", help=f"do not append to {RESULTS.name}")
    parser.add_argument("--print-results", action="store_true", help=f"print {RESULTS.name} as a table and exit")
    parser.add_argument("--build-only", action="store_true", help="(re)build the cached model folder and exit")
    args = parser.parse_args(own)
    if not args.print_results:
        models = FAMILIES[args.family].models
        if args.model not in models:
            parser.error(f"--model for --family {args.family} must be one of: {', '.join(models)}")
        # `is None`, so that --steps 0 is refused below instead of meaning the default
        args.resolution = models[args.model].resolution if args.resolution is None else args.resolution
        args.steps = models[args.model].steps if args.steps is None else args.steps
        if args.steps < 1 or args.warmup_steps < 1:
            parser.error("--steps and --warmup-steps must be at least 1 (the first step allocates optimizer state)")
    return args, extra


def check_memory(args: argparse.Namespace, model: Path, role: str) -> int:
    """The trainer's own memory estimate, made here too so that a run that cannot fit stops with the
    arithmetic before anything is loaded. Returns the estimated bytes, recorded beside the measured peak."""
    stats = memory_estimate.denoiser_stats(str(model), role)
    setup = memory_setup(args, args.mixed_precision)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        print(memory_estimate.check(stats, setup, role, device, skip=args.skip_memory_check))
    except memory_estimate.DoesNotFit as err:
        sys.exit(f"bench_train.py: {err}")
    return memory_estimate.total(memory_estimate.estimate(stats, setup))


def train_argv(bench: argparse.Namespace, model: Path, data: Path, output: Path, extra: list[str]) -> list[str]:
    total = bench.warmup_steps + bench.steps
    argv = ["--pretrained_model_name_or_path", str(model),
            *(arg.replace("{data}", str(data)) for arg in FAMILIES[bench.family].data_args),
            "--output_dir", str(output), "--resolution", str(bench.resolution),
            "--train_batch_size", str(bench.batch_size), "--max_train_steps", str(total),
            "--checkpointing_steps", str(total + 1), "--report_to", "none", "--seed", "0",
            "--mixed_precision", bench.mixed_precision]
    if bench.use_lora:
        argv += ["--use_lora", "--rank", "4"]
    if bench.gradient_checkpointing:
        argv += ["--gradient_checkpointing"]
    return argv + extra


def run_benchmark(bench: argparse.Namespace, extra: list[str]) -> dict:
    spec = FAMILIES[bench.family]
    model, build_s = model_folder(bench.family, bench.model)
    num_images = image_count(bench.batch_size, bench.num_images)
    output = CACHE / "runs" / f"{bench.family}-{bench.model}-{os.getpid()}"
    shutil.rmtree(output, ignore_errors=True)
    argv = train_argv(bench, model, image_folder(num_images, spec.data_layout), output, extra)
    script = importlib.import_module(spec.script)
    args = script.parse_args(argv)
    estimated = check_memory(args, model, spec.role)
    load_before, rss_before = os.getloadavg()[0], peak_rss_mib()
    main_start = time.time()
    try:
        with Sampler() as sampler:
            run = script.main(args)  # builds, trains and exports, as `accelerate launch` would
        finished = time.time()
    except UserError as err:
        sys.exit(f"bench_train.py: {err}")
    finally:
        if not bench.keep_output:
            shutil.rmtree(output, ignore_errors=True)
    stats = run.stats
    if len(stats.step_s) != bench.warmup_steps + bench.steps:
        raise RuntimeError(f"expected {bench.warmup_steps + bench.steps} optimizer steps, saw {len(stats.step_s)}")
    last = sampler.at(stats.last_step_at)
    return {
        **record(bench, argv), **run_facts(run, bench.resolution), "num_images": num_images,
        **step_figures(stats, bench.warmup_steps, main_start=main_start, build_s=build_s),
        "model_build_s": round(build_s, 1),
        "after_last_step_s": round(finished - stats.last_step_at, 2),
        "peak_rss_mib_before_train": round(rss_before),
        # Sampled at the last step (to within 50 ms); "incl_save" is the peak after main() returned.
        "peak_rss_mib": round(last.peak_rss_mib),
        "rss_mib_at_last_step": round(last.resident["VmRSS"]),
        "rss_file_mib_at_last_step": round(last.resident["RssFile"]),
        "peak_rss_mib_incl_save": round(peak_rss_mib()),
        # Cores busy while the steps after the first ran.
        **cpu_use(sampler, stats.first_step_at, stats.last_step_at),
        "load_average_1min": {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)},
        # What the trainer was told about memory, and what sdft.memory_estimate expected of the trained weights.
        "optimizer_flag": args.optimizer_type or args.optimizer, "fused_backward_pass": args.fused_backward_pass,
        "full_bf16": args.full_bf16, "estimated_mib": round(estimated / 2**20),
        # Sampled over main() (saving included), so not comparable to peak_rss_mib at the last step.
        "peak_rss_anon_mib": round(sampler.peak("RssAnon")), "peak_rss_file_mib": round(sampler.peak("RssFile")),
    }


def record(bench: argparse.Namespace, argv: list[str]) -> dict:
    """The command, code, versions, machine and configuration of a result line."""
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "train_args": [arg.replace(str(REPO), ".") for arg in argv],
        "git_commit": git_commit(), "versions": versions(), "machine": machine(),
        "timer": "sdft.run_stats",   # lines without it were timed by wrappers (benchmarks/README.md)
        "family": bench.family, "model": bench.model,
        "model_description": FAMILIES[bench.family].models[bench.model].description,
        "resolution": bench.resolution, "batch_size": bench.batch_size, "lora": bench.use_lora,
        "gradient_checkpointing": bench.gradient_checkpointing, "mixed_precision": bench.mixed_precision,
        "warmup_steps": bench.warmup_steps, "steps": bench.steps,
    }


def git_commit() -> dict | None:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True)
        # Uncommitted changes to the code under test; the benchmark's own folder does not count.
        status = subprocess.run(["git", "status", "--porcelain", "--", ".", ":!benchmarks"], cwd=REPO,
                                capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return {"sha": head.stdout.strip(), "dirty": bool(status.stdout.strip())}


def versions() -> dict:
    import accelerate
    import diffusers
    import peft
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "accelerate": accelerate.__version__,
            "peft": peft.__version__}


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}


# --------------------------------------------------------------------------- output


def mode(r: dict) -> str:
    parts = ["LoRA r4" if r["lora"] else "full"]
    parts += ["grad ckpt"] if r["gradient_checkpointing"] else []
    parts += [r["mixed_precision"]] if r["mixed_precision"] != "no" else []
    parts += [r["optimizer_flag"]] if r.get("optimizer_flag", "AdamW").lower() != "adamw" else []
    parts += [name for name, key in (("fused backward", "fused_backward_pass"), ("full bf16", "full_bf16"))
              if r.get(key)]
    caches = [flag[len("--cache_"):] for flag in r.get("train_args", []) if flag.startswith("--cache_")]
    parts += ["caches: " + ", ".join(caches)] if caches else []
    parts += [f"{r['num_images']} images"] if r.get("num_images", 8) != 8 else []
    if "fused_adamw" in r:
        # Recorded before 95b16d7 made fused AdamW the default: until then every run used torch's
        # per-tensor AdamW loop, except with the benchmark's --fused-adamw experiment (since removed).
        parts.append("fused AdamW (experiment)" if r["fused_adamw"] else "AdamW loop (old default)")
    return ", ".join(parts)


def shares(r: dict) -> str:
    """Old lines have the wrappers' phases (forward, backward, clip, other), new ones RunStats'."""
    return ", ".join(f"{name} {100 * share:.0f}%" for name, share in r["share"].items())


def print_report(r: dict) -> None:
    rows = [
        ("model", f"{r['family']}/{r['model']}: {r['model_description']}"),
        ("trainable", f"{r['trainable_params'] / 1e6:.2f} M parameters ({mode(r)}; {r['optimizer']})"),
        ("input", f"{r['resolution']} px (latents {'x'.join(map(str, r['latent_shape']))}), batch {r['batch_size']}"),
        ("steps", f"{r['steps']} timed after {r['warmup_steps']} warm-up"),
        ("steps/s", f"{r['steps_per_s']:.3f}  ({r['s_per_step']:.3f} s/step)"),
        ("time to first step", f"{r['first_step_s_from_process_start']:.1f} s from process start, "
                               f"{r['first_step_s_from_train_call']:.1f} s from main()"),
        ("first step by phase", " | ".join(f"{k} {v:.2f}" for k, v in r["first_step_s_by_phase"].items()) + " s"),
        ("after last step", f"{r['after_last_step_s']:.1f} s (saving the output, end of training)"),
        ("peak RSS", f"{r['peak_rss_mib']} MiB at the last step ({r['peak_rss_mib_before_train']} MiB before "
                     f"main(), {r['peak_rss_mib_incl_save']} MiB including saving; estimated for the trained "
                     f"weights: {r['estimated_mib']} MiB; resident at the last step: {r['rss_mib_at_last_step']} MiB)"),
        ("peak RSS split", f"anonymous {r['peak_rss_anon_mib']} MiB, file-backed {r['peak_rss_file_mib']} MiB "
                           f"(over main(), saving included); file-backed at the last step: "
                           f"{r['rss_file_mib_at_last_step']} MiB"),
        ("share of step time", shares(r)),
        ("s/step by phase", " | ".join(f"{k} {v:.4f}" for k, v in r["s_per_step_by_phase"].items())),
        ("CPU use", f"{r['cpu_cores_used']:.2f} cores by this run and {r['other_processes_cpu_cores']:.2f} by other "
                    f"processes after the first step; 1-min load average {r['load_average_1min']['before']} "
                    f"before, {r['load_average_1min']['after']} after"),
        ("versions", ", ".join(f"{k} {v}" for k, v in r["versions"].items())),
        ("machine", f"{r['machine']['cpu']}, {r['machine']['cpu_count']} CPUs, "
                    f"{r['machine']['torch_threads']} torch threads, {r['machine']['device']}"),
    ]
    width = max(len(name) for name, _ in rows)
    print()
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    if r["other_processes_cpu_cores"] > 0.2:
        print("\nwarning: other processes were using the CPU during the timed steps; these timings are pessimistic.")


def print_results(path: Path) -> None:
    """results.jsonl as a Markdown table, oldest first."""
    header = ("model", "mode", "res", "batch", "steps", "steps/s", "s/step", "first step (process / main)",
              "peak RSS MiB", "share of step time", "other processes (cores)", "commit")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for line in path.read_text().splitlines():
        r = json.loads(line)
        cells = [f"{r['family']}/{r['model']}", mode(r), r["resolution"], r["batch_size"], r["steps"],
                 f"{r['steps_per_s']:.3f}", f"{r['s_per_step']:.2f}",
                 f"{r['first_step_s_from_process_start']:.1f} / {r['first_step_s_from_train_call']:.1f} s",
                 r["peak_rss_mib"], shares(r), r["other_processes_cpu_cores"], short_commit(r)]
        print("| " + " | ".join(map(str, cells)) + " |")


def short_commit(r: dict) -> str:
    commit = r.get("git_commit") or {}
    return (commit.get("sha", "?")[:7] + ("+" if commit.get("dirty") else "")) if commit else "?"


def main(argv: list[str]) -> int:
    bench, extra = parse_bench_args(argv)
    if bench.print_results:
        print_results(RESULTS)
        return 0
    if bench.build_only:
        print(build_model(bench.family, bench.model))
        return 0
    result = run_benchmark(bench, extra)
    print_report(result)
    if not bench.no_record:
        with RESULTS.open("a", encoding="utf-8") as f:
            f.write(json.dumps(result) + "\n")
        print(f"\nAppended to {RESULTS.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
