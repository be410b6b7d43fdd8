"""SDXL: two CLIP text encoders (the second with a projection), a UNet conditioned on pooled text
and on size/crop "micro-conditioning", a 4-channel VAE, DDPM objective.

Conditioning is computed per batch from the batch itself (never precomputed for the whole dataset:
upstream holds every embedding and latent in RAM, 44 GB + 20 GB for 138k images, diffusers PR #4505).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from sdft.conditioning import prompt_texts
from sdft.families import streamed_load
from sdft.families.base_file import is_single_file
from sdft.families.long_prompts import CHUNK, chunked_ids, join_chunks
from sdft.families.source import ModelSource


@dataclass
class SDXLModels:
    tokenizer: CLIPTokenizer
    tokenizer_2: CLIPTokenizer
    text_encoder: CLIPTextModel
    text_encoder_2: CLIPTextModelWithProjection
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    noise_scheduler: DDPMScheduler


def micro_conditioning(original_sizes: torch.Tensor, crop_top_lefts: torch.Tensor,
                       target_size: tuple[int, int] | torch.Tensor) -> torch.Tensor:
    """SDXL's add_time_ids per sample: original (h, w), crop (top, left), target (h, w)
    (Podell et al. 2023, arXiv 2307.01952, section 2.2). `target_size` is one (h, w) for the
    whole batch or a (B, 2) tensor, one per sample."""
    target = torch.as_tensor(target_size, dtype=original_sizes.dtype, device=original_sizes.device)
    return torch.cat([original_sizes, crop_top_lefts, target.expand(len(original_sizes), 2)], dim=1)


def encode_prompts(tokenizers: list, text_encoders: list, captions: list[str], device: torch.device,
                   clip_skip: int | None = None, max_token_length: int | None = None):
    """Penultimate hidden states of both encoders side by side; the pooled, projected output of the
    second. Encoders are used by position: the first is CLIP ViT-L, the second OpenCLIP bigG.
    `clip_skip` N > 1 (kohya's count) takes N - 1 layers further back, as diffusers' pipeline
    does for its clip_skip=N - 1, without a final layer norm. `max_token_length` 150/225 encodes
    75-token chunks (sdft.families.long_prompts); the pooled output is then the first chunk's."""
    layer = -1 - (clip_skip or 1)
    hidden = []
    for tokenizer, encoder in zip(tokenizers, text_encoders):
        if max_token_length:
            ids = chunked_ids(tokenizer, captions, max_token_length).flatten(0, 1).to(device)
        else:
            ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids.to(device)
        output = encoder(ids, output_hidden_states=True, return_dict=True)
        hidden.append(join_chunks(output.hidden_states[layer], len(captions)))
    pooled = output.text_embeds[::max_token_length // CHUNK] if max_token_length else output.text_embeds
    return torch.cat(hidden, dim=-1), pooled


class StableDiffusionXL:
    """`vae_path` is --pretrained_vae_model_name_or_path: a VAE used instead of the model's own."""

    name = "sdxl"
    pipeline_cls = StableDiffusionXLPipeline
    denoiser_role = "unet"
    lora_target_modules = ["to_k", "to_q", "to_v", "to_out.0"]
    lora_key_format = "diffusers"   # as the diffusers LoRA script for this family writes it
    kohya_text_encoder_prefixes = {"text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}
    lora_conv_targets = ()   # LoCon reaches the ResNet convolutions through --lora_targets full
    trainable_text_encoder_roles = ["text_encoder", "text_encoder_2"]
    # (text encoder, its tokenizer, key in the embeddings file) for --train_text_encoder_ti: the
    # keys A1111/Forge/ComfyUI read in an SDXL embedding.
    textual_inversion_encoders = [("text_encoder", "tokenizer", "clip_l"), ("text_encoder_2", "tokenizer_2", "clip_g")]
    license = "openrail++"
    tags = ["stable-diffusion-xl", "stable-diffusion-xl-diffusers", "text-to-image", "diffusers",
            "diffusers-training"]

    def __init__(self, vae_path: str | None = None, clip_skip: int | None = None, max_token_length: int | None = None):
        self.vae_path = vae_path
        self.clip_skip = clip_skip
        self.max_token_length = max_token_length if max_token_length != CHUNK else None

    def load(self, source: ModelSource) -> SDXLModels:
        hub = source.hub_kwargs()
        return SDXLModels(
            tokenizer=CLIPTokenizer.from_pretrained(source.path, subfolder="tokenizer", **hub),
            tokenizer_2=CLIPTokenizer.from_pretrained(source.path, subfolder="tokenizer_2", **hub),
            text_encoder=CLIPTextModel.from_pretrained(source.path, subfolder="text_encoder",
                                                       **source.text_encoder_kwargs()),
            text_encoder_2=CLIPTextModelWithProjection.from_pretrained(source.path, subfolder="text_encoder_2",
                                                                       **source.text_encoder_kwargs()),
            vae=self.load_vae(source),
            unet=self.load_denoiser(source),
            noise_scheduler=DDPMScheduler.from_pretrained(source.path, subfolder="scheduler", **hub),
        )

    def load_vae(self, source: ModelSource) -> AutoencoderKL:
        if self.vae_path is not None:
            return self.other_vae(source.path, source.cache_dir)
        return AutoencoderKL.from_pretrained(source.path, subfolder="vae", **source.weight_kwargs())

    def other_vae(self, base: str, cache_dir: str | None = None) -> AutoencoderKL:
        """--pretrained_vae_model_name_or_path: a folder or Hub id, or one VAE file (read by diffusers'
        single-file loader with the base model's VAE config)."""
        if is_single_file(self.vae_path):
            return AutoencoderKL.from_single_file(self.vae_path, config=base, subfolder="vae")
        return AutoencoderKL.from_pretrained(self.vae_path, cache_dir=cache_dir)

    def load_denoiser(self, source: ModelSource) -> UNet2DConditionModel:
        return streamed_load.load_denoiser(UNet2DConditionModel, source, "unet")

    def components(self, models: SDXLModels) -> dict[str, torch.nn.Module]:
        return {"text_encoder": models.text_encoder, "text_encoder_2": models.text_encoder_2,
                "vae": models.vae, "unet": models.unet}

    def vae_dtype(self, weight_dtype: torch.dtype) -> torch.dtype:
        # The stock SDXL VAE overflows in fp16 (NaN latents, black images: diffusers #4820), so it
        # stays fp32 unless the user supplied another VAE, e.g. madebyollin/sdxl-vae-fp16-fix.
        return torch.float32 if self.vae_path is None else weight_dtype

    def scale_latents(self, models: SDXLModels, latents: torch.Tensor) -> torch.Tensor:
        return latents * models.vae.config.scaling_factor

    def encode_text(self, models: SDXLModels, captions: list[str], device: torch.device) -> dict:
        prompt_embeds, pooled = encode_prompts([models.tokenizer, models.tokenizer_2],
                                               [models.text_encoder, models.text_encoder_2], captions, device,
                                               self.clip_skip, self.max_token_length)
        return {"encoder_hidden_states": prompt_embeds, "text_embeds": pooled}

    def batch_condition(self, text: dict, batch: dict, device: torch.device) -> dict:
        """Adds the size/crop micro-conditioning of the images actually in the batch; the target
        is each image's own bucket (the collated target_sizes), which a batch of cached latents
        carries as well as one of pixels."""
        target = batch["target_sizes"] if "target_sizes" in batch else tuple(batch["pixel_values"].shape[-2:])
        time_ids = micro_conditioning(batch["original_sizes"], batch["crop_top_lefts"], target).to(device)
        return {"encoder_hidden_states": text["encoder_hidden_states"],
                "added_cond_kwargs": {"text_embeds": text["text_embeds"],
                                      "time_ids": time_ids.to(text["encoder_hidden_states"].dtype)}}

    def condition(self, models: SDXLModels, batch: dict, device: torch.device) -> dict:
        return self.batch_condition(self.encode_text(models, batch["captions"], device), batch, device)

    def predict(self, denoiser: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict) -> torch.Tensor:
        return denoiser(noisy, timesteps, cond["encoder_hidden_states"], added_cond_kwargs=cond["added_cond_kwargs"],
                        return_dict=False)[0]

    def training_condition(self, models: SDXLModels, cond: dict, noisy: torch.Tensor,
                           generator: torch.Generator) -> dict:
        return cond

    def pipeline_modules(self, models: SDXLModels) -> dict:
        return {"tokenizer": models.tokenizer, "tokenizer_2": models.tokenizer_2, "text_encoder": models.text_encoder,
                "text_encoder_2": models.text_encoder_2, "vae": models.vae}

    def export_modules(self, models: SDXLModels, source: ModelSource) -> dict:
        """The exported pipeline carries the VAE that was trained with, as stored on disk."""
        return {"vae": self.other_vae(source.path, source.cache_dir)} if self.vae_path is not None else {}

    def text_settings(self) -> dict:
        """Settings besides the encoders that change `encode_text`'s output: --clip_skip and
        --max_token_length when set."""
        return {**({"clip_skip": self.clip_skip} if self.clip_skip not in (None, 1) else {}),
                **({"max_token_length": self.max_token_length} if self.max_token_length else {})}

    def prompt_inputs(self, pipeline, prompt: str, negative_prompt: str | None, device: torch.device) -> dict:
        """The pipeline's prompt arguments. diffusers' SDXL pipeline counts clip skip one lower than
        kohya/A1111; chunked long prompts are given to it as embeddings (it cuts prompts at 77 tokens)."""
        if self.max_token_length:
            models = SimpleNamespace(tokenizer=pipeline.tokenizer, tokenizer_2=pipeline.tokenizer_2,
                                     text_encoder=pipeline.text_encoder, text_encoder_2=pipeline.text_encoder_2)
            with torch.no_grad():
                positive, negative = (self.encode_text(models, [text], device) for text in (prompt, negative_prompt or ""))
            return {"prompt_embeds": positive["encoder_hidden_states"], "pooled_prompt_embeds": positive["text_embeds"],
                    "negative_prompt_embeds": negative["encoder_hidden_states"],
                    "negative_pooled_prompt_embeds": negative["text_embeds"]}
        clip_skip = {"clip_skip": self.clip_skip - 1} if self.clip_skip not in (None, 1) else {}
        return {**prompt_texts(prompt, negative_prompt), **clip_skip}
