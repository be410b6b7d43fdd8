"""Tiny Stable Diffusion model folders and a tiny captioned image set.

The suite's tests and demos cannot download real weights or tokenizers (no GPU and no
Hugging Face Hub access), so this module writes stand-ins that have the exact diffusers
folder layout of the real checkpoints but only a few hundred thousand parameters. Code that
loads and trains Stable Diffusion 1.x, SDXL or SD3 can therefore run end to end on a CPU in
seconds. The builders' weights are random (decoded images are noise; only shapes, configs and
file layout are realistic) unless `fit_vae=True`, which first fits the VAE to generated shape
images (sdft/tiny_vae.py) so that a trained denoiser's pictures can show shapes and colours; the
command line does that by default (`--random-vae` skips it).

Everything is generated offline: the CLIP tokenizers are byte-level BPE vocabularies written
here (with merges learned from a small built-in word list), and the T5 tokenizer is a small
Unigram vocabulary. Output is deterministic for a given seed.

Command line::

    python -m sdft.tiny model --family sd --output tiny-models/sd
    python -m sdft.tiny model --family sdxl --output tiny-models/sdxl --seed 1
    python -m sdft.tiny model --family sd3 --output tiny-models/sd3
    python -m sdft.tiny helper --kind blip --output tiny-models/blip      # also swin2sr, clipseg
    python -m sdft.tiny data --output tiny-data/metadata
    python -m sdft.tiny data --output tiny-data/captions --layout captions --num-images 12
    python -m sdft.tiny data --output tiny-data/instance --layout images --seed 3
    python -m sdft.tiny data --output tiny-data/easy --colours red,blue,green,yellow --shapes circle,square --size 48

Each command prints the folder it wrote.
"""

from __future__ import annotations

import argparse
import json
import random
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    PNDMScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from PIL import Image, ImageDraw
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

from sdft.tiny_vae import fit_vae

__all__ = ["build_sd", "build_sdxl", "build_sd3", "build_blip", "build_swin2sr", "build_clipseg", "make_images",
           "main"]

FAMILIES = ("sd", "sdxl", "sd3")
LAYOUTS = ("metadata", "captions", "images")

# Captions are built from these words, so they are in the tokenizers' vocabularies as whole
# tokens; the rest are common prompt words so typical test prompts do not fall apart into
# one token per character.
_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 70),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 190),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "pink": (240, 130, 180),
    "grey": (128, 128, 128),
}
COLOURS = _COLOURS  # public: scripts/check_demo.py matches generated images against these
_SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring")
_PROMPT_WORDS = (
    "a an the of on in with and at by for to is are this that photo picture painting drawing "
    "image portrait style sks dog cat person man woman child face bird horse car house tree "
    "flower sky water sea river mountain city street road forest garden field beach snow rain "
    "sun moon night day light dark small large big little old new beautiful cute happy sitting "
    "standing running walking wearing holding looking next front top bottom left right shape "
    "background detailed high quality realistic cartoon art oil watercolor sketch digital "
    "render colorful bright simple plain gradient pattern texture"
).split()
_VOCAB_WORDS = tuple(dict.fromkeys([*_COLOURS, *_SHAPES, *_PROMPT_WORDS]))

# (width, height) pairs; mixed aspect ratios so bucketing and resizing code gets exercised.
_IMAGE_SIZES = ((48, 64), (64, 40), (56, 56), (72, 48), (40, 72), (64, 64), (48, 48), (72, 56))

