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
`parse_args` builds the namespace and its own `main(args)` calls `sdft.trainer.train(args,
family=...)`. Arguments after `--` go to the training script unchanged. Timing comes from the
outside only, and only while the run lasts:

- the family class the script instantiates is swapped for a subclass that times `predict` (the
  denoiser forward), `condition` (tokenizers and text encoders) and the loaded VAE's `encode`;
- `Accelerator.backward` and `Accelerator.clip_grad_norm_` are wrapped;
- torch's global optimizer step hooks time the optimizer step and mark the end of each step.

A step is the interval between the ends of two consecutive optimizer steps, so "other" (the step
time left when the phases above are subtracted) holds data loading, noising, the loss, the LR
scheduler, zero_grad and logging. Each run appends one JSON line to benchmarks/results.jsonl.
Models and images are built once, offline, under benchmarks/.cache.
"""

from __future__ import annotations

import time

SCRIPT_START = time.perf_counter()  # before the heavy imports, which count towards time to first step

import argparse  # noqa: E402
import functools  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
from contextlib import ExitStack, contextmanager  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from datetime import datetime, timezone  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable  # noqa: E402

for _name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_name, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))  # the training scripts live at the repository root

import accelerate  # noqa: E402
import torch  # noqa: E402
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook  # noqa: E402

from sdft import memory_estimate, tiny  # noqa: E402
from sdft.builders import memory_setup  # noqa: E402
from sdft.families.sd import StableDiffusion  # noqa: E402
from sdft.families.sd3 import StableDiffusion3  # noqa: E402
from sdft.families.sdxl import StableDiffusionXL  # noqa: E402
from sdft.stepping import OptimizerStepper  # noqa: E402

CACHE = HERE / ".cache"
RESULTS = HERE / "results.jsonl"
PHASES = ("vae", "text", "forward", "backward", "clip", "optimizer")


# --------------------------------------------------------------------------- timing


@dataclass
class Step:
    end: float                 # perf_counter when the optimizer step returned
    phases: dict[str, float]   # seconds spent in each phase during this step
    rss_mib: float             # ru_maxrss at the end of the step
    current_rss_mib: float     # VmRSS at the end of the step (what training holds, loading's peak aside)
    current_rss_file_mib: float  # the file-backed part of it (RssFile: mapped files, libraries)
    cpu_s: float               # user + system CPU time of the process so far
    machine_cpu_s: float       # the same for the whole machine (Linux; 0 elsewhere)


@dataclass
class StepClock:
    """Phase times of the current step; `end_step` closes it (called from the optimizer post-hook)."""

    current: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    steps: list[Step] = field(default_factory=list)
    notes: dict = field(default_factory=dict)

    @contextmanager
    def phase(self, name: str):
        """Time spent in phases nested inside this one (the optimizer steps that
        --fused_backward_pass runs inside the backward pass) counts only towards those."""
        sync()
        start, nested_before = time.perf_counter(), sum(self.current.values())
        try:
            yield
        finally:
            sync()
            nested = sum(self.current.values()) - nested_before
            self.current[name] += time.perf_counter() - start - nested

    def end_step(self) -> None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        self.steps.append(Step(time.perf_counter(), self.current, peak_rss_mib(), current_rss_mib(),
                               current_rss_mib("RssFile"),
                               usage.ru_utime + usage.ru_stime, machine_cpu_s()))
        self.current = dict.fromkeys(PHASES, 0.0)


def sync() -> None:
    """CUDA kernels run asynchronously; on CPU every call has finished when it returns."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_rss_mib() -> float:
    # ru_maxrss is in KiB on Linux, bytes on macOS.
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def current_rss_mib(key: str = "VmRSS") -> float:
    """Resident memory now (Linux /proc; 0 elsewhere): unlike the peak, it does not keep the moment
    the weight files were mapped while being converted at load time."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return 0.0


class RssSplitSampler:
    """Peaks of anonymous and of file-backed resident memory (RssAnon, RssFile in /proc/self/status,
    Linux), sampled every `interval` s in a thread: ru_maxrss counts mapped weight-file pages, which
    the kernel can drop and re-read, as if they were allocations. A peak shorter than the interval
    can be missed."""

    def __init__(self, interval: float = 0.05):
        self.interval, self.peaks, self._stop = interval, {"RssAnon": 0.0, "RssFile": 0.0}, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "RssSplitSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                for line in Path("/proc/self/status").read_text().splitlines():
                    key = line.split(":", 1)[0]
                    if key in self.peaks:
                        self.peaks[key] = max(self.peaks[key], int(line.split()[1]) / 1024)
            except (OSError, ValueError):
                return
            self._stop.wait(self.interval)


def machine_cpu_s() -> float:
    """Busy CPU seconds of all processes since boot, from /proc/stat (0 where it does not exist)."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0.0
    idle = fields[3] + fields[4]  # idle + iowait; guest time is already inside user
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def process_start() -> float:
    """The process start on the perf_counter clock (Linux: from /proc; elsewhere: this script's first line)."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        age = uptime - start_ticks / os.sysconf("SC_CLK_TCK")
        return time.perf_counter() - age
    except (OSError, ValueError, IndexError):
        return SCRIPT_START


class TimedFamily:
    """Mixin placed before a family class: times its calls on `self.clock`, changes nothing else.
    (*args throughout, so the timing does not depend on the families' exact signatures.)"""

    clock: StepClock  # set on the subclass made by `timed_family`

    def load(self, *args, **kwargs):
        """The trainer encodes images with the VAE itself (or reads the latent cache), so the
        loaded VAE's `encode` is timed rather than a family method."""
        models = super().load(*args, **kwargs)
        vae = getattr(models, "vae", None)
        if vae is not None:
            vae.encode = timed_method(vae.encode, self.clock, "vae")
        return models

    def condition(self, *args, **kwargs):
        with self.clock.phase("text"):
            return super().condition(*args, **kwargs)

    def predict(self, *args, **kwargs):
        noisy = args[1] if len(args) > 1 else kwargs.get("noisy")
        if "latent_shape" not in self.clock.notes and isinstance(noisy, torch.Tensor):
            self.clock.notes["latent_shape"] = list(noisy.shape[1:])
        with self.clock.phase("forward"):
            return super().predict(*args, **kwargs)


def timed_family(family_cls: type, clock: StepClock) -> type:
    return type(f"Timed{family_cls.__name__}", (TimedFamily, family_cls), {"clock": clock})


def timed_method(method: Callable, clock: StepClock, phase: str) -> Callable:
    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        with clock.phase(phase):
            return method(*args, **kwargs)
    return wrapper


@contextmanager
def patched(owner, name: str, replacement):
    original = owner.__dict__[name]
    setattr(owner, name, replacement)
    try:
        yield
    finally:
        setattr(owner, name, original)


def describe_optimizer(optimizer: torch.optim.Optimizer, stepper: OptimizerStepper) -> str:
    """E.g. "AdamW (fused)": torch's AdamW runs a per-tensor loop on CPU unless fused or foreach is set."""
    kernel = [name for name in ("fused", "foreach") if optimizer.defaults.get(name)]
    if stepper.updater is not None:
        kernel.append("in the backward pass" if stepper.fused else "per parameter")
        kernel += ["stochastic rounding"] if stepper.updater.stochastic_rounding else []
    return type(optimizer).__name__ + (f" ({', '.join(kernel)})" if kernel else "")


def timed_stepper_step(clock: StepClock) -> Callable:
    """The trainer's OptimizerStepper.step runs once per (micro-)step, whether it steps the optimizer,
    updates parameter by parameter, or finds the backward pass did; a step ends when it returns
    and the optimizer ran (it does not while gradients accumulate)."""
    original = OptimizerStepper.step

    @functools.wraps(original)
    def step(self):
        original(self)
        if "trainable_params" not in clock.notes:
            inner = getattr(self.optimizer, "optimizer", self.optimizer)
            clock.notes["trainable_params"] = sum(p.numel() for g in inner.param_groups for p in g["params"])
            clock.notes["optimizer"] = describe_optimizer(inner, self)
        calls = clock.notes.get("optimizer_calls", 0)
        if calls > clock.notes.get("optimizer_calls_at_step_end", 0):  # in this step or its backward pass
            clock.notes["optimizer_calls_at_step_end"] = calls
            clock.end_step()
    return step


@contextmanager
def timing(clock: StepClock):
    """Time backward, clipping and the optimizer step of whatever trains in this process."""
    started: list[float] = []

    def before_step(optimizer, args, kwargs):
        sync()
        started.append(time.perf_counter())

    def after_step(optimizer, args, kwargs):
        # Called once per parameter when the trainer updates parameter by parameter.
        sync()
        clock.current["optimizer"] += time.perf_counter() - started.pop()
        clock.notes["optimizer_calls"] = clock.notes.get("optimizer_calls", 0) + 1

    Accelerator = accelerate.Accelerator
    with ExitStack() as stack:
        stack.enter_context(patched(Accelerator, "backward", timed_method(Accelerator.backward, clock, "backward")))
        stack.enter_context(patched(Accelerator, "clip_grad_norm_",
                                    timed_method(Accelerator.clip_grad_norm_, clock, "clip")))
        stack.enter_context(patched(OptimizerStepper, "step", timed_stepper_step(clock)))
        stack.callback(register_optimizer_step_pre_hook(before_step).remove)
        stack.callback(register_optimizer_step_post_hook(after_step).remove)
        yield


# --------------------------------------------------------------------------- models


def clip_l_config(tokenizer, **overrides):
    """CLIP ViT-L/14's text tower (SD 1.5's text_encoder/config.json; SDXL's and SD3's first encoder)
    except the vocabulary size, which follows the offline tokenizer."""
    from transformers import CLIPTextConfig

    config = dict(vocab_size=len(tokenizer), hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                  num_hidden_layers=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id)
    return CLIPTextConfig(**{**config, **overrides})


def open_clip_bigg_config(tokenizer):
    """OpenCLIP ViT-bigG/14's text tower with its projection (SDXL's and SD3's text_encoder_2):
    1280 wide, 32 layers, 20 heads, GELU, projection 1280."""
    return clip_l_config(tokenizer, hidden_size=1280, intermediate_size=5120, num_attention_heads=20,
                         num_hidden_layers=32, hidden_act="gelu", projection_dim=1280)


def sd_vae(**overrides):
    """SD 1.5's VAE (vae/config.json): (128, 256, 512, 512), 8x downsampling; SDXL and SD3 keep the
    block widths and change the latent channels, scaling and shift."""
    from diffusers import AutoencoderKL

    config = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=512,
                  down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    return AutoencoderKL(**{**config, **overrides})


def build_sd15_shaped(output: Path) -> Path:
    """SD 1.5's UNet, VAE and text encoder configs, randomly initialised, with the tiny model's
    offline tokenizer (so the text encoder's vocabulary is ~900 tokens instead of 49,408)."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    base, _ = model_folder("sd", "tiny")
    tokenizer = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        # runwayml/stable-diffusion-v1-5 unet/config.json (the keys that differ from diffusers' defaults)
        unet = UNet2DConditionModel(
            sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
            cross_attention_dim=768, attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        )
        vae = sd_vae()  # vae/config.json: 8x downsampling, as in the real model
        text_encoder = CLIPTextModel(clip_l_config(tokenizer))
    scheduler = PNDMScheduler.from_pretrained(base, subfolder="scheduler")  # as SD 1.5 ships it
    pipeline = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipeline.save_pretrained(output)
    return output


def build_sdxl_shaped(output: Path) -> Path:
    """SDXL base 1.0's UNet, VAE and text encoder configs, randomly initialised (CLIP-L and
    OpenCLIP-bigG at full depth), with the tiny SDXL model's offline tokenizers and scheduler."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    base, _ = model_folder("sdxl", "tiny")
    tokenizer = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer")
    tokenizer_2 = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer_2")  # pads with "!" (id 0), as bigG's
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        # stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (the keys that differ from diffusers' defaults)
        unet = UNet2DConditionModel(
            sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,  # 6 size/crop numbers x 256 + bigG's pooled 1280
        )
        vae = sd_vae(sample_size=1024, scaling_factor=0.13025)  # vae/config.json: SD 1.5's VAE, new scaling
        text_encoder = CLIPTextModel(clip_l_config(tokenizer))
        text_encoder_2 = CLIPTextModelWithProjection(open_clip_bigg_config(tokenizer_2))
    scheduler = EulerDiscreteScheduler.from_pretrained(base, subfolder="scheduler")  # SDXL's settings
    pipeline = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                         tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler,
                                         force_zeros_for_empty_prompt=True, add_watermarker=False)
    pipeline.save_pretrained(output)
    return output


