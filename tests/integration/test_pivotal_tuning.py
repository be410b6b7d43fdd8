"""Pivotal tuning (UNet LoRA + new tokens) and textual inversion in the SDXL and SD 1.x scripts, and
their DreamBooth data with prior preservation, on tiny models. Single-process runs call the real
entry point in-process; the two-process runs use `accelerate launch`."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import train_text_to_image as t2i
import train_text_to_image_sdxl as sdxl
from sdft.cli import run
from sdft.tiny import make_images
from tests.integration.conftest import accelerate_launch, generate

pytestmark = pytest.mark.integration
TOKENS = ["<s0>", "<s1>"]


@pytest.fixture(scope="module")
def instance_dir(tmp_path_factory) -> Path:
    return make_images(tmp_path_factory.mktemp("data") / "dog", num_images=3, layout="images")


def db_args(model: Path, data: Path, output: Path, *extra) -> list[str]:
    return ["--pretrained_model_name_or_path", model, "--instance_data_dir", data, "--output_dir", output,
            "--instance_prompt", "a photo of TOK dog", "--resolution", "32", "--train_batch_size", "2",
            "--learning_rate", "1e-2", "--lr_warmup_steps", "0", "--seed", "0", "--report_to", "none", *extra]


def run_in_process(script, argv: list) -> tuple[int, str]:
    from accelerate.state import AcceleratorState, GradientState

    try:
        return run(script.main, script.parse_args([str(a) for a in argv])), ""
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def rows(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "token_embeddings.safetensors")


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sdxl_pivotal_lora_phases_resume_and_diffusers_loading(tiny_sdxl, instance_dir, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    common = ["--use_lora", "--rank", "4", "--train_text_encoder_ti", "--train_text_encoder_ti_frac", "0.67",
              "--max_train_steps", "3", "--checkpointing_steps", "1"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run_in_process(sdxl, db_args(tiny_sdxl, instance_dir, straight, *common))[0] == 0
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-1", resumed / "checkpoint-1")
    # The resumed run also makes the final validation image, through load_lora_weights + load_textual_inversion.
    assert run_in_process(sdxl, db_args(tiny_sdxl, instance_dir, resumed, *common, "--resume_from_checkpoint",
                                        "latest", "--validation_prompt", "a photo of TOK dog",
                                        "--num_validation_images", "1", "--validation_epochs", "100"))[0] == 0

    # The new rows train for the first 2 of the 3 steps (floor(0.67 * 3)), then stop; the LoRA goes on.
    by_step = {step: rows(straight / f"checkpoint-{step}") for step in range(1, 4)}
    assert not same(by_step[1], by_step[2])
    assert same(by_step[2], by_step[3])
    lora = {step: load_file(straight / f"checkpoint-{step}" / "pytorch_lora_weights.safetensors") for step in (2, 3)}
    assert not same(lora[2], lora[3])
    emb = load_file(straight / "straight_emb.safetensors")
    assert same(emb, by_step[3]) and {k: v.shape[0] for k, v in emb.items()} == {"clip_l": 2, "clip_g": 2}

    # Split by a resume inside the embedding phase == uninterrupted.
    assert same(emb, load_file(resumed / "resumed_emb.safetensors"))
    assert same(load_file(straight / "pytorch_lora_weights.safetensors"),
                load_file(resumed / "pytorch_lora_weights.safetensors"))
    assert (resumed / "validation" / "final" / "00.png").is_file()
    card = (straight / "README.md").read_text()
    assert 'state_dict["clip_g"], token=["<s0>", "<s1>"], text_encoder=pipe.text_encoder_2' in card
    assert "a photo of <s0><s1> dog" in card

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    with_tokens, without = "a photo of <s0><s1> dog", "a photo of a red circle"
    base_image = generate(pipe, with_tokens)
    pipe.load_lora_weights(straight)
    lora_only = generate(pipe, without)
    pipe.load_textual_inversion(emb["clip_l"], token=TOKENS, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(emb["clip_g"], token=TOKENS, text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    assert not np.allclose(generate(pipe, with_tokens), base_image)
    np.testing.assert_array_equal(generate(pipe, without), lora_only)


def test_sd1_textual_inversion_alone_exports_a_pipeline_that_knows_the_tokens(tiny_sd, instance_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "ti"
    assert run_in_process(t2i, db_args(tiny_sd, instance_dir, out, "--train_text_encoder_ti", "--train_unet", "false",
                                       "--max_train_steps", "2", "--checkpointing_steps", "2"))[0] == 0
    pipe = StableDiffusionPipeline.from_pretrained(out)
    assert pipe.tokenizer.tokenize("a photo of <s0><s1> dog")[3:5] == TOKENS
    base = StableDiffusionPipeline.from_pretrained(tiny_sd)
    table, base_table = pipe.text_encoder.get_input_embeddings().weight, base.text_encoder.get_input_embeddings().weight
    assert torch.equal(table[: len(base_table)], base_table), "a base embedding row changed"
    new_ids = pipe.tokenizer.convert_tokens_to_ids(TOKENS)
    assert torch.equal(table[new_ids], load_file(out / "ti_emb.safetensors")["clip_l"])
    assert same(pipe.unet.state_dict(), base.unet.state_dict()), "--train_unet false must leave the UNet alone"
    assert not (out / "pytorch_lora_weights.safetensors").exists()
    assert "part of this pipeline's tokenizers" in (out / "README.md").read_text()


def test_abstraction_in_no_caption_stops_before_the_model_loads(tiny_sd, image_folder, tmp_path, capsys):
    out = tmp_path / "out"
    code, _ = run_in_process(t2i, ["--pretrained_model_name_or_path", tiny_sd, "--train_data_dir", image_folder,
                                   "--output_dir", out, "--resolution", "32", "--train_text_encoder_ti",
                                   "--report_to", "none", "--max_train_steps", "1"])
    assert code == 1 and "--token_abstraction TOK appears in no caption" in capsys.readouterr().err
    assert not out.exists(), "nothing may be written"


def test_a_base_model_that_already_has_the_tokens_is_refused(tiny_sd, instance_dir, tmp_path, capsys):
    from transformers import CLIPTokenizer

    model = tmp_path / "learned-before"
    shutil.copytree(tiny_sd, model)
    tokenizer = CLIPTokenizer.from_pretrained(model / "tokenizer")
    tokenizer.add_tokens(["<s0>"])
    tokenizer.save_pretrained(model / "tokenizer")
    code, _ = run_in_process(t2i, db_args(model, instance_dir, tmp_path / "out", "--train_text_encoder_ti",
                                          "--max_train_steps", "1"))
    err = capsys.readouterr().err
    assert code == 1 and "<s0>" in err and "already exist" in err


def two_process_prior_run(script: str, model: Path, data: Path, tmp_path: Path, *extra) -> tuple[Path, Path, str]:
    out, class_dir = tmp_path / "ddp", tmp_path / "dogs"
    result = accelerate_launch(script, db_args(
        model, data, out, "--max_train_steps", "2", "--with_prior_preservation",
        "--class_data_dir", class_dir, "--class_prompt", "a photo of dog", "--num_class_images", "2",
        "--sample_batch_size", "1", "--train_text_encoder_ti", *extra), num_processes=2)
    names = sorted(p.name.split("-")[0] for p in class_dir.glob("*.jpg"))
    assert names == ["0", "1"], "each class image must be generated exactly once across processes"
    return out, class_dir, result.stderr + result.stdout


def test_sd1_dreambooth_prior_preservation_full_finetune_with_tokens_on_two_processes(tiny_sd, instance_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    out, _, log = two_process_prior_run("train_text_to_image.py", tiny_sd, instance_dir, tmp_path,
                                        "--checkpointing_steps", "10")
    assert "identical on all 2 processes" in log
    pipe = StableDiffusionPipeline.from_pretrained(out)
    base = StableDiffusionPipeline.from_pretrained(tiny_sd)
    table, base_table = pipe.text_encoder.get_input_embeddings().weight, base.text_encoder.get_input_embeddings().weight
    assert torch.equal(table[: len(base_table)], base_table)
    assert not same(pipe.unet.state_dict(), base.unet.state_dict()), "the UNet was not fine-tuned"
    image = generate(pipe, "a photo of <s0><s1> dog")
    assert image.shape == (32, 32, 3) and np.isfinite(image).all()


def test_sdxl_dreambooth_prior_preservation_pivotal_lora_on_two_processes(tiny_sdxl, instance_dir, tmp_path):
    out, _, log = two_process_prior_run("train_text_to_image_sdxl.py", tiny_sdxl, instance_dir, tmp_path,
                                        "--use_lora", "--rank", "4", "--checkpointing_steps", "2")
    assert "identical on all 2 processes" in log
    assert set(load_file(out / "ddp_emb.safetensors")) == {"clip_l", "clip_g"}
    assert set(rows(out / "checkpoint-2")) == {"clip_l", "clip_g"}
    assert (out / "pytorch_lora_weights.safetensors").is_file()


def test_resumed_with_more_steps_the_embedding_phase_follows_the_new_flags(tiny_sdxl, instance_dir, tmp_path):
    """issue 16: 3 steps resumed to 6 with --train_text_encoder_ti_frac 1.0 kept stopping the new tokens
    at step 3 (the first run's plan) and ended 3e-3 away from 6 steps run straight."""
    common = ["--use_lora", "--rank", "4", "--train_text_encoder_ti", "--train_text_encoder_ti_frac", "1.0",
              "--checkpointing_steps", "3"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run_in_process(sdxl, db_args(tiny_sdxl, instance_dir, straight, *common, "--max_train_steps", "6"))[0] == 0
    assert run_in_process(sdxl, db_args(tiny_sdxl, instance_dir, resumed, *common, "--max_train_steps", "3"))[0] == 0
    assert run_in_process(sdxl, db_args(tiny_sdxl, instance_dir, resumed, *common, "--max_train_steps", "6",
                                        "--resume_from_checkpoint", "latest"))[0] == 0
    assert same(load_file(straight / "straight_emb.safetensors"), load_file(resumed / "resumed_emb.safetensors"))