_CLIP_BOS = "<|startoftext|>"
_CLIP_EOS = "<|endoftext|>"
_MAX_MERGES = 400


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-level alphabet: printable bytes map to themselves, the rest above 255."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _learn_merges(words: Sequence[str], max_merges: int) -> list[tuple[str, str]]:
    """Greedy BPE over a word list, in CLIP's form (the last symbol of a word ends in </w>)."""
    corpus = [[*w[:-1], w[-1] + "</w>"] for w in words]
    merges: list[tuple[str, str]] = []
    while len(merges) < max_merges:
        pairs = Counter(p for symbols in corpus for p in zip(symbols, symbols[1:]))
        if not pairs:
            break
        # max() keeps the first of equal counts, so sorting breaks ties alphabetically and the
        # vocabulary never depends on set or hash order.
        best = max(sorted(pairs), key=pairs.__getitem__)
        merges.append(best)
        corpus = [_merge_pair(symbols, best) for symbols in corpus]
    return merges


def _merge_pair(symbols: list[str], pair: tuple[str, str]) -> list[str]:
    merged: list[str] = []
    i = 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            merged.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            merged.append(symbols[i])
            i += 1
    return merged


def _clip_tokenizer(folder: Path, pad_token: str = _CLIP_EOS, max_length: int = 77) -> CLIPTokenizer:
    """Write a CLIP-style vocab.json/merges.txt into `folder` and load it back.

    The vocabulary order mirrors openai/clip-vit-large-patch14: bytes, bytes + </w>, merges,
    then the two special tokens. `pad_token="!"` mirrors the OpenCLIP tokenizers that SDXL
    and SD3 ship as tokenizer_2 (they pad with id 0, not with the end-of-text token).
    `max_length` is what prompts are padded to (77 in every real checkpoint).
    """
    alphabet = list(_bytes_to_unicode().values())
    merges = _learn_merges(_VOCAB_WORDS, _MAX_MERGES)
    tokens = [*alphabet, *(c + "</w>" for c in alphabet), *(a + b for a, b in merges)]
    tokens += [_CLIP_BOS, _CLIP_EOS]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merge_lines = "".join(f"{a} {b}\n" for a, b in merges)
    (folder / "merges.txt").write_text("#version: 0.2\n" + merge_lines, encoding="utf-8")
    # Load from files: in transformers 5 `CLIPTokenizer(vocab_file=...)` ignores the files and
    # silently builds a two-token vocabulary, so only from_pretrained is trustworthy.
    tokenizer = CLIPTokenizer.from_pretrained(folder, model_max_length=max_length, pad_token=pad_token)
    if len(tokenizer) != len(vocab):
        raise RuntimeError(f"CLIP tokenizer has {len(tokenizer)} tokens, wrote {len(vocab)}")
    return tokenizer


