"""Model card and Hub upload: the card is written offline, the upload never loses local files and
never sends resumable checkpoints."""

from __future__ import annotations

import fnmatch
import logging
import re
from pathlib import Path

import huggingface_hub
import pytest
import yaml
from huggingface_hub.utils import filter_repo_objects

from sdft import hub

BASE = "stable-diffusion-v1-5/stable-diffusion-v1-5"


def card_info(**overrides) -> hub.CardInfo:
    fields = dict(base_model=BASE, title="sd-naruto-model", license="creativeml-openrail-m",
                  tags=["stable-diffusion", "text-to-image", "diffusers"], lora=False,
                  pipeline_class="StableDiffusionPipeline", dataset="lambdalabs/naruto-blip-captions",
                  validation=[("validation/final/00.png", "a ninja cat"), ("validation/final/01.png", "a fox")],
                  training={"steps": 100, "learning rate": 1e-05})
    fields.update(overrides)
    return hub.CardInfo(**fields)


def split_card(path: Path) -> tuple[dict, str]:
    text = path.read_text(encoding="utf-8")
    match = re.match(r"^---\n(.*?)\n---\n(.*)$", text, flags=re.S)
    assert match, f"{path} does not start with YAML front matter:\n{text[:200]}"
    return yaml.safe_load(match.group(1)), match.group(2)


def usage_snippet(body: str) -> str:
    match = re.search(r"```python\n(.*?)```", body, flags=re.S)
    assert match, "the card has no python usage snippet"
    return match.group(1)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture()
