"""Stable Diffusion 3 / 3.5: an MMDiT transformer, three text encoders (CLIP-L and CLIP-G with
projection, T5-XXL), a 16-channel VAE with a shift factor, and the flow-matching objective.

Text encoders are told apart by their role (position in the pipeline), never by hidden size:
upstream identifies CLIP-L/G by hidden_size 768/1280, which breaks for any other size and makes
resuming with --train_text_encoder crash (diffusers #8507, #8726).
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

from sdft.conditioning import prompt_texts
from sdft.families import streamed_load
from sdft.families.source import ModelSource
from sdft.objectives import pos_embed_crop_offset

DEFAULT_LORA_LAYERS = ["attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
                       "attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v"]


@dataclass
class SD3Models:
    tokenizer: CLIPTokenizer
    tokenizer_2: CLIPTokenizer
    tokenizer_3: T5TokenizerFast
    text_encoder: CLIPTextModelWithProjection
    text_encoder_2: CLIPTextModelWithProjection
    text_encoder_3: T5EncoderModel
    vae: AutoencoderKL
    transformer: SD3Transformer2DModel
    noise_scheduler: FlowMatchEulerDiscreteScheduler


def lora_targets(lora_layers: str | None, lora_blocks: str | None) -> list[str]:
    """--lora_layers replaces the default attention projections; --lora_blocks "12,13" restricts
    them to those transformer blocks."""
    layers = [name.strip() for name in lora_layers.split(",")] if lora_layers else list(DEFAULT_LORA_LAYERS)
    if not lora_blocks:
        return layers
    blocks = [int(block.strip()) for block in lora_blocks.split(",")]
    return [f"transformer_blocks.{block}.{layer}" for block in blocks for layer in layers]


def encode_prompts(models: SD3Models, captions: list[str], max_sequence_length: int, device: torch.device,
                   apply_t5_attn_mask: bool = False):
    """CLIP-L and CLIP-G penultimate states side by side, zero-padded to the T5 width, followed on
    the sequence axis by T5's states; pooled = both CLIP projections side by side."""
    clip_states, pooled = [], []
    for tokenizer, encoder in ((models.tokenizer, models.text_encoder), (models.tokenizer_2, models.text_encoder_2)):
        ids = tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        output = encoder(ids.to(device), output_hidden_states=True, return_dict=True)
        clip_states.append(output.hidden_states[-2])
        pooled.append(output.text_embeds)
    tokens = models.tokenizer_3(captions, padding="max_length", max_length=max_sequence_length, truncation=True,
                                add_special_tokens=True, return_tensors="pt")
    t5_states = t5_encode(models.text_encoder_3, tokens.input_ids.to(device),
                          tokens.attention_mask.to(device) if apply_t5_attn_mask else None)
    clip = torch.cat(clip_states, dim=-1)
    if clip.shape[-1] > t5_states.shape[-1]:
        # Padding by a negative amount would silently crop the CLIP features instead.
        raise ValueError(f"CLIP features ({clip.shape[-1]}) are wider than T5's ({t5_states.shape[-1]}).")
    clip = F.pad(clip, (0, t5_states.shape[-1] - clip.shape[-1]))
    return torch.cat([clip, t5_states.to(clip.dtype)], dim=-2), torch.cat(pooled, dim=-1)


