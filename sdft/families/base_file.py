"""A base model given as one `.safetensors` / `.ckpt` file (A1111, ComfyUI and Forge layouts).

The file is inspected cheaply first (key names from the safetensors header; a `.ckpt` through
`torch.load(weights_only=True)`), so a damaged file or one of another family is named before any
model loads. diffusers' shape-based model-type guess reads small SDXL and SD3 files as SD 1.x
(issue 16), so the family is told by key names, the prefixes each original layout uses.

Then diffusers' single-file loader (`Pipeline.from_single_file`) converts it once into a diffusers
folder, cached by the file's content hash (remembered per path, size and mtime); the run uses that
folder like any other base. A file without some component (SD3 without T5) gets it from the config
source, and the log says so.
"""

from __future__ import annotations

import importlib
import logging
import os
import pickle
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from sdft.errors import CliError
from sdft.file_digest import remembered_sha256
from sdft.noise_schedule import scheduler_with, settings_for

logger = logging.getLogger("sdft")

SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")
DENOISER = "model.diffusion_model."
SCRIPTS = {"sd": "train_text_to_image.py", "sdxl": "train_text_to_image_sdxl.py", "sd3": "train_dreambooth_sd3.py"}
NAMES = {"sd_v1": "Stable Diffusion 1.x", "sd_v2": "Stable Diffusion 2.x", "sdxl": "SDXL", "sd3": "SD3 / 3.5",
         "sdxl_refiner": "the SDXL refiner", "sd": "Stable Diffusion 1.x/2.x"}
FAMILY = {"sd_v1": "sd", "sd_v2": "sd", "sd": "sd", "sdxl": "sdxl", "sd3": "sd3"}
# Where each component lives in each original layout (the prefixes diffusers' converters read).
COMPONENT_PREFIXES = {
    "sd": {"unet": DENOISER, "vae": "first_stage_model.", "text_encoder": "cond_stage_model."},
    "sdxl": {"unet": DENOISER, "vae": "first_stage_model.", "text_encoder": "conditioner.embedders.0.",
             "text_encoder_2": "conditioner.embedders.1."},
    "sd3": {"transformer": DENOISER, "vae": "first_stage_model.", "text_encoder": "text_encoders.clip_l.",
            "text_encoder_2": "text_encoders.clip_g.", "text_encoder_3": "text_encoders.t5xxl."},
}
# Marker keys ComfyUI and Forge read in a checkpoint (empty tensors): v-prediction, zero terminal SNR.
V_PRED_KEY, ZTSNR_KEY = "v_pred", "ztsnr"


@dataclass(frozen=True)
class BaseFile:
    path: Path
    kind: str                 # sd_v1 | sd_v2 | sd (a bare UNet) | sdxl | sd3
    v_pred: bool              # a v_pred marker key or modelspec.prediction_type "v"
    ztsnr: bool               # a ztsnr marker key
    missing: tuple[str, ...]  # components the file lacks, taken from the config source

    @property
    def family(self) -> str:
        return FAMILY[self.kind]


def offline() -> bool:
    """As huggingface_hub reads HF_HUB_OFFLINE, but now rather than at its import (tests set it later)."""
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}


def is_single_file(value: str | None) -> bool:
    return bool(value) and Path(value).expanduser().is_file()


def read_keys(path: Path, flag: str) -> tuple[set[str], dict[str, str]]:
    """The tensor names and header metadata, without reading a safetensors file's weights."""
    if path.suffix not in SUFFIXES:
        raise CliError(f"{flag} '{path}' is a file but not a checkpoint ({', '.join(SUFFIXES)}); give a "
                       "single-file checkpoint, a diffusers folder or a Hub id.")
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as handle:
                return set(handle.keys()), handle.metadata() or {}
        except (SafetensorError, OSError) as err:
            raise CliError(f"{flag} '{path}' is not a readable .safetensors file (truncated or damaged "
                           f"download?): {err}") from err
    return set(read_pickle(path, flag)), {}


def read_pickle(path: Path, flag: str) -> dict:
    """A `.ckpt` state dict through torch's weights-only unpickler: a file that needs arbitrary code to
    load is refused instead of run."""
    try:
        checkpoint = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as err:
        raise CliError(f"{flag} '{path}' needs more than tensors to unpickle (refused: loading it could run "
                       f"code). Convert it to .safetensors with a tool you trust. ({str(err).splitlines()[0]})") from err
    except (RuntimeError, OSError, EOFError, ValueError) as err:
        raise CliError(f"{flag} '{path}' is not a PyTorch checkpoint that can be read: {err}") from err
    while isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict) or not checkpoint:
        raise CliError(f"{flag} '{path}' holds no state dict of weights.")
    return checkpoint