SD3_MEDIUM_LAYERS = 4       # of SD3-medium's 24 MMDiT blocks
SD3_T5_LAYERS = 2           # of T5-XXL's 24 encoder layers


def build_sd3_medium_shaped(output: Path) -> Path:
    """SD3-medium's transformer widths with SD3_MEDIUM_LAYERS blocks, its VAE, CLIP-L and OpenCLIP-bigG
    at full depth, and a T5 with T5-XXL's widths but SD3_T5_LAYERS layers; randomly initialised, with
    the tiny SD3 model's offline tokenizers and scheduler."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

    base, _ = model_folder("sd3", "tiny")
    tokenizer = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer")
    tokenizer_2 = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer_2")
    tokenizer_3 = T5TokenizerFast.from_pretrained(base, subfolder="tokenizer_3")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        # stabilityai/stable-diffusion-3-medium-diffusers transformer/config.json except num_layers (24)
        transformer = SD3Transformer2DModel(
            sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=SD3_MEDIUM_LAYERS,
            attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
            pooled_projection_dim=2048, pos_embed_max_size=192,
        )
        # vae/config.json: SD 1.5's block widths, 16 latent channels, no quant convs
        vae = sd_vae(sample_size=1024, latent_channels=16, scaling_factor=1.5035, shift_factor=0.0609,
                     use_quant_conv=False, use_post_quant_conv=False)
        text_encoder = CLIPTextModelWithProjection(clip_l_config(tokenizer))
        text_encoder_2 = CLIPTextModelWithProjection(open_clip_bigg_config(tokenizer_2))
        # google/t5-v1_1-xxl (text_encoder_3/config.json) except num_layers (24) and the vocabulary
        text_encoder_3 = T5EncoderModel(T5Config(
            vocab_size=len(tokenizer_3), d_model=4096, d_kv=64, d_ff=10240, num_heads=64, num_layers=SD3_T5_LAYERS,
            feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, relative_attention_max_distance=128,
            layer_norm_epsilon=1e-6, pad_token_id=tokenizer_3.pad_token_id, eos_token_id=tokenizer_3.eos_token_id,
            decoder_start_token_id=tokenizer_3.pad_token_id,
        ))
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(base, subfolder="scheduler")  # shift 3.0, as SD3's
    pipeline = StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler, vae=vae,
                                        text_encoder=text_encoder, tokenizer=tokenizer,
                                        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
                                        text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3)
    pipeline.save_pretrained(output)
    return output


@dataclass(frozen=True)
class Model:
    build: Callable[[Path], Path]
    resolution: int                # default --resolution
    steps: int                     # default --steps (timed steps, after the warm-up)
    description: str


@dataclass(frozen=True)
class Family:
    """What the benchmark needs to run one family's script."""

    script: str                    # module at the repository root with parse_args() and main()
    family_cls: type               # the class main() instantiates; swapped for a timed subclass
    data_layout: str               # sdft.tiny.make_images layout
    data_args: tuple[str, ...]     # flags pointing the script at the images; "{data}" is the folder
    models: dict[str, Model]