def t5_encode(encoder: T5EncoderModel, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """T5's last hidden states. With an attention mask (kohya's --apply_t5_attn_mask), T5 attends
    only to the prompt's tokens and the padding rows are zeroed, so the conditioning does not depend
    on how much padding follows the prompt; without one, as the SD3 pipeline encodes."""
    if mask is None:
        return encoder(ids, return_dict=True).last_hidden_state
    states = encoder(ids, attention_mask=mask, return_dict=True).last_hidden_state
    return states * mask.unsqueeze(-1).to(states.dtype)


@contextmanager
def pos_embed_window(denoiser: torch.nn.Module, top: int, left: int):
    """Run the transformer with its positional embedding cut at (top, left) of the max_size² grid
    instead of diffusers' centre crop (PatchEmbed.cropped_pos_embed, replaced on the instance for
    the duration of one forward pass)."""
    patch_embed = getattr(denoiser, "module", denoiser).pos_embed

    def window(height: int, width: int) -> torch.Tensor:
        rows, cols = height // patch_embed.patch_size, width // patch_embed.patch_size
        size = patch_embed.pos_embed_max_size
        grid = patch_embed.pos_embed.reshape(1, size, size, -1)[:, top:top + rows, left:left + cols, :]
        return grid.reshape(1, rows * cols, -1)

    patch_embed.cropped_pos_embed = window
    try:
        yield
    finally:
        del patch_embed.cropped_pos_embed


class StableDiffusion3:
    name = "sd3"
    pipeline_cls = StableDiffusion3Pipeline
    denoiser_role = "transformer"
    # T5 stays frozen: training it costs far more memory than it gives (as in diffusers' LoRA script).
    lora_key_format = "peft"   # as the diffusers LoRA script for this family writes it
    trainable_text_encoder_roles = ["text_encoder", "text_encoder_2"]
    # The CLIP encoders' kohya prefixes, as ComfyUI maps them for SD3 (clip_l, clip_g); the
    # transformer's is lora_transformer (sdft.adapter_files).
    kohya_text_encoder_prefixes = {"text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}
    # The transformer's one convolution, the 2x2 patch embedding: what LoCon adds for SD3.
    lora_conv_targets = ("pos_embed.proj",)
    license = "other"

    def __init__(self, max_sequence_length: int = 77, lora_layers: str | None = None, lora_blocks: str | None = None,
                 apply_t5_attn_mask: bool = False, pos_emb_random_crop_rate: float = 0.0):
        self.max_sequence_length = max_sequence_length
        self.apply_t5_attn_mask = apply_t5_attn_mask
        self.pos_emb_random_crop_rate = pos_emb_random_crop_rate
        self.lora_target_modules = lora_targets(lora_layers, lora_blocks)
        self.tags = ["sd3", "sd3-diffusers", "text-to-image", "diffusers", "diffusers-training"]

    def load(self, source: ModelSource) -> SD3Models:
        hub, weights = source.hub_kwargs(), source.weight_kwargs()
        return SD3Models(
            tokenizer=CLIPTokenizer.from_pretrained(source.path, subfolder="tokenizer", **hub),
            tokenizer_2=CLIPTokenizer.from_pretrained(source.path, subfolder="tokenizer_2", **hub),
            tokenizer_3=T5TokenizerFast.from_pretrained(source.path, subfolder="tokenizer_3", **hub),
            text_encoder=CLIPTextModelWithProjection.from_pretrained(source.path, subfolder="text_encoder",
                                                                     **source.text_encoder_kwargs()),
            text_encoder_2=CLIPTextModelWithProjection.from_pretrained(source.path, subfolder="text_encoder_2",
                                                                       **source.text_encoder_kwargs()),
            text_encoder_3=T5EncoderModel.from_pretrained(source.path, subfolder="text_encoder_3",
                                                          **source.text_encoder_kwargs()),
            vae=AutoencoderKL.from_pretrained(source.path, subfolder="vae", **weights),
            transformer=self.load_denoiser(source),
            noise_scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(source.path, subfolder="scheduler", **hub),
        )

    def load_denoiser(self, source: ModelSource) -> SD3Transformer2DModel:
        return streamed_load.load_denoiser(SD3Transformer2DModel, source, "transformer")

    def components(self, models: SD3Models) -> dict[str, torch.nn.Module]:
        return {"text_encoder": models.text_encoder, "text_encoder_2": models.text_encoder_2,
                "text_encoder_3": models.text_encoder_3, "vae": models.vae, "transformer": models.transformer}

    def vae_dtype(self, weight_dtype: torch.dtype) -> torch.dtype:
        return torch.float32  # encoding happens once per image with --cache_latents; precision is cheap here

    def scale_latents(self, models: SD3Models, latents: torch.Tensor) -> torch.Tensor:
        return (latents - models.vae.config.shift_factor) * models.vae.config.scaling_factor

    def encode_text(self, models: SD3Models, captions: list[str], device: torch.device) -> dict:
        prompt_embeds, pooled = encode_prompts(models, captions, self.max_sequence_length, device,
                                               self.apply_t5_attn_mask)
        return {"encoder_hidden_states": prompt_embeds, "pooled_projections": pooled}

    def text_settings(self) -> dict:
        settings = {"max_sequence_length": self.max_sequence_length}
        if self.apply_t5_attn_mask:  # only when on, so the caches written without it stay valid
            settings["apply_t5_attn_mask"] = True
        return settings

    def batch_condition(self, text: dict, batch: dict, device: torch.device) -> dict:
        return text

    def condition(self, models: SD3Models, batch: dict, device: torch.device) -> dict:
        return self.batch_condition(self.encode_text(models, batch["captions"], device), batch, device)

    def training_condition(self, models: SD3Models, cond: dict, noisy: torch.Tensor,
                           generator: torch.Generator) -> dict:
        """--pos_emb_random_crop_rate (kohya; trained into SD3.5 Medium): with that probability per
        step, a random window of the positional-embedding grid instead of the centre one, so small
        buckets also train the outer positions. Rate 0 draws nothing."""
        if not self.pos_emb_random_crop_rate:
            return cond
        config = getattr(models.transformer, "module", models.transformer).config
        grid = (noisy.shape[-2] // config.patch_size, noisy.shape[-1] // config.patch_size)
        offset = pos_embed_crop_offset(config.pos_embed_max_size, grid, self.pos_emb_random_crop_rate, generator)
        return {**cond, "pos_embed_offset": offset}

    def predict(self, denoiser: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict) -> torch.Tensor:
        offset = cond.get("pos_embed_offset")
        with pos_embed_window(denoiser, *offset) if offset is not None else nullcontext():
            return denoiser(hidden_states=noisy, timestep=timesteps,
                            encoder_hidden_states=cond["encoder_hidden_states"],
                            pooled_projections=cond["pooled_projections"], return_dict=False)[0]

    def prompt_inputs(self, pipeline, prompt: str, negative_prompt: str | None, device: torch.device) -> dict:
        """With the T5 mask, validation must condition the way training does: the pipeline's own
        encode_prompt never masks T5, so the prompt and the negative prompt (classifier-free
        guidance; empty by default) are encoded here, with the pipeline's encoders."""
        if not self.apply_t5_attn_mask:   # the pipeline encodes as training did, with this many T5 tokens
            return {**prompt_texts(prompt, negative_prompt), "max_sequence_length": self.max_sequence_length}
        with torch.no_grad():
            embeds, pooled = encode_prompts(pipeline, [prompt, negative_prompt or ""], self.max_sequence_length,
                                            device, True)
        dtype = pipeline.transformer.dtype
        return {"prompt_embeds": embeds[:1].to(dtype), "pooled_prompt_embeds": pooled[:1].to(dtype),
                "negative_prompt_embeds": embeds[1:].to(dtype), "negative_pooled_prompt_embeds": pooled[1:].to(dtype)}

    def pipeline_modules(self, models: SD3Models) -> dict:
        """Validation reuses the loaded encoders (upstream reloads all three from disk each time and
        moves T5 to the GPU in fp32)."""
        return {"tokenizer": models.tokenizer, "tokenizer_2": models.tokenizer_2, "tokenizer_3": models.tokenizer_3,
                "text_encoder": models.text_encoder, "text_encoder_2": models.text_encoder_2,
                "text_encoder_3": models.text_encoder_3, "vae": models.vae}

    def export_modules(self, models: SD3Models, source: ModelSource) -> dict:
        return {}
