"""Per-block and per-regex adapter rank and learning rate, with kohya sd-scripts' `--network_args` keys.

The keys and their value syntax are kohya's (docs/train_network_README-ja.md, docs/train_network_advanced.md,
docs/flux_train_network.md, networks/lora.py), so a kohya command line's `--network_args` carries over:

- `block_dims`, `block_alphas`, `conv_block_dims`, `conv_block_alphas`: one comma-separated value per U-Net
  block, 25 for SD 1.x/2.x (block 0 has no adapter; 1-11 down, 12 mid, 13-24 up) and 23 for SDXL (0 the
  embeddings, 1-9 input blocks, 10-12 middle block, 13-21 output blocks, 22 the output layers). `block_dims`
  rank the Linear and 1x1 layers, `conv_block_dims` the 3x3 convolutions (LoCon); a rank of 0 leaves the
  block's layers without an adapter.
- `down_lr_weight`, `mid_lr_weight`, `up_lr_weight`: multipliers of the U-Net's learning rate per block
  (12/1/12 values, SDXL 9/3/9), or for down/up one of kohya's curves `sine`, `cosine`, `linear`,
  `reverse_linear`, `zeros`, optionally `+offset` (`cosine+.25`). Short lists are filled with 1, an empty
  entry is 0, and a block whose multiplier is not above `block_lr_zero_threshold` (default 0) gets no
  adapter at all, as in kohya.
- `network_reg_dims`, `network_reg_lrs`: `pattern=rank,pattern=lr` pairs; each Python regex is searched in
  the layer's kohya name (`lora_unet_down_blocks_1_attentions_0_proj_in`) and in its module path
  (`unet.down_blocks.1.attentions.0.proj_in`); the first matching pair applies (kohya's code; its flux
  docs say "last"), over `--rank`, block ranks and block multipliers. Every trained model, text encoders too.
  An `lr` here is a learning rate, not a multiplier. A block whose multiplier is 0 keeps no adapter even
  where a pattern gives its layers a rank.

sdft adds `block_preset`, named block sets for SD 1.x and SDXL whose other blocks get no adapter:
`in`, `mid`, `out`, and for SDXL the B-LoRA blocks (Frenkel et al. 2024, arXiv:2403.14572):
`blora_content` (up_blocks.0.attentions.0), `blora_style` (up_blocks.0.attentions.1), `blora` (both).

Alpha: where no alpha is given for a layer (no `block_alphas`, no `--lora_alpha`), it equals the layer's own
rank, sdft's alpha = rank convention. Each layer's rank and alpha are in the exported file (`.alpha`, the
shapes) and the raw `network_args` in `ss_network_args`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
from peft.tuners.tuners_utils import BaseTunerLayer

from sdft.adapter_files import DENOISER_PREFIXES
from sdft.errors import CliError

BLOCK_LIST_KEYS = ("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas")
LR_WEIGHT_KEYS = ("down_lr_weight", "mid_lr_weight", "up_lr_weight")
NETWORK_ARG_KEYS = (*BLOCK_LIST_KEYS, *LR_WEIGHT_KEYS, "block_lr_zero_threshold", "network_reg_dims",
                    "network_reg_lrs", "block_preset")
LR_CURVES = ("sine", "cosine", "linear", "reverse_linear", "zeros")
BLOCK_FAMILIES = ("sd", "sdxl")
# Down/up and mid block counts of kohya's lists: SD 1.x/2.x 12 + 1 + 12, SDXL 9 + 3 + 9 (plus 0 and 22).
SIDE_BLOCKS = {"sd": 12, "sdxl": 9}
MID_BLOCKS = {"sd": 1, "sdxl": 3}
BLOCK_COUNT = {"sd": 25, "sdxl": 23}
BLOCK_PRESETS = {
    "sd": {"in": range(1, 12), "mid": range(12, 13), "out": range(13, 25)},
    "sdxl": {"in": range(1, 10), "mid": range(10, 13), "out": range(13, 22),
             "blora_content": (13,), "blora_style": (14,), "blora": (13, 14)},
}
UPDOWN = re.compile(r"^(down|up)_blocks\.(\d+)\.(attentions|resnets|downsamplers|upsamplers)\.(\d+)\.")
MID_PARTS = {"resnets.0": 10, "attentions.0": 11, "resnets.1": 12}


class NetworkArgsError(CliError):
    """A bad `--network_args` entry; the message names the key."""


@dataclass(frozen=True)
class BlockSettings:
    """Parsed `--network_args`. Lists are per block (None: not given); patterns keep their order."""

    family: str
    block_dims: tuple[int, ...] | None = None
    block_alphas: tuple[float, ...] | None = None
    conv_block_dims: tuple[int, ...] | None = None
    conv_block_alphas: tuple[float, ...] | None = None
    lr_weights: tuple[float, ...] | None = None
    reg_dims: tuple[tuple[str, int], ...] = ()
    reg_lrs: tuple[tuple[str, float], ...] = ()
    raw: dict[str, str] = field(default_factory=dict)

    @property
    def by_block(self) -> bool:
        return self.block_dims is not None or self.lr_weights is not None or self.conv_block_dims is not None


def split_pairs(values: list[str] | None) -> dict[str, str]:
    """`["key=value", ...]` (kohya's `--network_args`) as a dict; a malformed or unknown key is an error."""
    pairs = {}
    for item in values or []:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep:
            raise NetworkArgsError(f"--network_args '{item}' is not key=value.")
        if key not in NETWORK_ARG_KEYS:
            raise NetworkArgsError(f"--network_args key '{key}' is not one sdft knows; known: "
                                   f"{', '.join(NETWORK_ARG_KEYS)} (--conv_rank, --lora_alpha, --loraplus_lr_ratio "
                                   "... are flags of their own).")
        pairs[key] = value.strip()
    return pairs


def parse_network_args(values: list[str] | None, family: str) -> BlockSettings | None:
    """The settings of `--network_args` for a family ("sd", "sdxl", "sd3"); None when there are none."""
    pairs = split_pairs(values)
    if not pairs:
        return None
    by_block = [key for key in pairs if key not in ("network_reg_dims", "network_reg_lrs")]
    if by_block and family not in BLOCK_FAMILIES:
        raise NetworkArgsError(f"--network_args {by_block[0]} counts U-Net blocks (SD 1.x/2.x, SDXL); "
                               "use network_reg_dims/network_reg_lrs here.")
    lists = {key: block_list(key, pairs[key], family, float if "alphas" in key else int)
             for key in BLOCK_LIST_KEYS if key in pairs}
    for key in ("block_alphas", "conv_block_alphas"):
        if key in lists and key.replace("alphas", "dims") not in lists:
            raise NetworkArgsError(f"--network_args {key} needs {key.replace('alphas', 'dims')} as well.")
    return BlockSettings(family=family, **lists, lr_weights=lr_weights(pairs, family),
                         reg_dims=tuple(regex_pairs("network_reg_dims", pairs.get("network_reg_dims"), int)),
                         reg_lrs=tuple(regex_pairs("network_reg_lrs", pairs.get("network_reg_lrs"), float)),
                         raw=pairs)


def number(key: str, text: str, kind=float):
    try:
        value = kind(text)
    except ValueError:
        raise NetworkArgsError(f"--network_args {key}: '{text}' is not a{'n integer' if kind is int else ' number'}.")
    if value < 0 or not math.isfinite(value):
        raise NetworkArgsError(f"--network_args {key}: {text} must be zero or more.")
    return value


def block_list(key: str, text: str, family: str, kind) -> tuple:
    values = [number(key, part.strip(), kind) for part in text.split(",")]
    if len(values) != BLOCK_COUNT[family]:
        raise NetworkArgsError(f"--network_args {key} needs {BLOCK_COUNT[family]} values for this model "
                               f"(one per U-Net block), got {len(values)}.")
    return tuple(values)


def regex_pairs(key: str, text: str | None, kind) -> list[tuple[str, float]]:
    """kohya's `pattern=value,pattern=value`; the value follows the last '=' so patterns may hold '='."""
    pairs = []
    for part in (text or "").split(","):
        if not part.strip():
            continue
        pattern, sep, value = part.strip().rpartition("=")
        if not sep or not pattern:
            raise NetworkArgsError(f"--network_args {key}: '{part}' is not pattern=value.")
        try:
            re.compile(pattern)
        except re.error as err:
            raise NetworkArgsError(f"--network_args {key}: '{pattern}' is not a regular expression: {err}.") from err
        pairs.append((pattern, number(key, value, kind)))
    return pairs


def curve(key: str, text: str, count: int) -> list[float]:
    """kohya's named down/up multipliers: `name` or `name+offset`."""
    name, _, offset = text.partition("+")
    base = number(key, offset) if offset else 0.0
    steps = [i / (count - 1) for i in range(count)]
    shapes = {"sine": [math.sin(math.pi * s / 2) for s in steps], "linear": steps, "zeros": [0.0] * count}
    shapes["cosine"] = shapes["sine"][::-1]
    shapes["reverse_linear"] = steps[::-1]
    if name not in shapes:
        raise NetworkArgsError(f"--network_args {key}: '{name}' is neither a list of numbers nor one of "
                               f"{', '.join(LR_CURVES)}.")
    return [value + base for value in shapes[name]]


def side_weights(key: str, text: str | None, count: int) -> list[float]:
    """One side's multipliers: a curve, or numbers (empty ones 0) filled with 1 to `count`."""
    if text is None:
        return [1.0] * count
    if "," not in text and not re.fullmatch(r"[-+.\deE]*", text.strip()):
        return curve(key, text, count)
    values = [number(key, part.strip()) if part.strip() else 0.0 for part in text.split(",")]
    if len(values) > count:
        raise NetworkArgsError(f"--network_args {key} takes at most {count} values for this model, got {len(values)}.")
    return values + [1.0] * (count - len(values))


def lr_weights(pairs: dict[str, str], family: str) -> tuple[float, ...] | None:
    """Per-block multipliers of the U-Net rate (kohya's block order), from the lr-weight keys and the preset."""
    if not any(key in pairs for key in (*LR_WEIGHT_KEYS, "block_preset")):
        return None
    side, mid = SIDE_BLOCKS[family], MID_BLOCKS[family]
    weights = (side_weights("down_lr_weight", pairs.get("down_lr_weight"), side)
               + side_weights("mid_lr_weight", pairs.get("mid_lr_weight"), mid)
               + side_weights("up_lr_weight", pairs.get("up_lr_weight"), side))
    if family == "sdxl":
        weights = [1.0, *weights, 1.0]      # the embeddings and output layers, which kohya never adapts
    preset = pairs.get("block_preset")
    if preset is not None:
        if preset not in BLOCK_PRESETS[family]:
            raise NetworkArgsError(f"--network_args block_preset '{preset}' is not one of "
                                   f"{', '.join(BLOCK_PRESETS[family])} for this model.")
        kept = set(BLOCK_PRESETS[family][preset])
        weights = [w if i in kept else 0.0 for i, w in enumerate(weights)]
    threshold = number("block_lr_zero_threshold", pairs.get("block_lr_zero_threshold", "0"))
    return tuple(w if w > threshold else 0.0 for w in weights)


def block_index(name: str, family: str) -> int | None:
    """kohya's block number of a U-Net module (diffusers name), None outside the numbered blocks."""
    match = UPDOWN.match(name + ".")
    sdxl = family == "sdxl"
    if match:
        side, i, part, j = match.group(1), int(match.group(2)), match.group(3), int(match.group(4))
        j = 2 if part in ("downsamplers", "upsamplers") else j
        return (2 if sdxl else 1) + 3 * i + j if side == "down" else 13 + 3 * i + j
    if name.startswith("mid_block."):
        part = ".".join(name.split(".")[1:3])
        return MID_PARTS.get(part, 11) if sdxl else 12
    if sdxl and name.startswith(("time_embedding", "add_embedding")):
        return 0
    if sdxl and name.startswith(("conv_norm_out", "conv_out")):
        return 22
    return 1 if sdxl and name.startswith("conv_in") else None


def first_match(pairs, names: tuple[str, ...]):
    for index, (pattern, value) in enumerate(pairs):
        if any(re.search(pattern, name) for name in names):
            return index, value
    return None


@dataclass(frozen=True)
class LayerNames:
    """How one trained model's layers are named in patterns: kohya file prefix and module-path role."""

    role: str
    kohya_prefix: str
    level: str = ""              # "text_model." for text encoders whose file names carry that level

    def of(self, name: str) -> tuple[str, str]:
        return f"{self.kohya_prefix}_{(self.level + name).replace('.', '_')}", f"{self.role}.{name}"


def layer_ranks(settings: BlockSettings, names: LayerNames, layers: dict[str, torch.nn.Module],
                is_denoiser: bool, default: tuple[int, float | None], conv: tuple[int, float | None],
                spatial) -> dict[str, tuple[int, float | None]]:
    """(rank, alpha or None for alpha = rank) of each of `layers` (name -> layer); rank 0: no adapter."""
    ranks = {}
    for name, layer in layers.items():
        is_conv = spatial(layer)
        rank, alpha = conv if is_conv else default
        block = block_index(name, settings.family) if is_denoiser and settings.by_block else None
        if block is not None:
            dims, alphas = ((settings.conv_block_dims, settings.conv_block_alphas) if is_conv
                            else (settings.block_dims, settings.block_alphas))
            if dims is not None:
                rank, alpha = dims[block], alphas[block] if alphas is not None else alpha
        matched = first_match(settings.reg_dims, names.of(name))
        if matched is not None:
            rank = matched[1]
        if block is not None and settings.lr_weights is not None and settings.lr_weights[block] == 0:
            rank = 0                # kohya: a block that does not learn gets no adapter, whatever its rank
        ranks[name] = (rank, alpha)
    return ranks


def adapted(module: torch.nn.Module):
    """(name, layer) of the peft adapter layers of `module`."""
    return [(name, layer) for name, layer in module.named_modules() if isinstance(layer, BaseTunerLayer)]


def role_names(trained: dict[str, torch.nn.Module], prefixes: dict[str, str]) -> dict[str, LayerNames]:
    """Each trained role's naming: the denoiser's kohya prefix (`lora_unet`, SD3's `lora_transformer`) or the
    family's text-encoder prefix, as in the exported files; text encoders
    without a `text_model` level (transformers 5's CLIPTextModel) get it in file names, as sdft.adapter_files."""
    return {role: LayerNames(role, prefixes.get(role) or DENOISER_PREFIXES[role],
                             "text_model." if role in prefixes and not hasattr(module, "text_model") else "")
            for role, module in trained.items()}


def check_patterns_used(settings: BlockSettings, trained: dict[str, torch.nn.Module],
                        names: dict[str, LayerNames]) -> None:
    """A pattern that matches no adapted layer is almost always a typo: name it."""
    every_name = [names[role].of(name) for role, module in trained.items() for name, _ in adapted(module)]
    for key, pairs in (("network_reg_dims", settings.reg_dims), ("network_reg_lrs", settings.reg_lrs)):
        for pattern, value in pairs:
            if key == "network_reg_dims" and value == 0:     # rank 0 removes the layers it matches
                continue
            if not any(re.search(pattern, name) for names in every_name for name in names):
                raise NetworkArgsError(f"--network_args {key}: '{pattern}' matches no adapted layer (patterns are "
                                       "searched in names like lora_unet_down_blocks_0_attentions_0_proj_in and "
                                       "unet.down_blocks.0.attentions.0.proj_in).")


def layer_rate_groups(groups: list[dict], trained: dict[str, torch.nn.Module], settings: BlockSettings,
                      prefixes: dict[str, str], denoiser_role: str) -> list[dict]:
    """Split each optimizer group by the rate its adapter layers get: `network_reg_lrs` (a learning rate,
    group `<name>_reg<i>`) first, then the U-Net block multipliers (`lr_scale`, group `<name>_block<n>`).
    A pattern matching no adapted layer is an error."""
    names = role_names(trained, prefixes)
    check_patterns_used(settings, trained, names)
    rule = {}
    for role, module in trained.items():
        for name, layer in adapted(module):
            key = layer_rate(settings, names[role], name, role == denoiser_role)
            for param in layer.parameters():
                rule[id(param)] = key
    split = []
    for group in groups:
        parts: dict = {}
        for param in group["params"]:
            parts.setdefault(rule.get(id(param)), []).append(param)
        for key, params in parts.items():
            split.append(rated_group(group, params, key))
    return split


def layer_rate(settings: BlockSettings, names: LayerNames, name: str, is_denoiser: bool):
    matched = first_match(settings.reg_lrs, names.of(name))
    if matched is not None:
        return ("reg", matched[0], matched[1])
    block = block_index(name, settings.family) if is_denoiser and settings.lr_weights is not None else None
    return ("block", block, settings.lr_weights[block]) if block is not None else None


def rated_group(group: dict, params: list, key) -> dict:
    if key is None:
        return {**group, "params": params}
    kind, index, value = key
    name = f"{group.get('name', 'group')}_{kind}{index}"
    if kind == "reg":
        return {**group, "params": params, "lr": value, "name": name}
    return {**group, "params": params, "lr_scale": group.get("lr_scale", 1.0) * value, "name": name}
