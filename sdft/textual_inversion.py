"""Pivotal tuning and textual inversion: new tokens learned in the CLIP text encoders.

Each --token_abstraction (e.g. `TOK`) stands for --num_new_tokens_per_abstraction new tokens
(`<s0><s1>`; a second abstraction gets `<s2><s3>`, as in diffusers' advanced DreamBooth scripts).
They are added to every CLIP tokenizer of the family, with one new row each in the matching
embedding table. Only those rows train, and only for the first --train_text_encoder_ti_frac of
the optimizer steps; the LoRA or fine-tune of the UNet may go on after that ("pivotal tuning").

The other rows stay bit-identical to the base model. Masking their gradient is not enough (AdamW's
decoupled weight decay moves rows whose gradient is zero), so after every optimizer step the whole
table is restored from a copy taken at the start and the new rows are written back, rescaled a
little towards the spread of the existing embeddings by (std_base / std_new) ** 0.1 (the
regulariser of diffusers' advanced scripts). After the pivot the text encoders run without
gradients, so no optimizer touches the table any more.

The text encoders are not wrapped for DistributedDataParallel: the gradient of the new rows is
averaged across processes here, at the step that applies it, which is what DDP would do.

Outputs: `<name>_emb.safetensors` holds one tensor of new rows per encoder, keyed `clip_l` (first
encoder) and `clip_g` (SDXL's second), the layout A1111, Forge and ComfyUI read as an SDXL
embedding and that `pipe.load_textual_inversion(state_dict["clip_l"], token=[...], ...)` loads.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from sdft.errors import CliError

logger = logging.getLogger(__name__)

CHECKPOINT_WEIGHTS = "token_embeddings.safetensors"
CHECKPOINT_STATE = "token_embeddings.json"


# --------------------------------------------------------------------------- tokens and prompts


@dataclass(frozen=True)
class TokenPlan:
    """Which new tokens stand for which abstraction: {"TOK": ["<s0>", "<s1>"]}."""

    abstractions: dict[str, list[str]]

    @classmethod
    def from_flags(cls, token_abstraction: str, per_abstraction: int) -> "TokenPlan":
        names = parse_abstractions(token_abstraction)
        return cls({name: [f"<s{index * per_abstraction + i}>" for i in range(per_abstraction)]
                    for index, name in enumerate(names)})

    @property
    def tokens(self) -> list[str]:
        return [token for tokens in self.abstractions.values() for token in tokens]

    def triggers(self) -> dict[str, str]:
        return {name: "".join(tokens) for name, tokens in self.abstractions.items()}

    def apply(self, text: str) -> str:
        # Longest first, so an abstraction that contains another ("TOK2" and "TOK") stays whole.
        for name in sorted(self.abstractions, key=len, reverse=True):
            text = text.replace(name, "".join(self.abstractions[name]))
        return text

    def apply_all(self, texts: list[str]) -> list[str]:
        return [self.apply(text) for text in texts]

    def unused(self, texts) -> list[str]:
        """Abstractions that appear in none of `texts`."""
        texts = list(texts)
        return [name for name in self.abstractions if not any(name in text for text in texts)]


def parse_abstractions(value: str) -> list[str]:
    names = [name.strip() for name in value.split(",")]
    if not all(names):
        raise CliError(f"--token_abstraction '{value}' has an empty entry; give comma-separated identifiers.")
    if len(set(names)) != len(names):
        raise CliError(f"--token_abstraction '{value}' names an identifier twice.")
    return names


def check_abstractions_used(plan: TokenPlan, texts) -> None:
    unused = plan.unused(texts)
    if unused:
        raise CliError(f"--token_abstraction {', '.join(unused)} appears in no caption, instance, class or "
                       "validation prompt, so its new tokens would never be trained; put it in --instance_prompt "
                       "(e.g. 'a photo of TOK dog') or in the captions.")


def stop_step(frac: float, max_train_steps: int, train_denoiser: bool) -> int:
    """The first optimizer step without embedding training: floor(frac * steps), at least 1 (the
    epsilon keeps 0.29 * 100 from flooring to 28). With the denoiser frozen the embeddings are all
    that trains, so they train throughout."""
    if not train_denoiser:
        return max_train_steps
    return max(1, math.floor(frac * max_train_steps + 1e-9))


# --------------------------------------------------------------------------- one encoder's new rows


@dataclass
class EncoderTokens:
    """The new rows of one text encoder's token-embedding table."""

    role: str                       # "text_encoder" or "text_encoder_2"
    tokenizer_role: str
    key: str                        # "clip_l" / "clip_g" in the embeddings file
    tokenizer: object
    text_encoder: torch.nn.Module
    ids: list[int]
    base_std: float                 # std of the existing rows, the scale of the new ones
    original: torch.Tensor = field(repr=False)  # the table as it started; other rows are restored from it

    @property
    def weight(self) -> torch.nn.Parameter:
        return self.text_encoder.get_input_embeddings().weight

    def rows(self) -> torch.Tensor:
        return self.weight.detach()[self.ids]

    def set_rows(self, rows: torch.Tensor) -> None:
        with torch.no_grad():
            self.weight[self.ids] = rows.to(self.weight.device, self.weight.dtype)