T2I_DATA = ("--train_data_dir", "{data}")

# Another family or model is one entry here.
FAMILIES = {
    "sd": Family(
        "train_text_to_image", StableDiffusion, "metadata", T2I_DATA,
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
        "train_text_to_image_sdxl", StableDiffusionXL, "metadata", T2I_DATA,
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
        "train_dreambooth_sd3", StableDiffusion3, "images",
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
    FAMILIES[family].models[model].build(partial)
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)
    return folder


def image_folder(batch_size: int, layout: str, num_images: int | None = None) -> Path:
    """A multiple of the batch size, so every batch is full."""
    count = batch_size * max(1, (num_images or 8) // batch_size)
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
    arithmetic instead of a traceback from main() (before anything is loaded, as there). Returns
    the estimated bytes, recorded beside the measured peak."""
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
    started = process_start()
    spec = FAMILIES[bench.family]
    model, build_s = model_folder(bench.family, bench.model)
    data = image_folder(bench.batch_size, spec.data_layout, bench.num_images)
    output = CACHE / "runs" / f"{bench.family}-{bench.model}-{os.getpid()}"
    shutil.rmtree(output, ignore_errors=True)
    argv = train_argv(bench, model, data, output, extra)
    script = importlib.import_module(spec.script)
    args = script.parse_args(argv)
    estimated = check_memory(args, model, spec.family_cls.denoiser_role)
    name = spec.family_cls.__name__
    if getattr(script, name, None) is not spec.family_cls:
        raise RuntimeError(f"{spec.script}.py no longer uses {name} by that name; update FAMILIES")

    load_before = os.getloadavg()[0]
    clock = StepClock()
    rss_before = peak_rss_mib()
    main_start = time.perf_counter()
    try:
        # The script's own main() runs: it builds its family (now the timed subclass) from the
        # arguments and calls sdft.trainer.train with the objective and data it always uses.
        with ExitStack() as stack:
            sampler = stack.enter_context(RssSplitSampler())
            stack.enter_context(patched(script, name, timed_family(spec.family_cls, clock)))
            stack.enter_context(timing(clock))
            script.main(args)
        finished = time.perf_counter()
    finally:
        if not bench.keep_output:
            shutil.rmtree(output, ignore_errors=True)
    result = summarize(bench, argv, clock, started=started + build_s, main_start=main_start, finished=finished,
                       rss_before=rss_before, build_s=build_s, load=(load_before, os.getloadavg()[0]))
    # What the trainer was told about memory, and what sdft.memory_estimate expected of the trained weights.
    result.update(optimizer_flag=args.optimizer, fused_backward_pass=args.fused_backward_pass,
                  full_bf16=args.full_bf16, estimated_mib=round(estimated / 2**20))
    # Sampled over main() (saving included), so it is not comparable to peak_rss_mib at the last step.
    result.update(peak_rss_anon_mib=round(sampler.peaks["RssAnon"]), peak_rss_file_mib=round(sampler.peaks["RssFile"]))
    return result


def summarize(bench, argv, clock: StepClock, *, started, main_start, finished, rss_before, build_s, load) -> dict:
    steps = clock.steps
    if len(steps) != bench.warmup_steps + bench.steps:
        raise RuntimeError(f"expected {bench.warmup_steps + bench.steps} optimizer steps, saw {len(steps)} "
                           "(a step skipped by the fp16 grad scaler never reaches the optimizer hooks)")
    first, timed = steps[bench.warmup_steps - 1], steps[bench.warmup_steps:]
    elapsed = timed[-1].end - first.end
    phases = {name: sum(s.phases[name] for s in timed) for name in PHASES}
    phases["other"] = elapsed - sum(phases.values())
    model = FAMILIES[bench.family].models[bench.model]
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "train_args": [arg.replace(str(REPO), ".") for arg in argv],
        "git_commit": git_commit(),
        "versions": versions(),
        "machine": machine(),
        "family": bench.family, "model": bench.model, "model_description": model.description,
        "resolution": bench.resolution, "latent_shape": clock.notes.get("latent_shape"),
        "batch_size": bench.batch_size, "lora": bench.use_lora,
        "num_images": bench.batch_size * max(1, (bench.num_images or 8) // bench.batch_size),
        "gradient_checkpointing": bench.gradient_checkpointing, "mixed_precision": bench.mixed_precision,
        "trainable_params": clock.notes.get("trainable_params"), "optimizer": clock.notes.get("optimizer"),
        "warmup_steps": bench.warmup_steps, "steps": bench.steps,
        "steps_per_s": round(bench.steps / elapsed, 4),
        "s_per_step": round(elapsed / bench.steps, 4),
        # The one-time build of a cached model folder is left out (and recorded on its own).
        "first_step_s_from_process_start": round(steps[0].end - started, 2),
        "model_build_s": round(build_s, 1),
        # main() calls train() at once.
        "first_step_s_from_train_call": round(steps[0].end - main_start, 2),
        # Where the time to the first step went; "other" is mostly loading and preparing models.
        "first_step_s_by_phase": {**{k: round(v, 2) for k, v in steps[0].phases.items()},
                                  "other": round(steps[0].end - main_start - sum(steps[0].phases.values()), 2)},
        "after_last_step_s": round(finished - steps[-1].end, 2),
        "peak_rss_mib_before_train": round(rss_before),
        "peak_rss_mib": round(steps[-1].rss_mib),
        "rss_mib_at_last_step": round(steps[-1].current_rss_mib),
        "rss_file_mib_at_last_step": round(steps[-1].current_rss_file_mib),
        "peak_rss_mib_incl_save": round(peak_rss_mib()),
        "share": {name: round(t / elapsed, 4) for name, t in phases.items()},
        "s_per_step_by_phase": {name: round(t / bench.steps, 4) for name, t in phases.items()},
        # Other work on the machine skews every number, so record how busy it was: CPU cores used
        # by this process and by all other processes during the timed steps.
        "cpu_cores_used": round((timed[-1].cpu_s - first.cpu_s) / elapsed, 2),
        "other_processes_cpu_cores": round(max(0.0, (timed[-1].machine_cpu_s - first.machine_cpu_s)
                                                    - (timed[-1].cpu_s - first.cpu_s)) / elapsed, 2),
        "load_average_1min": {"before": round(load[0], 2), "after": round(load[1], 2)},
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
    if r["gradient_checkpointing"]:
        parts.append("grad ckpt")
    if r["mixed_precision"] != "no":
        parts.append(r["mixed_precision"])
    if r.get("optimizer_flag", "AdamW").lower() != "adamw":
        parts.append(r["optimizer_flag"])
    parts += [name for name, key in (("fused backward", "fused_backward_pass"), ("full bf16", "full_bf16"))
              if r.get(key)]
    caches = [flag[len("--cache_"):] for flag in r.get("train_args", []) if flag.startswith("--cache_")]
    if caches:
        parts.append("caches: " + ", ".join(caches))
    if r.get("num_images", 8) != 8:
        parts.append(f"{r['num_images']} images")
    if "fused_adamw" in r:
        # Recorded before 95b16d7 made fused AdamW the default: until then every run used torch's
        # per-tensor AdamW loop, except with the benchmark's --fused-adamw experiment (since removed).
        parts.append("fused AdamW (experiment)" if r["fused_adamw"] else "AdamW loop (old default)")
    return ", ".join(parts)


def shares(r: dict) -> str:
    return " | ".join(f"{name} {100 * r['share'][name]:.0f}%" for name in (*PHASES, "other"))


def print_report(r: dict) -> None:
    latent = "x".join(map(str, r["latent_shape"] or []))
    rows = [
        ("model", f"{r['family']}/{r['model']}: {r['model_description']}"),
        ("trainable", f"{r['trainable_params'] / 1e6:.2f} M parameters ({mode(r)}; {r['optimizer']})"),
        ("input", f"{r['resolution']} px (latents {latent}), batch {r['batch_size']}"),
        ("steps", f"{r['steps']} timed after {r['warmup_steps']} warm-up"),
        ("steps/s", f"{r['steps_per_s']:.3f}  ({r['s_per_step']:.3f} s/step)"),
        ("time to first step", f"{r['first_step_s_from_process_start']:.1f} s from process start, "
                               f"{r['first_step_s_from_train_call']:.1f} s from main() (which calls train() at once)"),
        ("first step by phase", " | ".join(f"{k} {v:.1f}" for k, v in r["first_step_s_by_phase"].items())
                                + " s (other: loading and preparing the models, data)"),
        ("after last step", f"{r['after_last_step_s']:.1f} s (saving the output, end of training)"),
        ("peak RSS", f"{r['peak_rss_mib']} MiB at the last step ({r['peak_rss_mib_before_train']} MiB before "
                     f"main(), {r['peak_rss_mib_incl_save']} MiB including saving; estimated for the trained "
                     f"weights: {r['estimated_mib']} MiB; resident at the last step: "
                     f"{r['rss_mib_at_last_step']} MiB)"),
        *([("peak RSS split", f"anonymous {r['peak_rss_anon_mib']} MiB, file-backed {r['peak_rss_file_mib']} MiB "
                               "(each sampled every 50 ms over main(), saving included); file-backed at the "
                               f"last step: {r['rss_file_mib_at_last_step']} MiB")]
          if "peak_rss_anon_mib" in r else []),
        ("share of step time", shares(r)),
        ("CPU use", f"{r['cpu_cores_used']:.2f} cores by this run and {r['other_processes_cpu_cores']:.2f} by other "
                    f"processes during the timed steps; 1-min load average {r['load_average_1min']['before']} "
                    f"before, {r['load_average_1min']['after']} after"),
        ("s/step by phase", " | ".join(f"{k} {v:.3f}" for k, v in r["s_per_step_by_phase"].items())),
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
              "peak RSS MiB", *PHASES, "other", "other processes (cores)", "commit")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for line in path.read_text().splitlines():
        r = json.loads(line)
        pct = [f"{100 * r['share'][name]:.0f}%" for name in (*PHASES, "other")]
        cells = [f"{r['family']}/{r['model']}", mode(r), r["resolution"], r["batch_size"], r["steps"],
                 f"{r['steps_per_s']:.3f}",
                 f"{r['s_per_step']:.2f}",
                 f"{r['first_step_s_from_process_start']:.1f} / {r['first_step_s_from_train_call']:.1f} s",
                 r["peak_rss_mib"], *pct, r["other_processes_cpu_cores"], short_commit(r)]
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