def kind_of(keys: set[str]) -> str | None:
    """The original layout by its key names (the prefixes of the Stability/A1111 checkpoints)."""
    def has(prefix: str) -> bool:
        return any(key.startswith(prefix) for key in keys)
    if has(DENOISER + "joint_blocks."):
        return "sd3"
    if has("conditioner.embedders.1."):
        return "sdxl"
    if has("conditioner.embedders.0.model."):
        return "sdxl_refiner"
    if has(DENOISER + "label_emb."):   # SDXL's pooled-text/size embedding, in a bare UNet file
        return "sdxl"
    if has("cond_stage_model.model."):   # OpenCLIP-H, the 2.x text encoder
        return "sd_v2"
    if has("cond_stage_model.transformer."):
        return "sd_v1"
    if has(DENOISER + "input_blocks."):
        return "sd"
    return None


def inspect(value: str, family: str | None, flag: str = "--pretrained_model_name_or_path") -> BaseFile:
    """The checks that need only the key names; raises CliError naming the file, or the script to use
    when it is not of `family` (None: any family)."""
    path = Path(value).expanduser()
    keys, metadata = read_keys(path, flag)
    kind = kind_of(keys)
    if kind is None or kind == "sdxl_refiner":
        what = NAMES[kind] if kind else "a Stable Diffusion 1.x/2.x, SDXL or SD3 checkpoint"
        raise CliError(f"{flag} '{path}' is not a base model these scripts train ({what}; no "
                       f"'{DENOISER}' UNet or MMDiT keys of a known layout).")
    family = family or FAMILY[kind]
    if FAMILY[kind] != family:
        raise CliError(f"{flag} '{path}' is a {NAMES[kind]} checkpoint; train it with {SCRIPTS[FAMILY[kind]]}, "
                       f"not {SCRIPTS[family]}.")
    prefixes = COMPONENT_PREFIXES[family]
    missing = tuple(role for role, prefix in prefixes.items() if not any(k.startswith(prefix) for k in keys))
    if missing and missing[0] in ("unet", "transformer"):
        raise CliError(f"{flag} '{path}' holds no {missing[0]} ('{DENOISER}' keys): it is not a base model.")
    v_pred = V_PRED_KEY in keys or metadata.get("modelspec.prediction_type") == "v"
    return BaseFile(path, kind, v_pred, ZTSNR_KEY in keys, missing)


def check_vae_file(value: str) -> None:
    flag = "--pretrained_vae_model_name_or_path"
    keys, _ = read_keys(Path(value).expanduser(), flag)
    if not any(k.startswith(("encoder.", "decoder.", "first_stage_model.")) for k in keys):
        raise CliError(f"{flag} '{value}' holds no VAE weights (no encoder./decoder. keys).")


def converted_folder(base: BaseFile, pipeline_cls, config: str | None, cache_root: Path,
                     local_files_only: bool) -> Path:
    """The diffusers folder of `base`, converted once per file content. A second process converting
    the same file at the same time writes its own temporary folder; the first rename wins and the
    other is dropped, so a reader never sees a half-written folder. The file's hash is remembered
    beside the folders (sdft.file_digest), so a second run does not read the file again."""
    folder = cache_root / f"{base.path.stem}-{remembered_sha256(base.path, cache_root)[:16]}"
    if marker_settings(base):
        logger.info("Single-file base %s: detected %s%s from its markers.", base.path,
                    "v-prediction" if base.v_pred else "epsilon prediction",
                    " with zero terminal SNR" if base.ztsnr else "")
    if (folder / "model_index.json").is_file():
        logger.info("Single-file base %s: using the converted folder %s.", base.path, folder)
        return folder
    if base.missing:
        logger.info("Single-file base %s has no %s; taken from the config source %s.", base.path,
                    ", ".join(base.missing), config or "diffusers' default for this model type")
    logger.info("Converting single-file base %s (%s) into %s.", base.path, NAMES[base.kind], folder)
    extra = {"safety_checker": None, "requires_safety_checker": False} if base.family == "sd" else {}
    if config is not None:
        extra.update(components_from(pipeline_cls, config, base.missing, local_files_only))
    pipe = pipeline_cls.from_single_file(str(base.path), config=config, local_files_only=local_files_only, **extra)
    cache_root.mkdir(parents=True, exist_ok=True)
    staging = cache_root / f".{folder.name}.{uuid.uuid4().hex}.tmp"
    pipe.scheduler = scheduler_with(pipe.scheduler, marker_settings(base))
    pipe.save_pretrained(str(staging))
    try:
        os.rename(staging, folder)
    except OSError:   # another process finished first: its folder is the same conversion
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def components_from(pipeline_cls, config: str, roles: tuple[str, ...], local_files_only: bool) -> dict:
    """The components a file lacks, loaded from the config source with the classes its model_index names."""
    if not roles:
        return {}
    index = pipeline_cls.load_config(config, local_files_only=local_files_only)
    loaded = {}
    for role in roles:
        library, class_name = index[role]
        component_cls = getattr(importlib.import_module(library), class_name)
        loaded[role] = component_cls.from_pretrained(config, subfolder=role, local_files_only=local_files_only)
    return loaded


def marker_settings(base: BaseFile) -> dict:
    """The scheduler settings a file's v_pred / ztsnr markers ask for (DDPM families only)."""
    if base.family == "sd3":
        return {}
    return settings_for("v_prediction" if base.v_pred else None, base.ztsnr)
