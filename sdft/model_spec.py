"""Safetensors metadata that UIs and model sites read: kohya's `ss_*` keys and Stability's
model-spec (`modelspec.*`) keys.

The key names and values are the conventions of kohya sd-scripts (`ss_network_dim`,
`ss_network_alpha`, `ss_base_model_version` = sd_v1 / sd_v2 / sdxl_base_v1-0 / sd3, read by
A1111/Forge's LoRA browser and by model sites) and of the Stability AI model spec 1.0.0
(`modelspec.architecture` such as "stable-diffusion-xl-v1-base/lora", `modelspec.resolution` as
"WxH"; https://github.com/Stability-AI/ModelSpec). Only what the user passed is recorded: the base
model as given on the command line, the output folder's name as the title, never a token.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone

from sdft.adapters import LoraSpec, network_args, network_module

SPEC_VERSION = "1.0.0"
STABILITY_IMPLEMENTATION = "https://github.com/Stability-AI/generative-models"


@dataclass(frozen=True)
class BaseModel:
    """What kind of model a file belongs to, in both naming schemes."""

    version: str              # ss_base_model_version
    architecture: str         # modelspec.architecture, without the adapter suffix
    implementation: str       # modelspec.implementation
    prediction_type: str      # modelspec.prediction_type: "epsilon", "v" or "flow"


def describe_base(family_name: str, denoiser_config: dict, prediction_type: str | None) -> BaseModel:
    """`denoiser_config` is the UNet's or transformer's config; `prediction_type` the scheduler's.

    SD 1.x and 2.x share a family here; 2.x is recognised by its OpenCLIP-H text width (1024,
    the UNet's cross-attention width; 768 for 1.x), and the 768-v models by v-prediction."""
    if family_name == "sdxl":
        return BaseModel("sdxl_base_v1-0", "stable-diffusion-xl-v1-base", STABILITY_IMPLEMENTATION,
                         "v" if prediction_type == "v_prediction" else "epsilon")
    if family_name == "sd3":
        # sd-scripts writes "stable-diffusion-3" followed by the size; 38 blocks is 3.5 Large.
        size = "-5-large" if denoiser_config.get("num_layers") == 38 else "-medium"
        return BaseModel("sd3", f"stable-diffusion-3{size}", STABILITY_IMPLEMENTATION, "flow")
    if family_name != "sd":
        raise ValueError(f"Unknown model family '{family_name}'.")
    if denoiser_config.get("cross_attention_dim") == 1024:
        if prediction_type == "v_prediction":
            return BaseModel("sd_v2", "stable-diffusion-v2-768-v", STABILITY_IMPLEMENTATION, "v")
        return BaseModel("sd_v2", "stable-diffusion-v2-512", STABILITY_IMPLEMENTATION, "epsilon")
    return BaseModel("sd_v1", "stable-diffusion-v1", "diffusers",
                     "v" if prediction_type == "v_prediction" else "epsilon")


def training_metadata(base: BaseModel, *, base_model: str, title: str, resolution: int, steps: int,
                      lora: tuple[int, float] | None = None, date: datetime | None = None,
                      zero_terminal_snr: bool = False, clip_skip: int | None = None,
                      network: LoraSpec | None = None) -> dict[str, str]:
    """String-valued metadata for a safetensors header. `lora` is (rank, alpha) for a LoRA file,
    None for a full checkpoint; `network` (the run's adapter) adds kohya's module and network args."""
    when = timestamp(date)
    metadata = {
        "modelspec.sai_model_spec": SPEC_VERSION,
        "modelspec.architecture": base.architecture + ("/lora" if lora else ""),
        "modelspec.implementation": base.implementation,
        "modelspec.title": title,
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.date": when,
        "modelspec.prediction_type": base.prediction_type,
        "ss_base_model_version": base.version,
        "ss_v2": str(base.version == "sd_v2"),
        "ss_sd_model_name": base_model,
        "ss_resolution": f"({resolution}, {resolution})",
        "ss_steps": str(steps),
        "ss_max_train_steps": str(steps),
    }
    if clip_skip is not None:   # kohya's key, in its count (2 = the penultimate layer)
        metadata["ss_clip_skip"] = str(clip_skip)
    if zero_terminal_snr:   # kohya's key; absent (False) keeps older files' headers as they were
        metadata["ss_zero_terminal_snr"] = "True"
    if lora is not None:
        rank, alpha = lora
        metadata.update({"ss_network_module": "networks.lora", "ss_network_dim": str(rank),
                         "ss_network_alpha": format_number(alpha)})
    if lora is not None and network is not None:
        metadata.update({"ss_network_module": network_module(network),
                         "ss_network_args": json.dumps(network_args(network))})
    return metadata


def stamped(metadata: dict[str, str], steps: int, date: datetime | None = None) -> dict[str, str]:
    """The same metadata for a file written now, after `steps` optimizer steps (a checkpoint, or
    the final file of a run whose metadata was made at its start)."""
    return {**metadata, "ss_steps": str(steps), "modelspec.date": timestamp(date)}


def timestamp(date: datetime | None = None) -> str:
    return (date or datetime.now(timezone.utc)).replace(microsecond=0).isoformat()


def format_number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)