def add_tokens(tokenizer, text_encoder: torch.nn.Module, tokens: list[str], tokenizer_role: str) -> list[int]:
    """Add `tokens` to the tokenizer and rows for them to the encoder; returns their ids."""
    vocab = tokenizer.get_vocab()
    present = [token for token in tokens if token in vocab]
    if present:
        raise CliError(f"The new token(s) {', '.join(present)} already exist in the {tokenizer_role} of "
                       "--pretrained_model_name_or_path (a model that already learned them?); use another "
                       "--token_abstraction count or a base model without them.")
    # add_tokens, as diffusers' load_textual_inversion does, so training and inference split prompts alike.
    tokenizer.add_tokens(tokens)
    ids = tokenizer.convert_tokens_to_ids(tokens)
    rows = text_encoder.get_input_embeddings().weight.shape[0]
    if max(ids) >= rows:
        # mean_resizing=False: the new rows are initialised below, a covariance fit would be wasted.
        text_encoder.resize_token_embeddings(max(ids) + 1, mean_resizing=False)
    return ids


def init_rows(weight: torch.Tensor, ids: list[int], base_std: float, generator: torch.Generator,
              initializer_ids: list[int] | None) -> None:
    """Random normal rows scaled to the std of the existing ones, or copies of the initializer
    concept's token rows (new token i takes concept token i mod n), as diffusers' advanced scripts."""
    with torch.no_grad():
        if initializer_ids:
            for i, token_id in enumerate(ids):
                weight[token_id] = weight[initializer_ids[i % len(initializer_ids)]]
        else:
            noise = torch.randn(len(ids), weight.shape[1], generator=generator) * base_std
            weight[ids] = noise.to(weight.device, weight.dtype)


def cast_output(module: torch.nn.Module, inputs, output: torch.Tensor, *, dtype: torch.dtype) -> torch.Tensor:
    return output.to(dtype)


def encoder_tokens(role: str, tokenizer_role: str, key: str, tokenizer, text_encoder: torch.nn.Module,
                   tokens: list[str], generator: torch.Generator, initializer_concept: str | None) -> EncoderTokens:
    base = text_encoder.get_input_embeddings().weight
    base_std = base.detach().float().std().item()
    ids = add_tokens(tokenizer, text_encoder, tokens, tokenizer_role)
    initializer_ids = None
    if initializer_concept is not None:
        initializer_ids = tokenizer.encode(initializer_concept, add_special_tokens=False)
        if not initializer_ids:
            raise CliError(f"--initializer_concept '{initializer_concept}' has no tokens.")
    embedding = text_encoder.get_input_embeddings()
    weight = embedding.weight
    # The trained table is fp32 whatever the mixed precision, as LoRA weights are (sdft.trainable);
    # its output is cast back so the rest of the frozen encoder runs in its own dtype, autocast or not.
    embedding.register_forward_hook(partial(cast_output, dtype=weight.dtype))
    weight.data = weight.data.float()
    init_rows(weight, ids, base_std, generator, initializer_ids)
    weight.requires_grad_(True)
    return EncoderTokens(role, tokenizer_role, key, tokenizer, text_encoder, ids, base_std,
                         original=weight.detach().clone())


# --------------------------------------------------------------------------- the trainer's handle