def _t5_tokenizer() -> T5TokenizerFast:
    """A small T5 Unigram tokenizer: whole caption words, then single characters as fallback."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -4.0)]
    pieces += [("\u2581" + w, -3.0) for w in _VOCAB_WORDS]
    chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?'\"-()/"
    # Characters score low so the Unigram model prefers a whole word whenever one matches.
    pieces += [(c, -8.0) for c in chars]
    # T5 v1.1 keeps 100 sentinel tokens; they are irrelevant to text encoding, so none here.
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=512)


def _clip_text_config(
    tokenizer: CLIPTokenizer, hidden_size: int, projection_dim: int = 32
) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=77,
        projection_dim=projection_dim,
        # CLIP pools the hidden state at the first eos_token_id, so these must match the
        # tokenizer or the pooled embedding silently comes from the wrong position.
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _vae(latent_channels: int, scaling_factor: float, sd3: bool = False) -> AutoencoderKL:
    # Two blocks means a single downsample: 32 px images become 16 x 16 latents.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=32,
        scaling_factor=scaling_factor,
        shift_factor=0.0609 if sd3 else None,
        use_quant_conv=not sd3,
        use_post_quant_conv=not sd3,
    )


VAE_FIT_STEPS = 400


def _fitted(vae: AutoencoderKL, seed: int, steps: int | None = None, colours: Sequence[str] | None = None,
            shapes: Sequence[str] | None = None) -> None:
    """Fit the VAE to shape images in place (SD3's, with its 16 channels, also gets a shift).
    400 steps take 30-60 s on two CPU cores. The weights are the same for the same seed, torch
    version, machine type and thread count (a parallel reduction's order depends on the threads)."""
    with torch.random.fork_rng(devices=[]):
        fit_vae(vae, shape_images(seed, count=256, colours=colours, shapes=shapes), seed=seed,
                steps=steps or VAE_FIT_STEPS,
                with_shift=vae.config.shift_factor is not None)


def shape_images(seed: int, count: int, size: int = 32, colours: Sequence[str] | None = None,
                 shapes: Sequence[str] | None = None) -> torch.Tensor:
    """`count` square shape images as a (count, 3, size, size) tensor in [-1, 1], the VAE's range,
    drawn from `colours` and `shapes` (default: all)."""
    rng = random.Random(seed)
    drawn = (_draw_image(rng, (size, size), tuple(colours or _COLOURS), tuple(shapes or _SHAPES))
             for _ in range(count))
    pixels = np.stack([np.asarray(image) for image, _ in drawn])
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _sd_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def build_sd(output_dir: str | Path, seed: int = 0, fit_vae: bool = False, max_length: int = 77,
             vae_colours: Sequence[str] | None = None, vae_shapes: Sequence[str] | None = None) -> Path:
    """Write a tiny Stable Diffusion 1.x pipeline folder and return its path.

    fit_vae=True trains the VAE on generated shape images first (see `_fitted`), so decoded
    images show shapes instead of noise; the default keeps random weights, which is faster.
    vae_colours, vae_shapes: fit on images of only these (default: all). Fitted on all ten colours
    for 400 steps, the VAE loses most of the green channel (a yellow background decodes nearest to
    red, green to dark green); fitted on the demo's four colours and two shapes, it keeps the
    nearest colour of centre and border in 128 of 128 test pictures, mean error 6.5 instead of ~17.
    max_length: the tokens a prompt is padded to (the tokenizer's model_max_length, which the
    pipeline and the trainer pad to). The text encoder is random and frozen, so its padding
    positions carry almost nothing of the prompt, and cross-attention starts out spread evenly
    over all of them: with 77 the colour words are 2 keys of 77. In the demo's recipe (see
    scripts/demo.sh), after 240 steps the two validation prompts already gave different pictures
    with 16 and still the same orange one with 77 (one run each, so a hint rather than a proof)."""
    output = Path(output_dir)
    tokenizer = _clip_tokenizer(output / "tokenizer", max_length=max_length)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = _sd_unet()
        vae = _vae(latent_channels=4, scaling_factor=0.18215)
        text_encoder = CLIPTextModel(_clip_text_config(tokenizer, hidden_size=32))
    if fit_vae:
        _fitted(vae, seed, colours=vae_colours, shapes=vae_shapes)
    # The SD 1.4/1.5 repositories ship this PNDM config; training code reads the same file
    # as a DDPMScheduler, which shares every noise-schedule key.
    scheduler = PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(output)
    return output


def _sdxl_unet(cross_attention_dim: int, pooled_dim: int) -> UNet2DConditionModel:
    time_embed_dim = 8
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        # Like SDXL: no attention at the highest resolution, per-block head counts.
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        cross_attention_dim=cross_attention_dim,
        norm_num_groups=8,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        # Six micro-conditioning numbers (original size, crop, target size) plus the pooled
        # text embedding of text_encoder_2.
        projection_class_embeddings_input_dim=6 * time_embed_dim + pooled_dim,
    )


def build_sdxl(output_dir: str | Path, seed: int = 0, fit_vae: bool = False) -> Path:
    """Write a tiny Stable Diffusion XL pipeline folder and return its path (fit_vae: as build_sd)."""
    output = Path(output_dir)
    tokenizer = _clip_tokenizer(output / "tokenizer")
    tokenizer_2 = _clip_tokenizer(output / "tokenizer_2", pad_token="!")
    # Different widths (32 vs 48) so code that swaps the two encoders fails on shapes.
    config_1 = _clip_text_config(tokenizer, hidden_size=32)
    config_2 = _clip_text_config(tokenizer_2, hidden_size=48, projection_dim=32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = _sdxl_unet(config_1.hidden_size + config_2.hidden_size, config_2.projection_dim)
        vae = _vae(latent_channels=4, scaling_factor=0.13025)
        text_encoder = CLIPTextModel(config_1)
        text_encoder_2 = CLIPTextModelWithProjection(config_2)
    if fit_vae:
        _fitted(vae, seed)
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type="epsilon",
    )
    pipeline = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    pipeline.save_pretrained(output)
    return output


def _t5_encoder(tokenizer: T5TokenizerFast, d_model: int) -> T5EncoderModel:
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=16,
        num_heads=2,
        num_layers=2,
        d_ff=64,
        feed_forward_proj="gated-gelu",
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    return T5EncoderModel(config)


# The transformer settings that tell the SD3 generations apart (their config.json files on the Hub):
# SD3.5 Medium is MMDiT-X, self-attention on the image tokens too ("dual attention") in its first
# 13 layers, with RMS qk-norm, and a larger positional-embedding grid (384 there) for multi-resolution
# training; SD3.5 Large has qk-norm and no dual attention.
SD3_VARIANTS = {
    "sd3": {},
    "sd35-medium": {"dual_attention_layers": (0,), "qk_norm": "rms_norm", "pos_embed_max_size": 48},
    "sd35-large": {"qk_norm": "rms_norm"},
}


def build_sd3(output_dir: str | Path, seed: int = 0, fit_vae: bool = False, variant: str = "sd3") -> Path:
    """Write a tiny Stable Diffusion 3 pipeline folder and return its path (fit_vae: as build_sd;
    the fitted VAE gets a shift_factor too, as SD3's does). `variant`: a key of SD3_VARIANTS."""
    if variant not in SD3_VARIANTS:
        raise ValueError(f"unknown SD3 variant {variant!r}; expected one of {sorted(SD3_VARIANTS)}")
    output = Path(output_dir)
    tokenizer = _clip_tokenizer(output / "tokenizer")
    tokenizer_2 = _clip_tokenizer(output / "tokenizer_2", pad_token="!")
    tokenizer_3 = _t5_tokenizer()
    config_1 = _clip_text_config(tokenizer, hidden_size=32, projection_dim=32)
    config_2 = _clip_text_config(tokenizer_2, hidden_size=48, projection_dim=32)
    # SD3 zero-pads the concatenated CLIP states (32 + 48) up to the T5 width, so T5 must be
    # at least that wide.
    t5_width = 96
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(
            sample_size=16,
            patch_size=2,
            in_channels=16,
            out_channels=16,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=4,
            joint_attention_dim=t5_width,
            # Must equal num_attention_heads * attention_head_dim (the block width).
            caption_projection_dim=32,
            pooled_projection_dim=config_1.projection_dim + config_2.projection_dim,
            **SD3_VARIANTS[variant],
        )
        vae = _vae(latent_channels=16, scaling_factor=1.5035, sd3=True)
        text_encoder = CLIPTextModelWithProjection(config_1)
        text_encoder_2 = CLIPTextModelWithProjection(config_2)
        text_encoder_3 = _t5_encoder(tokenizer_3, t5_width)
    if fit_vae:
        _fitted(vae, seed)
    pipeline = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )
    pipeline.save_pretrained(output)
    return output


