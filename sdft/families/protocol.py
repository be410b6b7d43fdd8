"""What the trainer, the builders, the data path and the export use of a model family.

`StableDiffusion`, `StableDiffusionXL` and `StableDiffusion3` are plain classes that provide this;
the Protocol only documents the contract and lets a type checker hold them to it (no base class,
no registry). `Models` is each family's dataclass of loaded components (tokenizers, text
encoders, VAE, denoiser, `noise_scheduler`)."""

from __future__ import annotations

from typing import Any, Protocol

import torch

from sdft.families.source import ModelSource

Models = Any


class Family(Protocol):
    name: str                                    # "sd" | "sdxl" | "sd3": picks file layouts and metadata
    pipeline_cls: type                           # the diffusers pipeline that saves, loads and validates
    denoiser_role: str                           # "unet" or "transformer": the attribute of Models
    lora_target_modules: list[str]               # the denoiser modules LoRA adapts
    lora_conv_targets: tuple[str, ...]           # what --lora_type locon adds where --lora_targets is absent (SD3)
    lora_key_format: str                         # how the diffusers LoRA file names its keys
    kohya_text_encoder_prefixes: dict[str, str]  # text encoder role -> kohya key prefix
    trainable_text_encoder_roles: list[str]      # --train_text_encoder trains these
    textual_inversion_encoders: list[tuple[str, str, str]]   # (encoder, tokenizer, embeddings-file key)
    license: str                                 # for the model card
    tags: list[str]

    def load(self, source: ModelSource) -> Models: ...

    def load_denoiser(self, source: ModelSource, revision: str | None = None) -> torch.nn.Module: ...

    def components(self, models: Models) -> dict[str, torch.nn.Module]:
        """The weights of a single-file checkpoint, by role."""

    def vae_dtype(self, weight_dtype: torch.dtype) -> torch.dtype: ...

    def scale_latents(self, models: Models, latents: torch.Tensor) -> torch.Tensor: ...

    def encode_text(self, models: Models, captions: list[str], device: torch.device) -> dict:
        """The text part of the conditioning (what the text cache stores)."""

    def text_settings(self) -> dict:
        """Settings besides the encoders that change `encode_text`'s output (they key the text cache)."""

    def batch_condition(self, text: dict, batch: dict, device: torch.device) -> dict:
        """The full conditioning from the text part and the batch (SDXL adds its size/crop numbers)."""

    def condition(self, models: Models, batch: dict, device: torch.device) -> dict: ...

    def training_condition(self, models: Models, cond: dict, noisy: torch.Tensor,
                           generator: torch.Generator) -> dict:
        """The conditioning of one training step, given its noised latents and the step's generator
        (SD3 with --pos_emb_random_crop_rate adds a positional-embedding window); others: `cond`."""

    def predict(self, denoiser: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor,
                cond: dict) -> torch.Tensor: ...

    def prompt_inputs(self, pipeline, prompt: str, negative_prompt: str | None, device: torch.device) -> dict:
        """The validation pipeline's prompt arguments: {"prompt": prompt} (SDXL: with diffusers' clip_skip),
        or embeddings where training encodes text differently from the pipeline (--clip_skip in SD 1.x,
        --max_token_length, SD3 with --apply_t5_attn_mask)."""

    def pipeline_modules(self, models: Models) -> dict:
        """In-memory modules a validation pipeline reuses instead of reloading them."""

    def export_modules(self, models: Models, source: ModelSource) -> dict:
        """Components the exported pipeline takes from elsewhere than the base model (SDXL: its VAE)."""