@dataclass
class TokenEmbeddings:
    """What the trainer calls: gradients before the step, the restore after it, checkpoints, export."""

    plan: TokenPlan
    encoders: list[EncoderTokens]
    stop_step: int = 0              # optimizer steps [0, stop_step) train the new rows

    def active(self, step: int) -> bool:
        return step < self.stop_step

    def params(self) -> list[torch.nn.Parameter]:
        return [encoder.weight for encoder in self.encoders]

    def modules(self) -> dict[str, torch.nn.Module]:
        return {encoder.role: encoder.text_encoder for encoder in self.encoders}

    def prepare_gradients(self, accelerator) -> None:
        """Before the optimizer step: keep only the new rows' gradient, averaged over processes."""
        for encoder in self.encoders:
            grad = encoder.weight.grad
            if grad is None:
                continue
            rows = accelerator.reduce(grad[encoder.ids].contiguous(), reduction="mean")
            grad.zero_()
            grad[encoder.ids] = rows

    @torch.no_grad()
    def restore(self) -> None:
        """After the optimizer step: every other row back to the base, the new rows rescaled."""
        for encoder in self.encoders:
            new = encoder.weight[encoder.ids].clone()
            ratio = encoder.base_std / new.float().std().clamp_min(1e-12).item()
            encoder.weight.copy_(encoder.original)
            encoder.weight[encoder.ids] = new * ratio ** 0.1

    def state_dict(self) -> dict[str, torch.Tensor]:
        """{"clip_l": rows, "clip_g": rows}, fp32 on the CPU."""
        return {encoder.key: encoder.rows().float().cpu().contiguous() for encoder in self.encoders}

    # ---- checkpoints: the rows, the tokens they belong to, and the step the phase ends

    def save(self, directory: Path) -> None:
        save_file(self.state_dict(), str(directory / CHECKPOINT_WEIGHTS))
        state = {"tokens": {encoder.key: self.plan.tokens for encoder in self.encoders}, "stop_step": self.stop_step,
                 "abstractions": self.plan.abstractions}
        (directory / CHECKPOINT_STATE).write_text(json.dumps(state, indent=2))

    def load(self, directory: Path) -> None:
        state_file = directory / CHECKPOINT_STATE
        if not state_file.is_file():
            raise CliError(f"{directory} holds no learned token embeddings ({CHECKPOINT_STATE}); it was not written "
                           "by a --train_text_encoder_ti run.")
        state = json.loads(state_file.read_text())
        if state["abstractions"] != self.plan.abstractions:
            raise CliError(f"{directory} learned the tokens {state['abstractions']}, but --token_abstraction and "
                           f"--num_new_tokens_per_abstraction ask for {self.plan.abstractions}.")
        rows = load_file(str(directory / CHECKPOINT_WEIGHTS))
        for encoder in self.encoders:
            encoder.set_rows(rows[encoder.key])
        # The stop step stays the one this invocation's flags give (--train_text_encoder_ti_frac of its
        # --max_train_steps), as the learning-rate schedule does: a run of 3 steps resumed to 6 with
        # frac 1.0 trains the tokens to step 6, like 6 steps run straight (issue 16).

    # ---- outputs

    def export(self, output_dir: Path) -> Path:
        """`<output_dir>/<name>_emb.safetensors` (the name of the folder itself, not its whole path:
        diffusers' scripts join the path twice, #6685)."""
        path = Path(output_dir) / f"{Path(output_dir).name}_emb.safetensors"
        save_file(self.state_dict(), str(path))
        return path

    def export_modules(self, source) -> dict:
        """Tokenizers and text encoders with the new tokens, for a full pipeline export: each encoder
        is reloaded from the base model (so every other weight keeps its stored precision) and given
        the learned rows."""
        modules = {}
        for encoder in self.encoders:
            fresh = type(encoder.text_encoder).from_pretrained(source.path, subfolder=encoder.role,
                                                               **source.weight_kwargs())
            fresh.resize_token_embeddings(encoder.weight.shape[0], mean_resizing=False)
            with torch.no_grad():
                fresh.get_input_embeddings().weight[encoder.ids] = encoder.rows().to(fresh.dtype).cpu()
            modules[encoder.role] = fresh
            modules[encoder.tokenizer_role] = encoder.tokenizer
        return modules

    def load_into(self, pipeline, embeddings_file: Path) -> None:
        """What a user does with the embeddings file: diffusers' reader, one call per encoder."""
        state_dict = load_file(str(embeddings_file))
        for encoder in self.encoders:
            pipeline.load_textual_inversion(state_dict[encoder.key], token=self.plan.tokens,
                                            text_encoder=getattr(pipeline, encoder.role),
                                            tokenizer=getattr(pipeline, encoder.tokenizer_role))


def build_token_embeddings(family, models, plan: TokenPlan, *, seed: int,
                           initializer_concept: str | None) -> TokenEmbeddings:
    """New tokens in every CLIP encoder the family lists in `textual_inversion_encoders`."""
    generator = torch.Generator().manual_seed(seed)
    encoders = [encoder_tokens(role, tokenizer_role, key, getattr(models, tokenizer_role), getattr(models, role),
                               plan.tokens, generator, initializer_concept)
                for role, tokenizer_role, key in family.textual_inversion_encoders]
    logger.info("Learning %s in %s", ", ".join(f"{k} -> {v}" for k, v in plan.triggers().items()),
                ", ".join(e.role for e in encoders))
    return TokenEmbeddings(plan, encoders)