# --------------------------------------------------------------------------- preprocessing models
# Tiny BLIP (captions), Swin2SR (upscaling) and CLIPSeg (masks) folders, loadable by the same
# transformers classes as the real models; random weights, so the captions are word salad and the
# masks noise, but every code path of sdft.data.preprocess runs offline.


def build_blip(output_dir: str | Path, seed: int = 0) -> Path:
    """A tiny BlipForConditionalGeneration with a BlipProcessor (BERT word-piece vocabulary)."""
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipProcessor
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    (output / "vocab.txt").write_text("\n".join([*specials, *_VOCAB_WORDS]) + "\n", encoding="utf-8")
    tokenizer = BertTokenizer.from_pretrained(output)
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, encoder_hidden_size=32, max_position_embeddings=64,
                bos_token_id=tokenizer.cls_token_id, sep_token_id=tokenizer.sep_token_id,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.sep_token_id)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  image_size=32, patch_size=8)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=vision, projection_dim=32))
    model.save_pretrained(output)
    processor = BlipProcessor(image_processor=BlipImageProcessorPil(size={"height": 32, "width": 32}),
                              tokenizer=tokenizer)
    processor.save_pretrained(output)
    return output


def build_swin2sr(output_dir: str | Path, seed: int = 0, upscale: int = 2) -> Path:
    """A tiny Swin2SRForImageSuperResolution (x`upscale`) with its image processor."""
    from transformers import Swin2SRConfig, Swin2SRForImageSuperResolution
    from transformers.models.swin2sr.image_processing_pil_swin2sr import Swin2SRImageProcessorPil

    output = Path(output_dir)
    config = Swin2SRConfig(image_size=16, patch_size=1, embed_dim=16, depths=[1], num_heads=[2], window_size=4,
                           upscale=upscale, upsampler="pixelshuffle", num_channels=3)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Swin2SRForImageSuperResolution(config)
    model.save_pretrained(output)
    Swin2SRImageProcessorPil().save_pretrained(output)
    return output


