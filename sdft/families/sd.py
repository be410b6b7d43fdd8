"""Stable Diffusion 1.x / 2.x: one CLIP text encoder, a UNet, a 4-channel VAE, DDPM objective."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from sdft.conditioning import prompt_texts
from sdft.families import streamed_load
from sdft.families.long_prompts import CHUNK, chunked_ids, join_chunks
from sdft.families.source import ModelSource


@dataclass
class SDModels:
    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    noise_scheduler: DDPMScheduler


def clip_states(encoder: CLIPTextModel, ids: torch.Tensor, clip_skip: int | None) -> torch.Tensor:
    """The last layer's states, or with `clip_skip` N the N-th layer from the end passed through the
    final layer norm (kohya's and A1111's "clip skip": 2 = the penultimate layer, NovelAI's choice)."""
    if clip_skip in (None, 1):
        return encoder(ids, return_dict=False)[0]
    hidden = encoder(ids, output_hidden_states=True, return_dict=True).hidden_states[-clip_skip]
    # transformers 5 keeps the layers on the model itself; 4.x under .text_model
    text_model = encoder.text_model if hasattr(encoder, "text_model") else encoder
    return text_model.final_layer_norm(hidden)


class StableDiffusion:
    """The family object the trainer talks to. `denoiser_revision` loads the trained UNet from
    another Hub revision (--non_ema_revision)."""

    name = "sd"
    pipeline_cls = StableDiffusionPipeline
    denoiser_role = "unet"
    lora_target_modules = ["to_k", "to_q", "to_v", "to_out.0"]
    lora_key_format = "diffusers"   # as the diffusers LoRA script for this family writes it
    kohya_text_encoder_prefixes = {"text_encoder": "lora_te"}   # kohya's names for SD 1.x/2.x
    lora_conv_targets = ()   # LoCon reaches the ResNet convolutions through --lora_targets full
    trainable_text_encoder_roles = ["text_encoder"]
    # (text encoder, its tokenizer, key in the embeddings file) for --train_text_encoder_ti
    textual_inversion_encoders = [("text_encoder", "tokenizer", "clip_l")]
    license = "creativeml-openrail-m"
    tags = ["stable-diffusion", "stable-diffusion-diffusers", "text-to-image", "diffusers", "diffusers-training"]

    def __init__(self, denoiser_revision: str | None = None, clip_skip: int | None = None,
                 max_token_length: int | None = None):
        self.denoiser_revision = denoiser_revision
        self.clip_skip = clip_skip
        self.max_token_length = max_token_length if max_token_length != CHUNK else None

    def load(self, source: ModelSource) -> SDModels:
        return SDModels(
            tokenizer=CLIPTokenizer.from_pretrained(source.path, subfolder="tokenizer", **source.hub_kwargs()),
            text_encoder=CLIPTextModel.from_pretrained(source.path, subfolder="text_encoder",
                                                       **source.text_encoder_kwargs()),
            vae=AutoencoderKL.from_pretrained(source.path, subfolder="vae", **source.weight_kwargs()),
            unet=self.load_denoiser(source, self.denoiser_revision),
            noise_scheduler=DDPMScheduler.from_pretrained(source.path, subfolder="scheduler", **source.hub_kwargs()),
        )

    def load_denoiser(self, source: ModelSource, revision: str | None = None) -> UNet2DConditionModel:
        return streamed_load.load_denoiser(UNet2DConditionModel, source, "unet", revision)

    def components(self, models: SDModels) -> dict[str, torch.nn.Module]:
        return {"text_encoder": models.text_encoder, "vae": models.vae, "unet": models.unet}

    def vae_dtype(self, weight_dtype: torch.dtype) -> torch.dtype:
        return weight_dtype

    def scale_latents(self, models: SDModels, latents: torch.Tensor) -> torch.Tensor:
        return latents * models.vae.config.scaling_factor

    def encode_text(self, models: SDModels, captions: list[str], device: torch.device) -> dict:
        if self.max_token_length:   # --max_token_length 150/225: 75-token chunks, as A1111 encodes them
            ids = chunked_ids(models.tokenizer, captions, self.max_token_length).flatten(0, 1).to(device)
            states = clip_states(models.text_encoder, ids, self.clip_skip)
            return {"encoder_hidden_states": join_chunks(states, len(captions))}
        ids = models.tokenizer(
            captions, padding="max_length", max_length=models.tokenizer.model_max_length,
            truncation=True, return_tensors="pt",
        ).input_ids.to(device)
        return {"encoder_hidden_states": clip_states(models.text_encoder, ids, self.clip_skip)}

    def text_settings(self) -> dict:
        """Settings besides the encoders that change `encode_text`'s output: --clip_skip and
        --max_token_length when set."""
        return {**({"clip_skip": self.clip_skip} if self.clip_skip not in (None, 1) else {}),
                **({"max_token_length": self.max_token_length} if self.max_token_length else {})}

    def prompt_inputs(self, pipeline, prompt: str, negative_prompt: str | None, device: torch.device) -> dict:
        """The pipeline's prompt arguments, conditioning the way training does. With --clip_skip or
        --max_token_length the embeddings are computed here: diffusers 0.42's SD
        encode_prompt(clip_skip=...) reaches for `text_encoder.text_model`, which transformers 5
        removed (issue 16), and the pipeline cuts prompts at 77 tokens."""
        if self.clip_skip in (None, 1) and not self.max_token_length:
            return prompt_texts(prompt, negative_prompt)
        models = SimpleNamespace(tokenizer=pipeline.tokenizer, text_encoder=pipeline.text_encoder)
        with torch.no_grad():
            positive, negative = (self.encode_text(models, [text], device)["encoder_hidden_states"]
                                  for text in (prompt, negative_prompt or ""))
        return {"prompt_embeds": positive, "negative_prompt_embeds": negative}

    def batch_condition(self, text: dict, batch: dict, device: torch.device) -> dict:
        """Conditioning that depends on the images too: none for SD."""
        return text

    def condition(self, models: SDModels, batch: dict, device: torch.device) -> dict:
        return self.batch_condition(self.encode_text(models, batch["captions"], device), batch, device)

    def predict(self, denoiser: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict) -> torch.Tensor:
        return denoiser(noisy, timesteps, cond["encoder_hidden_states"], return_dict=False)[0]

    def training_condition(self, models: SDModels, cond: dict, noisy: torch.Tensor,
                           generator: torch.Generator) -> dict:
        return cond

    def pipeline_modules(self, models: SDModels) -> dict:
        """In-memory modules a validation pipeline reuses instead of reloading them."""
        return {"tokenizer": models.tokenizer, "text_encoder": models.text_encoder, "vae": models.vae,
                "safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}

    def export_modules(self, models: SDModels, source: ModelSource) -> dict:
        """Components the exported pipeline takes from elsewhere than the base model: none here."""
        return {}
