"""Subject flags: archives accepted where folders are, and flag combinations that cannot work
stop at parse time naming the flag."""

from __future__ import annotations

import zipfile

import pytest

import train_dreambooth_sd3 as sd3
import train_text_to_image_sdxl as sdxl
from tests.unit.test_cli_errors import base, data_dir, model_dir, parse_error, workdir  # noqa: F401  (fixtures)


def test_archives_are_accepted_as_data_folders(model_dir, workdir):
    archive = workdir / "photos.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        handle.writestr("a.png", b"")
    args = sdxl.parse_args([f"--pretrained_model_name_or_path={model_dir}", f"--train_data_dir={archive}"])
    assert args.train_data_dir == str(archive)
    args = sd3.parse_args([f"--pretrained_model_name_or_path={model_dir}", f"--instance_data_dir={archive}",
                           "--instance_prompt=sks", "--with_prior_preservation", f"--class_data_dir={archive}",
                           "--class_prompt=dog"])
    assert args.instance_data_dir == args.class_data_dir == str(archive)


def test_a_file_that_is_not_an_archive_is_named(model_dir, workdir, capsys):
    (workdir / "photos.rar").write_bytes(b"Rar!")
    err = parse_error([f"--pretrained_model_name_or_path={model_dir}", "--train_data_dir=photos.rar"], capsys, sdxl)
    assert "--train_data_dir 'photos.rar' is not a folder or an archive (.zip" in err


@pytest.mark.parametrize("extra, flag", [
    (["--masked_loss"], "--masked_loss needs masks"),
    (["--crop_to_mask"], "--crop_to_mask needs masks"),
    (["--alpha_mask"], "--alpha_mask has no effect without --masked_loss"),
    (["--masked_loss", "--mask_model=CIDAS/clipseg-rd64-refined"], "--mask_model needs --mask_target_prompts"),
    (["--masked_loss", "--alpha_mask", "--mask_target_prompts", "a face"], "--mask_target_prompts needs --mask_model"),
    (["--caption_prefix=a photo of TOK, "], "--caption_prefix is put in front of generated captions"),
    (["--masked_loss", "--mask_data_dir=nowhere"], "--mask_data_dir 'nowhere' is not a folder"),
    (["--caption_model=./no-such-blip"], "--caption_model './no-such-blip' does not exist"),
])
def test_subject_flag_errors_name_the_flag(base, capsys, extra, flag):
    assert flag in parse_error(base + extra, capsys, sdxl)


def test_full_subject_command_line_parses(base):
    args = sdxl.parse_args(base + ["--caption_model=Salesforce/blip-image-captioning-large",
                                   "--caption_prefix=a photo of TOK, ", "--upscale_model=caidas/swin2SR-classical-sr-x2-64",
                                   "--mask_model=CIDAS/clipseg-rd64-refined", "--mask_target_prompts", "a face",
                                   "--masked_loss", "--crop_to_mask"])
    assert args.mask_target_prompts == ["a face"] and args.caption_prefix == "a photo of TOK, "


def test_push_to_hub_leaves_the_photos_and_masks_out():
    from huggingface_hub.utils import filter_repo_objects

    from sdft.hub import UPLOAD_IGNORE

    candidates = [".sdft-cache/archives/photos-0123/me.jpg", ".sdft-cache/upscaled/ab/me.png", "masks/me.png",
                  "masks/sub/me.png", "captions.csv", "pytorch_lora_weights.safetensors"]
    assert list(filter_repo_objects(candidates, ignore_patterns=UPLOAD_IGNORE)) == [
        "captions.csv", "pytorch_lora_weights.safetensors"]