def build_clipseg(output_dir: str | Path, seed: int = 0) -> Path:
    """A tiny CLIPSegForImageSegmentation with a CLIPSegProcessor (the suite's CLIP tokenizer)."""
    from transformers import CLIPSegConfig, CLIPSegForImageSegmentation, CLIPSegProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    output = Path(output_dir)
    tokenizer = _clip_tokenizer(output)
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  image_size=32, patch_size=8)
    config = CLIPSegConfig(text_config=text, vision_config=vision, projection_dim=32, extract_layers=[1, 2],
                           reduce_dim=16, decoder_num_attention_heads=2, decoder_intermediate_size=32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPSegForImageSegmentation(config)
    model.save_pretrained(output)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPSegProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(output)
    return output


def _draw_image(rng: random.Random, size: tuple[int, int], colours: Sequence[str] = tuple(_COLOURS),
                shapes: Sequence[str] = _SHAPES, subject: tuple[str, str, str] | None = None
                ) -> tuple[Image.Image, str]:
    """One shape on a two-tone gradient, plus the caption that describes it. `subject` (shape,
    colour, background) fixes what is drawn; by default it is drawn at random from `rng`."""
    width, height = size
    if subject is None:
        shape = rng.choice(shapes)
        colour, background = rng.sample(sorted(colours), 2)
    else:
        shape, colour, background = subject
    start = np.array(_COLOURS[background], dtype=np.float32)
    # Fade 40% towards white for dark colours and towards black for light ones, so even grey
    # gets a visible gradient while the colour named in the caption stays dominant.
    end = start * 0.6 + (0.4 * 255.0 if start.mean() < 128 else 0.0)
    if rng.random() < 0.5:
        ramp = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None].repeat(width, axis=1)
    else:
        ramp = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :].repeat(height, axis=0)
    pixels = start + (end - start) * ramp[..., None]
    image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))

    radius = rng.uniform(0.25, 0.38) * min(width, height)
    cx = rng.uniform(radius, width - radius)
    cy = rng.uniform(radius, height - radius)
    _draw_shape(ImageDraw.Draw(image), shape, (cx, cy), radius, _COLOURS[colour])
    return image, f"{_with_article(colour)} {shape} on {_with_article(background)} background"


