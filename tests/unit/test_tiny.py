"""Tests for sdft.tiny: the tiny model folders load and generate, the image sets load."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    PNDMScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from PIL import Image
from safetensors.torch import load_file
from transformers import (
    AutoTokenizer,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5EncoderModel,
    T5TokenizerFast,
)

from sdft import tiny

REPO_ROOT = Path(__file__).resolve().parents[2]
PROMPT = "a photo of a dog"
PIPELINES = {
    "sd": StableDiffusionPipeline,
    "sdxl": StableDiffusionXLPipeline,
    "sd3": StableDiffusion3Pipeline,
}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-models")
    return {
        "sd": tiny.build_sd(root / "sd"),
        "sdxl": tiny.build_sdxl(root / "sdxl"),
        "sd3": tiny.build_sd3(root / "sd3"),
    }


def file_digests(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def assert_clip_tokenizer_round_trips(tokenizer: CLIPTokenizer) -> None:
    assert tokenizer.model_max_length == 77
    ids = tokenizer(PROMPT, padding="max_length", max_length=77, truncation=True).input_ids
    assert len(ids) == 77
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.eos_token_id in ids
    # The built-in merges make common words whole tokens: bos + 5 words + eos.
    assert len(tokenizer(PROMPT).input_ids) == 7
    assert tokenizer.decode(ids, skip_special_tokens=True).strip().lower() == PROMPT


# --- models: what a user sees ---------------------------------------------------------


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3"])
def test_pipeline_loads_and_generates(model_dirs: dict[str, Path], family: str) -> None:
    pipeline = PIPELINES[family].from_pretrained(model_dirs[family])
    pipeline.set_progress_bar_config(disable=True)
    result = pipeline(
        "a red circle on a blue background",
        height=32,
        width=32,
        num_inference_steps=2,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    )
    assert result.images.shape == (1, 32, 32, 3)
    assert np.isfinite(result.images).all()


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3"])
def test_model_folder_layout(model_dirs: dict[str, Path], family: str) -> None:
    expected = {
        "sd": {"unet", "vae", "text_encoder", "tokenizer", "scheduler"},
        "sdxl": {"unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2",
                 "scheduler"},
        "sd3": {"transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3",
                "tokenizer", "tokenizer_2", "tokenizer_3", "scheduler"},
    }[family]
    folder = model_dirs[family]
    index = json.loads((folder / "model_index.json").read_text())
    assert expected <= {name for name, value in index.items() if value != [None, None]}
    assert {p.name for p in folder.iterdir() if p.is_dir()} == expected


def test_sd_components_load_by_subfolder(model_dirs: dict[str, Path]) -> None:
    folder = model_dirs["sd"]
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
    text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")
    tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
    scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")

    assert isinstance(PNDMScheduler.from_pretrained(folder, subfolder="scheduler"), PNDMScheduler)
    assert scheduler.config.num_train_timesteps == 1000
    assert scheduler.config.beta_schedule == "scaled_linear"
    assert scheduler.config.prediction_type == "epsilon"
    assert unet.config.cross_attention_dim == text_encoder.config.hidden_size == 32
    assert 2 ** (len(vae.config.block_out_channels) - 1) == 2
    assert vae.config.scaling_factor == pytest.approx(0.18215)
    assert text_encoder.config.vocab_size == len(tokenizer)
    assert text_encoder.config.eos_token_id == tokenizer.eos_token_id
    assert_clip_tokenizer_round_trips(tokenizer)

    # One training-style forward pass: image -> latents -> noise prediction.
    latents = vae.encode(torch.zeros(1, 3, 32, 32)).latent_dist.sample()
    assert latents.shape == (1, 4, 16, 16)
    ids = tokenizer(PROMPT, padding="max_length", max_length=77, return_tensors="pt").input_ids
    states = text_encoder(ids).last_hidden_state
    noise_pred = unet(latents, torch.tensor([10]), encoder_hidden_states=states).sample
    assert noise_pred.shape == latents.shape


def test_sdxl_components_load_by_subfolder(model_dirs: dict[str, Path]) -> None:
    folder = model_dirs["sdxl"]
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")
    text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(folder, subfolder="text_encoder_2")
    tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
    tokenizer_2 = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer_2")
    AutoencoderKL.from_pretrained(folder, subfolder="vae")
    euler = EulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler")
    ddpm = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")

    assert euler.config.timestep_spacing == "leading"
    assert ddpm.config.beta_schedule == "scaled_linear"
    # Different widths, so mixing the encoders up fails on shapes.
    assert text_encoder.config.hidden_size != text_encoder_2.config.hidden_size
    hidden_sum = text_encoder.config.hidden_size + text_encoder_2.config.hidden_size
    assert unet.config.cross_attention_dim == hidden_sum
    assert unet.config.addition_embed_type == "text_time"
    assert unet.config.projection_class_embeddings_input_dim == (
        6 * unet.config.addition_time_embed_dim + text_encoder_2.config.projection_dim
    )
    assert text_encoder_2.config.vocab_size == len(tokenizer_2)
    assert tokenizer_2.pad_token == "!"  # as in the real SDXL tokenizer_2
    assert_clip_tokenizer_round_trips(tokenizer)
    assert_clip_tokenizer_round_trips(tokenizer_2)


def test_sd3_components_load_by_subfolder(model_dirs: dict[str, Path]) -> None:
    folder = model_dirs["sd3"]
    transformer = SD3Transformer2DModel.from_pretrained(folder, subfolder="transformer")
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
    encoders = [
        CLIPTextModelWithProjection.from_pretrained(folder, subfolder="text_encoder"),
        CLIPTextModelWithProjection.from_pretrained(folder, subfolder="text_encoder_2"),
    ]
    t5 = T5EncoderModel.from_pretrained(folder, subfolder="text_encoder_3")
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler")
    t5_tokenizer = T5TokenizerFast.from_pretrained(folder, subfolder="tokenizer_3")

    assert scheduler.config.shift == 3.0
    assert vae.config.latent_channels == transformer.config.in_channels == 16
    assert vae.config.shift_factor == pytest.approx(0.0609)
    assert vae.config.scaling_factor == pytest.approx(1.5035)
    assert encoders[0].config.hidden_size != encoders[1].config.hidden_size
    pooled_dim = sum(e.config.projection_dim for e in encoders)
    assert transformer.config.pooled_projection_dim == pooled_dim
    assert transformer.config.joint_attention_dim == t5.config.d_model
    assert t5.config.d_model >= sum(e.config.hidden_size for e in encoders)
    assert t5.config.vocab_size == len(t5_tokenizer)
    for name in ("tokenizer", "tokenizer_2"):
        assert_clip_tokenizer_round_trips(CLIPTokenizer.from_pretrained(folder, subfolder=name))


def test_t5_tokenizer_round_trips(model_dirs: dict[str, Path]) -> None:
    folder = model_dirs["sd3"] / "tokenizer_3"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert isinstance(tokenizer, T5TokenizerFast)
    specials = (tokenizer.pad_token, tokenizer.eos_token, tokenizer.unk_token)
    assert specials == ("<pad>", "</s>", "<unk>")
    ids = tokenizer(PROMPT, padding="max_length", max_length=32, truncation=True).input_ids
    assert len(ids) == 32
    assert ids[5] == tokenizer.eos_token_id  # five whole-word tokens, then </s>
    assert ids[-1] == tokenizer.pad_token_id
    assert tokenizer.unk_token_id not in tokenizer("Hello, World 42!").input_ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == PROMPT


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3"])
def test_same_seed_same_files(
    tmp_path: Path, model_dirs: dict[str, Path], family: str
) -> None:
    builder = {"sd": tiny.build_sd, "sdxl": tiny.build_sdxl, "sd3": tiny.build_sd3}[family]
    assert file_digests(builder(tmp_path / "again")) == file_digests(model_dirs[family])


def test_seed_changes_weights(tmp_path: Path, model_dirs: dict[str, Path]) -> None:
    weights = Path("unet") / "diffusion_pytorch_model.safetensors"
    first = load_file(model_dirs["sd"] / weights)
    other = load_file(tiny.build_sd(tmp_path / "other", seed=1) / weights)
    assert first.keys() == other.keys()
    assert not all(torch.equal(first[k], other[k]) for k in first)


def vae_error(folder: Path, images: torch.Tensor) -> float:
    from sdft.tiny_vae import reconstruction_error

    return reconstruction_error(AutoencoderKL.from_pretrained(folder, subfolder="vae"), images)


def test_fitted_vae_reconstructs_shapes(
    tmp_path: Path, model_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Measured on 32 images the fit never saw (seed 123), mean absolute error in 0..255 units:
    # random VAE 61; a flat image of each picture's mean colour 41 (of its median colour 37), so an
    # error under 30 means more than the background comes back: the shape does. The fit here is
    # shortened to 200 steps to keep the suite fast (measured 26.6; the default 400 steps reach ~17),
    # on one thread, which is faster than two threads competing with the suite's other worker.
    monkeypatch.setattr(tiny, "VAE_FIT_STEPS", 200)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        folder = tiny.build_sd(tmp_path / "fitted", fit_vae=True)
    finally:
        torch.set_num_threads(threads)
    images = tiny.shape_images(seed=123, count=32)
    assert vae_error(model_dirs["sd"], images) > 50
    assert vae_error(folder, images) < 30
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
    with torch.no_grad():
        scaled = vae.encode(images).latent_dist.mean * vae.config.scaling_factor
    # The scaling factor comes from the fitted latents, so the denoiser sees about unit variance.
    assert 0.8 < float(scaled.pow(2).mean().sqrt()) < 1.25
    assert vae.config.scaling_factor != pytest.approx(0.18215)
    assert vae.config.shift_factor is None


def test_fitted_sd3_vae_gets_a_shift_and_unit_variance() -> None:
    from sdft.tiny_vae import fit_vae

    torch.manual_seed(0)
    vae = tiny._vae(latent_channels=16, scaling_factor=1.5035, sd3=True)
    images = tiny.shape_images(seed=0, count=16)
    fit = fit_vae(vae, images, seed=0, steps=3, batch_size=4, with_shift=True)
    with torch.no_grad():
        latents = vae.encode(images).latent_dist.mean
    scaled = (latents - vae.config.shift_factor) * vae.config.scaling_factor
    assert fit.shift_factor == vae.config.shift_factor != pytest.approx(0.0609)
    assert abs(float(scaled.mean())) < 1e-3 and float(scaled.std()) == pytest.approx(1.0, abs=1e-3)


def test_build_leaves_global_rng_alone(tmp_path: Path) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tiny.build_sd(tmp_path / "sd", seed=7)
    assert torch.equal(torch.rand(3), expected)


# --- images ---------------------------------------------------------------------------


def test_metadata_layout_loads_with_imagefolder(tmp_path: Path) -> None:
    folder = tiny.make_images(tmp_path / "data", num_images=8)
    dataset = datasets.load_dataset(
        "imagefolder", data_dir=str(folder), split="train", cache_dir=str(tmp_path / "cache")
    )
    assert dataset.num_rows == 8
    assert {"image", "text"} <= set(dataset.column_names)
    sizes = {row["image"].size for row in dataset}
    assert len(sizes) > 1
    assert any(w != h for w, h in sizes)
    assert all(40 <= side <= 72 for size in sizes for side in size)
    assert all(" background" in text for text in dataset["text"])


def test_captions_layout_has_one_txt_per_image(tmp_path: Path) -> None:
    folder = tiny.make_images(tmp_path / "data", num_images=6, layout="captions")
    images = sorted(p for p in folder.iterdir() if p.suffix in {".png", ".jpg"})
    captions = sorted(folder.glob("*.txt"))
    assert len(images) == 6
    assert {p.suffix for p in images} == {".png", ".jpg"}
    assert [p.stem for p in captions] == [p.stem for p in images]
    assert not (folder / "metadata.jsonl").exists()
    for image_path, caption_path in zip(images, captions):
        caption = caption_path.read_text().strip()
        with Image.open(image_path) as image:
            assert image.mode == "RGB"
        colour = caption.split()[1]
        assert colour in tiny._COLOURS


def test_images_layout_has_images_only(tmp_path: Path) -> None:
    folder = tiny.make_images(tmp_path / "data", num_images=3, layout="images")
    assert sorted(p.suffix for p in folder.iterdir()) == [".jpg", ".png", ".png"]


def test_make_images_rejects_unknown_layout(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="layout"):
        tiny.make_images(tmp_path, layout="parquet")


def test_images_are_deterministic(tmp_path: Path) -> None:
    first = file_digests(tiny.make_images(tmp_path / "a", layout="metadata", seed=3))
    second = file_digests(tiny.make_images(tmp_path / "b", layout="metadata", seed=3))
    other = file_digests(tiny.make_images(tmp_path / "c", layout="metadata", seed=4))
    assert first == second
    assert first != other


# --- command line ---------------------------------------------------------------------


def test_cli_model_writes_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["model", "--family", "sd", "--output", str(tmp_path / "m"), "--seed", "2", "--random-vae"]
    assert tiny.main(argv) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "m")
    assert (tmp_path / "m" / "model_index.json").is_file()
    assert (tmp_path / "m" / "unet" / "config.json").is_file()


def test_cli_data_runs_as_module(tmp_path: Path) -> None:
    out = tmp_path / "captions"
    command = [sys.executable, "-m", "sdft.tiny", "data", "--output", str(out),
               "--num-images", "4", "--layout", "captions", "--seed", "1"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == str(out)
    assert len(list(out.glob("*.txt"))) == 4


def test_balanced_set_draws_every_combination_equally(tmp_path: Path) -> None:
    folder = tiny.make_images(tmp_path / "data", num_images=48, colours=["red", "blue", "green", "yellow"],
                              shapes=["circle", "square"], size=32, balanced=True)
    captions = [json.loads(line)["text"] for line in (folder / "metadata.jsonl").read_text().splitlines()]
    counts = {caption: captions.count(caption) for caption in captions}
    # 2 shapes x 4 colours x 3 other background colours, each twice.
    assert len(counts) == 24 and set(counts.values()) == {2}
    assert "a green square on a yellow background" in counts
    assert captions[:24] != sorted(captions[:24])   # shuffled, so an epoch's first batches are mixed


def test_uncaptioned_images_come_after_the_captioned_ones(tmp_path: Path) -> None:
    folder = tiny.make_images(tmp_path / "data", num_images=6, uncaptioned=3, colours=["red", "blue"],
                              shapes=["circle"], size=32, balanced=True)
    records = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    assert [r["text"] for r in records[6:]] == ["", "", ""]
    assert all(r["text"].endswith("background") for r in records[:6])
    assert all((folder / r["file_name"]).is_file() for r in records)


def test_sd_prompt_length_option_pads_prompts_to_it(tmp_path: Path) -> None:
    folder = tiny.build_sd(tmp_path / "sd16", max_length=16)
    pipeline = StableDiffusionPipeline.from_pretrained(folder)
    assert pipeline.tokenizer.model_max_length == 16
    embeddings = pipeline.encode_prompt("a green square on a yellow background", "cpu", 1, False)[0]
    assert embeddings.shape == (1, 16, 32)
