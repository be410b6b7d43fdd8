"""Model card and Hugging Face Hub upload.

The card is written locally with no network access (the diffusers scripts first try to download an
existing card and fail offline). The upload leaves out `checkpoint-*` folders, which are for
resuming, not for users (diffusers PR #8225), and a failed upload never touches the local files.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData, create_repo, upload_folder

from sdft.errors import HubError

logger = logging.getLogger(__name__)

UPLOAD_IGNORE = ["checkpoint-*", "checkpoint-*/**", ".checkpoint-*", ".checkpoint-*/**", "*.partial/**"]
# The user's photos (extracted archives, upscaled copies) and masks made from them stay private.
UPLOAD_IGNORE += [".sdft-cache/**", "masks/**"]


@dataclass(frozen=True)
class EmbeddingsInfo:
    """Learned tokens (--train_text_encoder_ti) and how to load them."""

    file: str                                   # "<name>_emb.safetensors"
    tokens: list[str]                           # every new token, in the order of the file's rows
    triggers: dict[str, str]                    # "TOK" -> "<s0><s1>"
    encoders: list[tuple[str, str, str]]        # (file key, pipeline text encoder, pipeline tokenizer)
    in_pipeline: bool                           # full fine-tune: the tokens are saved in the pipeline too


@dataclass(frozen=True)
class CardInfo:
    base_model: str
    title: str
    license: str
    tags: list[str]
    lora: bool
    pipeline_class: str
    dataset: str | None = None
    instance_prompt: str | None = None
    validation: list[tuple[str, str]] = field(default_factory=list)   # (relative image path, prompt)
    training: dict = field(default_factory=dict)                        # a few headline settings
    embeddings: EmbeddingsInfo | None = None
    ui_files: dict[str, str] = field(default_factory=dict)              # file -> a UI_FOLDERS kind
    pictures: list[str] = field(default_factory=list)                   # loss.png, validation/grid.png
    run_summary: dict = field(default_factory=dict)                     # sdft.run_stats summary lines
    best_val_loss: tuple[float, int] | None = None                      # (val_loss, step) on held-out images
    clip_skip: int | None = None          # --clip_skip in kohya's / A1111's numbering (2 = the penultimate layer)
    max_token_length: int | None = None   # --max_token_length: captions encoded in 75-token chunks


def on_hub(model: str) -> bool:
    """A local folder is not a Hub id: the card must not link to it or name it as base_model."""
    return not Path(model).expanduser().exists()


def write_model_card(output_dir: Path, info: CardInfo) -> Path:
    data = ModelCardData(license=info.license, base_model=info.base_model if on_hub(info.base_model) else None,
                         library_name="diffusers",
                         tags=info.tags + (["lora"] if info.lora else []),
                         datasets=[info.dataset] if info.dataset and on_hub(info.dataset) else None,
                         instance_prompt=info.instance_prompt)
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n{card_body(info)}")
    path = output_dir / "README.md"
    card.save(path)
    return path


def card_body(info: CardInfo) -> str:
    kind = "LoRA adapter" if info.lora else "fine-tuned model"
    base = (f"[{info.base_model}](https://huggingface.co/{info.base_model})" if on_hub(info.base_model)
            else f"`{info.base_model}`")
    lines = [f"# {info.title}", "", f"A {kind} trained from {base}"
             + (f" on `{info.dataset}`." if info.dataset else "."), ""]
    if info.instance_prompt:
        lines += [f"Instance prompt: `{info.instance_prompt}`", ""]
    if info.validation:
        lines += ["## Samples", ""] + [f"![{prompt}]({path}) `{prompt}`" for path, prompt in info.validation] + [""]
    lines += ["## Use", "", "```python", "import torch", f"from diffusers import {info.pipeline_class}", ""]
    if info.lora:
        lines += [f'pipe = {info.pipeline_class}.from_pretrained({json.dumps(info.base_model)}, torch_dtype=torch.float16)',
                  'pipe.load_lora_weights("<this repo or folder>")']
    else:
        lines += [f'pipe = {info.pipeline_class}.from_pretrained("<this repo or folder>", torch_dtype=torch.float16)']
    if info.embeddings is not None and not info.embeddings.in_pipeline:
        lines += embedding_lines(info.embeddings)
    prompt = info.validation[0][1] if info.validation else (info.instance_prompt or "a photo")
    skip = f", clip_skip={info.clip_skip - 1}" if info.clip_skip and info.clip_skip > 1 else ""
    lines += ['pipe.to("cuda")', f"image = pipe({json.dumps(prompt)}{skip}).images[0]", "```", ""]
    lines += text_encoding_notes(info.clip_skip, info.max_token_length)
    if info.embeddings is not None:
        lines += embedding_notes(info.embeddings)
    lines += ui_section(info.ui_files)
    if info.training:
        lines += ["## Training", ""] + [f"- {k}: {v}" for k, v in info.training.items()] + [""]
    if info.pictures:
        lines += ["## Training pictures", ""] + [f"![{Path(p).stem}]({p})" for p in info.pictures] + [""]
    if info.run_summary:
        lines += ["## Run summary", ""] + [f"- {k}: {v}" for k, v in info.run_summary.items()] + [""]
    if info.best_val_loss is not None:
        value, step = info.best_val_loss
        lines += [f"Best validation loss on held-out images: {value:.6f} at step {step}.", ""]
    return "\n".join(lines)


def text_encoding_notes(clip_skip: int | None, max_token_length: int | None) -> list[str]:
    """How to prompt the way training encoded the captions. kohya and A1111 count clip skip from 1 (the
    last layer); diffusers' pipelines count the layers skipped, one lower; ComfyUI's CLIPSetLastLayer
    takes the negative layer index."""
    lines = []
    if clip_skip and clip_skip > 1:
        lines += [f"Trained with clip skip {clip_skip} (kohya's and A1111's numbering): diffusers counts one lower, "
                  f"hence `clip_skip={clip_skip - 1}` above; set \"Clip skip\" to {clip_skip} in A1111/Forge and "
                  f"`stop_at_clip_layer` to -{clip_skip} in ComfyUI's CLIPSetLastLayer node.", ""]
    if max_token_length:
        lines += [f"Trained with captions of up to {max_token_length} tokens, encoded in 75-token chunks as "
                  "A1111, Forge and ComfyUI encode long prompts. diffusers' pipelines cut prompts at 77 tokens: "
                  "for longer prompts there, pass `prompt_embeds` encoded in chunks the same way.", ""]
    return lines


def embedding_lines(embeddings: EmbeddingsInfo) -> list[str]:
    """The load_textual_inversion calls, one per text encoder."""
    lines = ["", "from safetensors.torch import load_file", "",
             f'state_dict = load_file("<this repo or folder>/{embeddings.file}")']
    for key, encoder, tokenizer in embeddings.encoders:
        lines.append(f"pipe.load_textual_inversion(state_dict[{json.dumps(key)}], "
                     f"token={json.dumps(embeddings.tokens)}, text_encoder=pipe.{encoder}, tokenizer=pipe.{tokenizer})")
    return lines


def embedding_notes(embeddings: EmbeddingsInfo) -> list[str]:
    triggers = ", ".join(f"`{name}` -> `{tokens}`" for name, tokens in embeddings.triggers.items())
    lines = ["## Trigger tokens", "", f"Learned tokens: {triggers}. Write the new tokens in prompts "
             f"(e.g. `a photo of {next(iter(embeddings.triggers.values()))}`).", ""]
    if embeddings.in_pipeline:
        lines += ["The tokens are part of this pipeline's tokenizers and text encoders; "
                  f"`{embeddings.file}` holds the same embeddings for other tools.", ""]
    keys = " and ".join(f"`{key}`" for key, _, _ in embeddings.encoders)
    lines += [f"`{embeddings.file}` holds one tensor per text encoder ({keys}): the embedding layout that "
              "AUTOMATIC1111, Forge and ComfyUI load.", ""]
    return lines


# Where ComfyUI and A1111/Forge look for each kind of file.
UI_FOLDERS = {"lora": ("models/loras", "models/Lora"), "checkpoint": ("models/checkpoints", "models/Stable-diffusion"),
              "embedding": ("models/embeddings", "embeddings")}


def ui_section(ui_files: dict[str, str]) -> list[str]:
    if not ui_files:
        return []
    lines = ["## Use in ComfyUI / A1111 / Forge", ""]
    for name, kind in ui_files.items():
        comfy, a1111 = UI_FOLDERS[kind]
        lines.append(f"- `{name}`: copy to ComfyUI's `{comfy}/` or A1111/Forge's `{a1111}/`.")
    return lines + [""]


def prepare_repo(repo_id: str, token: str | None) -> str:
    """Create (or reuse) the Hub repo before training, so a bad token or no network fails early."""
    try:
        return create_repo(repo_id, exist_ok=True, token=token).repo_id
    except Exception as err:  # network, auth and permission errors all stop the run here
        raise HubError(f"--push_to_hub: cannot create or access the Hub repo '{repo_id}': {err}") from err


def upload_output(output_dir: Path, repo_id: str, token: str | None) -> bool:
    """Upload the output folder; on failure keep everything local, log why, return False."""
    try:
        upload_folder(repo_id=repo_id, folder_path=str(output_dir), commit_message="End of training",
                      ignore_patterns=UPLOAD_IGNORE, token=token)
    except Exception as err:  # the training result is safe on disk whatever went wrong
        logger.error("Upload to the Hub repo '%s' failed: %s. Everything is kept in %s; upload it later with "
                     "`hf upload %s %s`.", repo_id, err, output_dir, repo_id, output_dir)
        return False
    logger.info("Uploaded %s to https://huggingface.co/%s", output_dir, repo_id)
    return True