def _with_article(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def _draw_shape(
    draw: ImageDraw.ImageDraw,
    shape: str,
    centre: tuple[float, float],
    r: float,
    fill: tuple[int, int, int],
) -> None:
    cx, cy = centre
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "ring":
        draw.ellipse(box, outline=fill, width=max(3, round(r / 3)))
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    elif shape == "cross":
        arm = r / 3
        draw.rectangle((cx - r, cy - arm, cx + r, cy + arm), fill=fill)
        draw.rectangle((cx - arm, cy - r, cx + arm, cy + r), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def make_images(
    output_dir: str | Path, num_images: int = 8, layout: str = "metadata", seed: int = 0,
    colours: Sequence[str] | None = None, shapes: Sequence[str] | None = None, size: int | None = None,
    sizes: Sequence[tuple[int, int]] | None = None, balanced: bool = False, uncaptioned: int = 0,
) -> Path:
    """Write `num_images` small captioned images and return the folder.

    layout="metadata": images plus metadata.jsonl ({"file_name", "text"}), the Hugging Face
    imagefolder format; "captions": each image with a same-stem .txt caption; "images":
    images only, as in a DreamBooth instance folder. `colours`, `shapes` (default: all) and a
    square `size` (default: mixed sizes) make an easier set, as the demo uses.
    `sizes`, (width, height) pairs used in turn, replaces the default mix of sizes, e.g.
    ((40, 24), (24, 40), (32, 32)) for aspect buckets.
    `balanced=True` draws every (shape, colour, background) combination equally often (in a
    shuffled order; as evenly as `num_images` allows) instead of at random, so that no caption a
    demo asks for is missing or rare in the set.
    `uncaptioned` more images (drawn the same way) get the empty caption "": the examples of the
    unconditional prediction that classifier-free guidance subtracts (what --proportion_empty_prompts
    draws at random in the SDXL script, which the SD 1.x script, like diffusers', lacks).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    colours, shapes = tuple(colours or _COLOURS), tuple(shapes or _SHAPES)
    unknown = sorted({*colours} - {*_COLOURS}) + sorted({*shapes} - {*_SHAPES})
    if unknown or len(colours) < 2:
        raise ValueError(f"need two or more of the colours {list(_COLOURS)} and any of the shapes "
                         f"{list(_SHAPES)}; unknown: {unknown}")
    if num_images < 1:
        raise ValueError("num_images must be at least 1")
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    # Rotating the size list (instead of sampling it) guarantees varied sizes in small sets.
    offset = rng.randrange(len(_IMAGE_SIZES))
    total = num_images + uncaptioned
    chosen = [_IMAGE_SIZES[(offset + i) % len(_IMAGE_SIZES)] if sizes is None else tuple(sizes[i % len(sizes)])
              for i in range(total)]
    subjects = _balanced_subjects(total, colours, shapes, seed) if balanced else [None] * total
    records = []
    for i in range(total):
        dims = (size, size) if size else chosen[i]
        image, caption = _draw_image(rng, dims, colours, shapes, subjects[i])
        # Alternate formats so loaders are exercised on both (JPEG also drops any alpha).
        if i % 2 == 0:
            name = f"image_{i:03d}.png"
            image.save(output / name, format="PNG")
        else:
            name = f"image_{i:03d}.jpg"
            image.save(output / name, format="JPEG", quality=90)
        caption = caption if i < num_images else ""
        records.append({"file_name": name, "text": caption})
        if layout == "captions":
            (output / name).with_suffix(".txt").write_text(caption + "\n", encoding="utf-8")
    if layout == "metadata":
        lines = "".join(json.dumps(record) + "\n" for record in records)
        (output / "metadata.jsonl").write_text(lines, encoding="utf-8")
    return output


def _balanced_subjects(count: int, colours: Sequence[str], shapes: Sequence[str],
                       seed: int) -> list[tuple[str, str, str]]:
    """`count` (shape, colour, background) triples: every combination once per round, each round
    shuffled. A generator of its own leaves the drawing's random stream as in unbalanced sets."""
    combinations = [(shape, colour, background) for shape in shapes for colour in colours
                    for background in colours if colour != background]
    rng = random.Random(f"balanced-{seed}")
    subjects: list[tuple[str, str, str]] = []
    while len(subjects) < count:
        subjects += rng.sample(combinations, len(combinations))
    return subjects[:count]


_BUILDERS = {"sd": build_sd, "sdxl": build_sdxl, "sd3": build_sd3}
_HELPERS = {"blip": build_blip, "swin2sr": build_swin2sr, "clipseg": build_clipseg}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sdft.tiny",
        description="Write tiny random Stable Diffusion model folders or a tiny image set.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    model = commands.add_parser("model", help="write a tiny diffusers pipeline folder")
    model.add_argument("--family", choices=FAMILIES, required=True)
    model.add_argument("--output", type=Path, required=True)
    model.add_argument("--seed", type=int, default=0)
    model.add_argument("--max-length", type=int, default=77,
                       help="tokens a prompt is padded to (default 77, as in Stable Diffusion; --family sd only)")
    model.add_argument("--vae-colours", type=_names, default=None,
                       help="fit the VAE on images of these colours only (default: all; --family sd only)")
    model.add_argument("--vae-shapes", type=_names, default=None,
                       help="fit the VAE on images of these shapes only (default: all; --family sd only)")
    model.add_argument("--random-vae", action="store_true",
                       help="keep the VAE's random weights (faster; decoded images are noise). By default "
                            f"the VAE is fitted to shape images for {VAE_FIT_STEPS} steps first.")
    helper = commands.add_parser("helper", help="write a tiny BLIP, Swin2SR or CLIPSeg model folder")
    helper.add_argument("--kind", choices=sorted(_HELPERS), required=True)
    helper.add_argument("--output", type=Path, required=True)
    helper.add_argument("--seed", type=int, default=0)
    data = commands.add_parser("data", help="write a tiny captioned image folder")
    data.add_argument("--output", type=Path, required=True)
    data.add_argument("--num-images", type=int, default=8)
    data.add_argument("--layout", choices=LAYOUTS, default="metadata")
    data.add_argument("--seed", type=int, default=0)
    data.add_argument("--colours", type=_names, default=None,
                      help=f"comma-separated colours to draw from (default: all of {','.join(_COLOURS)})")
    data.add_argument("--shapes", type=_names, default=None,
                      help=f"comma-separated shapes to draw from (default: all of {','.join(_SHAPES)})")
    data.add_argument("--size", type=int, default=None, help="square images of this many pixels "
                                                               "(default: mixed sizes and aspect ratios)")
    data.add_argument("--uncaptioned", type=int, default=0,
                      help="this many more images with the empty caption, for classifier-free guidance")
    data.add_argument("--balanced", action="store_true",
                      help="draw every (shape, colour, background) combination equally often "
                           "(default: each image's at random)")
    return parser


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "model" and args.family != "sd" and (args.max_length != 77 or args.vae_colours
                                                            or args.vae_shapes):
        parser.error("--max-length, --vae-colours and --vae-shapes are only for --family sd")
    if args.command == "model":
        options = dict(max_length=args.max_length, vae_colours=args.vae_colours,
                       vae_shapes=args.vae_shapes) if args.family == "sd" else {}
        folder = _BUILDERS[args.family](args.output, seed=args.seed, fit_vae=not args.random_vae, **options)
    elif args.command == "helper":
        folder = _HELPERS[args.kind](args.output, seed=args.seed)
    else:
        folder = make_images(args.output, args.num_images, args.layout, args.seed, args.colours, args.shapes,
                             args.size, balanced=args.balanced, uncaptioned=args.uncaptioned)
    print(folder)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
