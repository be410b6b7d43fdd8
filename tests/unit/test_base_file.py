"""Single-file bases (issue 16): the family by key names, the conversion cache under a race, and a
single-file VAE for SDXL."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import save_file

from sdft import file_digest
from sdft.errors import CliError
from sdft.families import base_file
from sdft.families.sd import StableDiffusion
from sdft.families.sdxl import StableDiffusionXL
from sdft.families.source import ModelSource
from sdft.single_file import save_single_file, vae_to_original
from sdft.tiny import build_sd


@pytest.mark.parametrize("keys, kind", [
    ({"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"}, "sd3"),
    ({"model.diffusion_model.input_blocks.0.0.weight", "conditioner.embedders.1.model.ln_final.weight"}, "sdxl"),
    ({"model.diffusion_model.label_emb.0.0.weight", "model.diffusion_model.input_blocks.0.0.weight"}, "sdxl"),
    ({"model.diffusion_model.input_blocks.0.0.weight", "conditioner.embedders.0.model.ln_final.weight"},
     "sdxl_refiner"),
    ({"model.diffusion_model.input_blocks.0.0.weight", "cond_stage_model.model.ln_final.weight"}, "sd_v2"),
    ({"model.diffusion_model.input_blocks.0.0.weight", "cond_stage_model.transformer.text_model.x"}, "sd_v1"),
    ({"double_blocks.0.img_attn.qkv.weight"}, None),   # Flux: not ours
])
def test_family_by_key_names(keys, kind):
    assert base_file.kind_of(keys) == kind


def test_unknown_and_refiner_files_are_refused(tmp_path):
    path = tmp_path / "flux.safetensors"
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(1)}, str(path))
    with pytest.raises(CliError, match="is not a base model these scripts train"):
        base_file.inspect(str(path), "sdxl")


def test_two_processes_converting_at_once_leave_one_complete_folder(tmp_path, monkeypatch, caplog):
    base = build_sd(tmp_path / "base")
    family = StableDiffusion()
    path = tmp_path / "merged.safetensors"
    save_single_file("sd_v1", family.components(family.load(ModelSource(str(base)))), path, torch.float32)
    inspected = base_file.inspect(str(path), "sd")
    real_rename = os.rename

    def racing_rename(source, target):
        shutil.copytree(source, target)   # the other process's identical conversion lands first
        real_rename(source, target)       # so ours finds a non-empty folder there and fails

    monkeypatch.setattr(os, "rename", racing_rename)
    folder = base_file.converted_folder(inspected, StableDiffusionPipeline, str(base), tmp_path / "cache", True)
    # no staging folder left; the hash index beside the folder
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted([folder.name, file_digest.INDEX_NAME])
    pipe = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None)
    expected = family.load(ModelSource(str(base))).unet.state_dict()
    assert all(torch.equal(pipe.unet.state_dict()[k], v) for k, v in expected.items())


def test_sdxl_vae_from_one_file(tiny_sdxl, tmp_path):
    family = StableDiffusionXL()
    vae = family.load(ModelSource(str(tiny_sdxl))).vae
    path = tmp_path / "sdxl_vae.safetensors"   # the layout of the VAE files users download
    save_file({k: v.contiguous() for k, v in vae_to_original(vae.state_dict(), vae.config).items()}, str(path))
    base_file.check_vae_file(str(path))
    loaded = StableDiffusionXL(vae_path=str(path)).load_vae(ModelSource(str(tiny_sdxl)))
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in vae.state_dict().items())
    bad = tmp_path / "not_a_vae.safetensors"
    save_file({"model.diffusion_model.x": torch.zeros(1)}, str(bad))
    with pytest.raises(CliError, match="holds no VAE weights"):
        base_file.check_vae_file(str(bad))


def test_a_file_is_hashed_once_until_its_size_or_mtime_changes(tmp_path, monkeypatch):
    hashed = []
    real = file_digest.sha256_of
    monkeypatch.setattr(file_digest, "sha256_of", lambda path: hashed.append(path) or real(path))
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"a" * 1000)
    index = tmp_path / "cache"
    first = file_digest.remembered_sha256(weights, index)
    assert first == hashlib.sha256(b"a" * 1000).hexdigest() and len(hashed) == 1
    assert file_digest.remembered_sha256(tmp_path / "." / "model.safetensors", index) == first   # same file
    assert len(hashed) == 1
    stat = weights.stat()
    weights.write_bytes(b"b" * 1000)   # same size, new content; a touched mtime is what tells
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    assert file_digest.remembered_sha256(weights, index) == hashlib.sha256(b"b" * 1000).hexdigest()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    weights.write_bytes(b"b" * 999)    # size changed
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    assert file_digest.remembered_sha256(weights, index) == hashlib.sha256(b"b" * 999).hexdigest()
    assert len(hashed) == 3


def test_a_damaged_hash_index_counts_as_empty(tmp_path):
    weights = tmp_path / "model.ckpt"
    weights.write_bytes(b"weights")
    (tmp_path / file_digest.INDEX_NAME).write_text("{not json")
    assert file_digest.remembered_sha256(weights, tmp_path) == hashlib.sha256(b"weights").hexdigest()
    assert str(weights.resolve()) in json.loads((tmp_path / file_digest.INDEX_NAME).read_text())
