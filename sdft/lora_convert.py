"""Convert adapter files between the diffusers/PEFT layout and the kohya/LyCORIS layout.

- diffusers/PEFT: `<role>.<module path>.<peft parameter>`, the parameters named as peft names them
  (`lora_A.weight`/`lora_B.weight`, read also as diffusers' `lora.down.weight`/`lora.up.weight`;
  `hada_w1_a`... for LoHa, `lokr_w1`... for LoKr), each role's peft config (rank, alpha and their
  per-module patterns) in the header's `lora_adapter_metadata`, as diffusers' `save_lora_weights`
  writes it. diffusers loads this file for LoRA; for LoHa and LoKr it is peft's own state dict.
- kohya/LyCORIS: sdft.adapter_files (one entry per layer, `.alpha` beside the factors).

kohya names put underscores where module paths have dots, so reading them needs the base model's
layer names: from `--base`, a diffusers folder whose configs are read (no weights are loaded).
Both directions keep every tensor as it is, so a round trip gives the file back; the one scale that
moves is that of LoKr with two full factors, which the kohya layout folds into `lokr_w1`.
DoRA is refused: the kohya `dora_scale` UIs read depends on the base weights (sdft.adapter_files).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sdft.adapter_files import DENOISER_PREFIXES, kohya_name
from sdft.errors import UserError

METADATA_KEY = "lora_adapter_metadata"   # diffusers' header key for the peft configs
PEFT_NAMES = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight",
              "lora.down.weight": "lora_down.weight", "lora.up.weight": "lora_up.weight"}
LYCORIS_PARTS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b",
                 "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
PEFT_TYPES = {"lora_down.weight": "LORA", "hada_w1_a": "LOHA"}   # else LOKR


class ConvertError(UserError):
    """A file convert cannot read; the message names it and the key."""


def read(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
    return load_file(str(path)), metadata


def is_kohya(state: dict[str, torch.Tensor]) -> bool:
    return all(key.startswith(("lora_unet_", "lora_te", "lora_transformer_")) for key in state)


# --------------------------------------------------------------------------- PEFT -> kohya


def kohya_prefixes(roles: set[str]) -> dict[str, str]:
    """kohya prefix per role: lora_te alone for SD 1.x/2.x, lora_te1/lora_te2 beside a second encoder."""
    pair = "text_encoder_2" in roles
    return {**DENOISER_PREFIXES, "text_encoder": "lora_te1" if pair else "lora_te", "text_encoder_2": "lora_te2"}


def split_peft_key(key: str) -> tuple[str, str, str]:
    """'unet.a.b.lora_A.weight' -> ('unet', 'a.b', 'lora_down.weight')."""
    role, rest = key.split(".", 1)
    for peft, kohya in PEFT_NAMES.items():
        if rest.endswith("." + peft):
            return role, rest[: -len(peft) - 1], kohya
    module, _, part = rest.rpartition(".")
    if part not in LYCORIS_PARTS:
        raise ConvertError(f"'{key}' is not a LoRA, LoHa or LoKr parameter"
                           + (" (DoRA's magnitude: see `convert --help`)" if "magnitude" in key else "") + ".")
    return role, module, part


def pattern_value(config: dict, name: str, pattern: str, default: float) -> float:
    """peft's per-module patterns: a key matches a module whose path ends with it."""
    for key, value in (config.get(pattern) or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def layer_alpha(config: dict, module: str, rank: int) -> float:
    default = config.get("lora_alpha", config.get("alpha"))
    return float(pattern_value(config, module, "alpha_pattern", rank if default is None else default))


def to_kohya(state: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, torch.Tensor]:
    configs = json.loads(metadata.get(METADATA_KEY, "{}"))
    layers: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        role, module, part = split_peft_key(key)
        layers.setdefault((role, module), {})[part] = value
    prefixes = kohya_prefixes({role for role, _ in layers})
    out = {}
    for (role, module), parts in layers.items():
        if role not in prefixes:
            raise ConvertError(f"'{role}.{module}': '{role}' is not a role kohya files name (unet, transformer, "
                               "text_encoder, text_encoder_2).")
        config = {k[len(role) + 1:]: v for k, v in configs.items() if k.startswith(role + ".")}
        rank = factor_rank(parts) or int(pattern_value(config, module, "rank_pattern", config.get("r", 0)))
        alpha = layer_alpha(config, module, rank)
        if is_full_lokr(parts):   # the loaders scale two full factors by 1: fold peft's alpha/rank in
            parts = {**parts, "lokr_w1": parts["lokr_w1"] * (alpha / rank)}
        level = "text_model." if role.startswith("text_encoder") and not module.startswith("text_model.") else ""
        name = kohya_name(prefixes[role], level + module)
        out.update({f"{name}.{part}": value for part, value in parts.items()})
        out[f"{name}.alpha"] = torch.tensor(alpha)
    return out


def is_full_lokr(parts: dict[str, torch.Tensor]) -> bool:
    return "lokr_w1" in parts and "lokr_w2" in parts


def factor_rank(parts: dict[str, torch.Tensor]) -> int | None:
    """The rank the factors show; None for LoKr with two full factors (its rank is in the config)."""
    for part in ("lora_down.weight", "hada_w1_b", "lokr_w1_b", "lokr_w2_b"):
        if part in parts:
            return parts[part].shape[0]
    return None


# --------------------------------------------------------------------------- kohya -> PEFT


def layer_names(base: str | Path) -> dict[str, tuple[str, str]]:
    """kohya name -> (role, module path) for every Linear/Conv2d of the base's denoiser and text
    encoders, built from their configs on the meta device."""
    import diffusers
    import transformers
    from accelerate import init_empty_weights  # loaded where used: to_kohya needs no model

    index = Path(base) / "model_index.json"
    if not index.is_file():
        raise ConvertError(f"--base '{base}' is not a diffusers folder (no model_index.json).")
    components = json.loads(index.read_text())
    roles = [r for r in ("unet", "transformer", "text_encoder", "text_encoder_2") if components.get(r, [None])[0]]
    prefixes = kohya_prefixes(set(roles))
    names = {}
    for role in roles:
        library, class_name = components[role]
        with init_empty_weights():
            if library == "diffusers":
                cls = getattr(diffusers, class_name)
                model = cls.from_config(cls.load_config(str(Path(base) / role)))
            else:
                cls = getattr(transformers, class_name)
                model = cls(transformers.AutoConfig.from_pretrained(str(Path(base) / role)))
        level = "text_model." if role.startswith("text_encoder") and not hasattr(model, "text_model") else ""
        for module, layer in model.named_modules():
            if isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)):
                names[kohya_name(prefixes[role], level + module)] = (role, module)
    return names