def no_network(monkeypatch):
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError("writing the model card tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


# --------------------------------------------------------------------------- model card


def test_full_fine_tune_card(tmp_path, no_network):
    path = hub.write_model_card(tmp_path, card_info())
    assert path == tmp_path / "README.md"
    meta, body = split_card(path)
    assert meta["license"] == "creativeml-openrail-m"
    assert meta["base_model"] == BASE
    assert meta["library_name"] == "diffusers"
    assert meta["datasets"] == ["lambdalabs/naruto-blip-captions"]
    assert set(meta["tags"]) == {"stable-diffusion", "text-to-image", "diffusers"}
    snippet = usage_snippet(body)
    assert 'StableDiffusionPipeline.from_pretrained("<this repo or folder>"' in snippet
    assert "load_lora_weights" not in snippet
    assert "![a ninja cat](validation/final/00.png)" in body and "![a fox](validation/final/01.png)" in body
    assert "learning rate: 1e-05" in body
    # The card loads back with huggingface_hub, as the Hub will read it.
    assert huggingface_hub.ModelCard.load(path).data.base_model == BASE


def test_lora_card(tmp_path, no_network):
    path = hub.write_model_card(tmp_path, card_info(lora=True, validation=[]))
    meta, body = split_card(path)
    assert "lora" in meta["tags"] and "stable-diffusion" in meta["tags"]
    snippet = usage_snippet(body)
    assert f'StableDiffusionPipeline.from_pretrained("{BASE}"' in snippet
    assert 'pipe.load_lora_weights("<this repo or folder>")' in snippet
    assert "## Samples" not in body


def test_usage_snippet_is_valid_python(tmp_path, no_network):
    # Users copy this code; a prompt with quotes or a backslash must not break it.
    prompt = 'a "sks" dog, style of C:\\art'
    path = hub.write_model_card(tmp_path, card_info(lora=True, validation=[("validation/final/00.png", prompt)]))
    compile(usage_snippet(split_card(path)[1]), "<usage snippet of the model card>", "exec")


@pytest.mark.parametrize("clip_skip, expected", [(None, None), (1, None), (2, "clip_skip=1"), (3, "clip_skip=2")])
def test_card_snippet_translates_clip_skip_to_diffusers_numbering(tmp_path, no_network, clip_skip, expected):
    """kohya/A1111's clip skip N is diffusers' clip_skip=N-1; 1 (the last layer) is diffusers' default."""
    body = split_card(hub.write_model_card(tmp_path, card_info(clip_skip=clip_skip)))[1]
    snippet = usage_snippet(body)
    compile(snippet, "<usage snippet of the model card>", "exec")
    if expected is None:
        assert "clip_skip" not in snippet and "clip skip" not in body
    else:
        assert f'image = pipe("a ninja cat", {expected}).images[0]' in snippet
        assert f"Trained with clip skip {clip_skip}" in body and "CLIPSetLastLayer" in body


def test_card_notes_long_prompts(tmp_path, no_network):
    body = split_card(hub.write_model_card(tmp_path, card_info(max_token_length=225)))[1]
    assert "captions of up to 225 tokens, encoded in 75-token chunks" in body and "cut prompts at 77 tokens" in body
    assert "225" not in split_card(hub.write_model_card(tmp_path, card_info()))[1]


def test_card_metadata_names_only_hub_repos(tmp_path, no_network):
    # Local paths are not Hub ids: the Hub rejects a card whose `datasets` or `base_model` holds one
    # ('"datasets[0]" with value "/var/hf/images/" is not valid', huggingface/autotrain-advanced#648),
    # which makes the whole upload fail.
    local_model = tmp_path / "models" / "sd15"
    local_data = tmp_path / "data" / "naruto"
    local_model.mkdir(parents=True)
    local_data.mkdir(parents=True)
    out = tmp_path / "out"
    out.mkdir()
    meta, body = split_card(hub.write_model_card(out, card_info(base_model=str(local_model), dataset=str(local_data))))
    assert not meta.get("datasets"), f"a local dataset path ended up in the card metadata: {meta.get('datasets')}"
    assert meta.get("base_model") != str(local_model), "a local model path ended up as base_model"


# --------------------------------------------------------------------------- upload


def make_output(folder: Path) -> dict[str, bytes]:
    files = {
        "model_index.json": b"{}",
        "unet/config.json": b"{}",
        "README.md": b"# card",
        "validation/final/00.png": b"png",
        "checkpoint-2/unet/config.json": b"{}",
        "checkpoint-2/optimizer.bin": b"opt",
        ".checkpoint-4.partial/unet/config.json": b"{}",
    }
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return files


def test_failed_upload_keeps_files_and_logs_the_folder(tmp_path, monkeypatch, caplog):
    files = make_output(tmp_path)

    def fail(**kwargs):
        raise ConnectionError("network unreachable")

    monkeypatch.setattr(hub, "upload_folder", fail)
    with caplog.at_level(logging.ERROR, logger=hub.logger.name):
        assert hub.upload_output(tmp_path, "me/sd-naruto-model", token=None) is False
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors and str(tmp_path) in errors[0] and "me/sd-naruto-model" in errors[0]
    assert "network unreachable" in errors[0]
    assert {name: (tmp_path / name).read_bytes() for name in files} == files


def test_upload_leaves_checkpoints_out(tmp_path, monkeypatch):
    make_output(tmp_path)
    calls = []
    monkeypatch.setattr(hub, "upload_folder", lambda **kwargs: calls.append(kwargs))
    assert hub.upload_output(tmp_path, "me/sd-naruto-model", token="hf_x") is True
    assert len(calls) == 1
    call = calls[0]
    assert call["repo_id"] == "me/sd-naruto-model" and Path(call["folder_path"]) == tmp_path
    assert call["token"] == "hf_x"
    patterns = call["ignore_patterns"]
    candidates = ["checkpoint-2/unet/config.json", "checkpoint-2/optimizer.bin", ".checkpoint-4.partial/x",
                  ".checkpoint-4.old/unet/config.json", "checkpoint-10/random_states_0.pkl",
                  "unet/config.json", "README.md", "validation/final/00.png", "model_index.json",
                  "pytorch_lora_weights.safetensors"]
    kept = list(filter_repo_objects(candidates, allow_patterns=call.get("allow_patterns"), ignore_patterns=patterns))
    assert kept == ["unet/config.json", "README.md", "validation/final/00.png", "model_index.json",
                    "pytorch_lora_weights.safetensors"]
    # The same verdict with plain fnmatch, which is how the patterns read to a person.
    assert all(any(fnmatch.fnmatch(p, pat) for pat in patterns) == (p not in kept) for p in candidates)


def test_prepare_repo_offline_names_the_repo():
    with pytest.raises(hub.HubError) as exc:
        hub.prepare_repo("me/sd-naruto-model", token=None)
    assert "me/sd-naruto-model" in str(exc.value) and "--push_to_hub" in str(exc.value)


def test_card_says_which_file_to_copy_where(tmp_path, no_network):
    info = card_info(lora=True, ui_files={"pytorch_lora_weights_kohya.safetensors": "lora"})
    path = hub.write_model_card(tmp_path, info)
    body = split_card(path)[1]
    assert "## Use in ComfyUI / A1111 / Forge" in body
    assert "`pytorch_lora_weights_kohya.safetensors`: copy to ComfyUI's `models/loras/`" in body
    assert "## Use in ComfyUI" not in split_card(hub.write_model_card(tmp_path, card_info()))[1]
