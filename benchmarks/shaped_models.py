"""The real models' shapes with random weights, for benchmarks/bench_train.py: SD 1.5, SDXL base 1.0
and SD3-medium (4 of its 24 blocks, a 2-layer T5) from their published configs, with the tiny
models' offline tokenizers (`base`: the cached tiny model folder of the same family), so nothing
is downloaded. benchmarks/README.md lists what each keeps and what it shortens.
"""

from __future__ import annotations

from pathlib import Path

import torch

# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (the keys that differ from diffusers' defaults)
SDXL_UNET = dict(
    sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,  # 6 size/crop numbers x 256 + bigG's pooled 1280
)


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


def build_sd15_shaped(output: Path, base: Path) -> Path:
    """SD 1.5's UNet, VAE and text encoder configs, randomly initialised, with the tiny model's
    offline tokenizer (so the text encoder's vocabulary is ~900 tokens instead of 49,408)."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

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


def build_sdxl_shaped(output: Path, base: Path) -> Path:
    """SDXL base 1.0's UNet, VAE and text encoder configs, randomly initialised (CLIP-L and
    OpenCLIP-bigG at full depth), with the tiny SDXL model's offline tokenizers and scheduler."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer")
    tokenizer_2 = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer_2")  # pads with "!" (id 0), as bigG's
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**SDXL_UNET)
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


def build_sd3_medium_shaped(output: Path, base: Path) -> Path:
    """SD3-medium's transformer widths with SD3_MEDIUM_LAYERS blocks, its VAE, CLIP-L and OpenCLIP-bigG
    at full depth, and a T5 with T5-XXL's widths but SD3_T5_LAYERS layers; randomly initialised, with
    the tiny SD3 model's offline tokenizers and scheduler."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

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