def to_peft(state: dict[str, torch.Tensor], names: dict[str, tuple[str, str]],
            source: str) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """The PEFT-layout tensors and, per role, the peft config (as a dict) that gives each layer its
    rank and alpha. LoKr with two full factors gets the rank of its largest factor (so peft keeps
    both full) and the file's alpha, `lokr_w1` divided by the alpha/rank peft multiplies it by."""
    entries: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        name, _, part = key.partition(".")
        entries.setdefault(name, {})[part] = value
    peft_parts = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight"}
    out, configs = {}, {}
    for name, parts in entries.items():
        if name not in names:
            raise ConvertError(f"{source}: '{name}' names no layer of the base; was it trained on another model?")
        if "dora_scale" in parts:
            raise ConvertError(f"{source}: '{name}.dora_scale' is DoRA, whose kohya scale depends on the base "
                               "weights; convert refuses it (the training run writes both layouts).")
        role, module = names[name]
        alpha = float(parts.pop("alpha")) if "alpha" in parts else None
        rank = factor_rank(parts) or max(max(parts["lokr_w1"].shape), max(parts["lokr_w2"].shape[:2]))
        alpha = rank if alpha is None else alpha
        if is_full_lokr(parts):
            parts = {**parts, "lokr_w1": parts["lokr_w1"] / (alpha / rank)}
        peft_type = next((t for p, t in PEFT_TYPES.items() if p in parts), "LOKR")
        out.update({f"{role}.{module}.{peft_parts.get(part, part)}": value for part, value in parts.items()})
        config = configs.setdefault(role, {"peft_type": peft_type, "target_modules": [], "rank_pattern": {},
                                           "alpha_pattern": {}})
        if config["peft_type"] != peft_type:
            raise ConvertError(f"{source}: '{name}' is {peft_type}, other {role} layers {config['peft_type']}; "
                               "a PEFT file holds one adapter type per model.")
        config["target_modules"].append(module)
        config["rank_pattern"][re.escape(module)] = rank
        config["alpha_pattern"][re.escape(module)] = alpha
    for config in configs.values():   # the first layer's numbers as the defaults peft configs carry
        first = re.escape(config["target_modules"][0])
        alpha_key = "lora_alpha" if config["peft_type"] == "LORA" else "alpha"
        config.update(r=config["rank_pattern"][first], **{alpha_key: config["alpha_pattern"][first]})
    return out, configs


# --------------------------------------------------------------------------- files


def convert(source: str, output: str, base: str | None = None) -> str:
    """Write `source` in the other layout; returns the layout written ("kohya" or "peft")."""
    if not Path(source).is_file():
        raise ConvertError(f"--input '{source}' is not a file.")
    try:
        state, metadata = read(source)
    except Exception as err:   # safetensors raises its own error types for files that are not safetensors
        raise ConvertError(f"--input '{source}' is not a safetensors file: {err}") from err
    if not state:
        raise ConvertError(f"{source} holds no tensors.")
    if is_kohya(state):
        if base is None:
            raise ConvertError(f"{source} is in the kohya layout, whose names need the base model's layer names: "
                               "add --base DIFFUSERS_FOLDER.")
        tensors, configs = to_peft(state, layer_names(base), source)
        flat = {f"{role}.{key}": value for role, config in configs.items() for key, value in config.items()}
        metadata = {**metadata, METADATA_KEY: json.dumps(flat, indent=2, sort_keys=True), "format": "pt"}
        save_file(tensors, output, metadata=metadata)
        return "peft"
    if any(key.startswith(("lora_unet_", "lora_te", "lora_transformer_")) for key in state):
        first = next(k for k in state if k.startswith(("lora_unet_", "lora_te", "lora_transformer_")))
        raise ConvertError(f"{source} mixes the kohya layout ('{first}') with other keys.")
    kohya = to_kohya(state, metadata)
    save_file(kohya, output, metadata={k: v for k, v in metadata.items() if k != METADATA_KEY})
    return "kohya"
