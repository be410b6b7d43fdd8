"""LoRA tools: merge adapter files into a base, resize a LoRA by SVD, extract a LoRA from two models.

    python -m sdft.lora_tools merge   --base BASE_DIR --lora FILE[:WEIGHT] ... --output OUT_DIR
    python -m sdft.lora_tools resize  --lora FILE --output FILE (--rank N | --sv_ratio R | --sv_fro F)
    python -m sdft.lora_tools extract --base BASE_DIR --tuned TUNED_DIR --rank N --output FILE
    python -m sdft.lora_tools convert --input FILE --output FILE [--base BASE_DIR]

Files are the kohya/LyCORIS layout (sdft.adapter_files); bases are diffusers folders of SD 1.x/2.x
or SDXL. The resize methods are those of kohya's `resize_lora.py`: a fixed rank, `sv_ratio` (keep
singular values at least the largest / R) and `sv_fro` (the smallest rank keeping the share F of the
squared Frobenius norm). `convert` rewrites a diffusers/PEFT file in the kohya/LyCORIS layout and
back (sdft.lora_convert). A key that names no layer of the base is an error naming it.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sdft.adapter_files import kohya_name
from sdft.errors import UserError
from sdft.lora_convert import convert

logger = logging.getLogger("sdft.lora_tools")
# kohya prefixes by pipeline: text encoder role -> prefix (the U-Net is lora_unet).
PREFIXES = {"StableDiffusionPipeline": {"text_encoder": "lora_te"},
            "StableDiffusionXLPipeline": {"text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}}


class ToolError(UserError):
    """A file or base the LoRA tools cannot use; the message names it."""


# --------------------------------------------------------------------------- reading the layout


def entries(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """kohya name -> {suffix: tensor}, e.g. {'lora_down.weight': ..., 'alpha': ...}."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        name, suffix = key.split(".", 1)
        grouped.setdefault(name, {})[suffix] = value.float()
    return grouped


def entry_delta(entry: dict[str, torch.Tensor], shape: torch.Size) -> torch.Tensor:
    """The weight update of one entry (the formulas in sdft.adapter_files' docstring)."""
    alpha = float(entry["alpha"]) if "alpha" in entry else None
    if "lora_down.weight" in entry:
        down, up = entry["lora_down.weight"], entry["lora_up.weight"]
        return (up.flatten(1) @ down.flatten(1)).reshape(shape) * (alpha / down.shape[0] if alpha else 1.0)
    if "hada_w1_a" in entry:
        product = (entry["hada_w1_a"] @ entry["hada_w1_b"]) * (entry["hada_w2_a"] @ entry["hada_w2_b"])
        return product.reshape(shape) * (alpha / entry["hada_w1_b"].shape[0] if alpha else 1.0)
    return lokr_delta(entry, shape, alpha)


def entry_update(entry: dict[str, torch.Tensor], weight: torch.Tensor) -> torch.Tensor:
    """What one entry adds to `weight` at strength 1. A dora_scale (one entry per output row, as
    sdft writes it) rescales W + delta by dora_scale / ||W|| per output row, as ComfyUI and Forge do."""
    delta = entry_delta(entry, weight.shape)
    if "dora_scale" not in entry:
        return delta
    scale = entry["dora_scale"]
    if scale.shape[0] != weight.shape[0] or scale.numel() != weight.shape[0]:
        raise ToolError(f"dora_scale of shape {tuple(scale.shape)}: only one entry per output row "
                        f"({weight.shape[0]}) is merged by these tools.")
    norm = weight.reshape(weight.shape[0], -1).norm(dim=1).reshape(scale.shape)
    return (weight + delta) * scale / norm - weight


def lokr_delta(entry: dict[str, torch.Tensor], shape: torch.Size, alpha: float | None) -> torch.Tensor:
    dim = None
    if "lokr_w1" in entry:
        w1 = entry["lokr_w1"]
    else:
        w1, dim = entry["lokr_w1_a"] @ entry["lokr_w1_b"], entry["lokr_w1_b"].shape[0]
    if "lokr_w2" in entry:
        w2 = entry["lokr_w2"]
    else:
        w2, dim = entry["lokr_w2_a"] @ entry["lokr_w2_b"].flatten(1), entry["lokr_w2_b"].shape[0]
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    # The loaders scale by alpha/rank only when a factor is low-rank.
    scale = alpha / dim if dim is not None and alpha is not None else 1.0
    return torch.kron(w1, w2).reshape(shape) * scale


def layer_map(pipeline) -> dict[str, tuple[torch.nn.Module, str]]:
    """kohya name -> (model, weight key) for every Linear/Conv2d of the U-Net and text encoders."""
    prefixes = PREFIXES.get(type(pipeline).__name__)
    if prefixes is None:
        raise ToolError(f"The LoRA tools handle SD 1.x/2.x and SDXL bases, not {type(pipeline).__name__}.")
    layers = {}
    for role, prefix in {"unet": "lora_unet", **prefixes}.items():
        module = getattr(pipeline, role)
        level = "text_model." if role != "unet" and not hasattr(module, "text_model") else ""
        for name, layer in module.named_modules():
            if isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)):
                layers[kohya_name(prefix, level + name)] = (module, f"{name}.weight")
    return layers


def load_base(path: str):
    from diffusers import DiffusionPipeline  # loaded where used: the resize command needs no model

    try:
        return DiffusionPipeline.from_pretrained(path, torch_dtype=torch.float32)
    except (OSError, ValueError) as err:
        raise ToolError(f"Could not load the base model '{path}': {err}") from err


# --------------------------------------------------------------------------- merge


def merge(base: str, loras: list[tuple[str, float]], output: str) -> Path:
    """Fold each file, times its weight, into the base and save a diffusers folder."""
    pipeline = load_base(base)
    layers = layer_map(pipeline)
    with torch.no_grad():
        for path, weight in loras:
            grouped = entries(load_file(path))
            unknown = [name for name in grouped if name not in layers]
            if unknown:
                raise ToolError(f"{path}: '{unknown[0]}' ({len(unknown)} entries in all) names no layer of the "
                                f"base {base}; was it trained on another model?")
            for name, entry in grouped.items():
                module, key = layers[name]
                param = module.get_parameter(key)
                param += weight * entry_update(entry, param.detach().float()).to(param.dtype)
            logger.info("Merged %s x %g into %s", path, weight, base)
    pipeline.save_pretrained(output)
    return Path(output)


# --------------------------------------------------------------------------- resize and extract


def chosen_rank(values: torch.Tensor, rank: int | None, sv_ratio: float | None, sv_fro: float | None) -> int:
    if rank is not None:
        return max(1, min(rank, len(values)))
    if sv_ratio is not None:
        return max(1, int((values >= values[0] / sv_ratio).sum()))
    share = torch.cumsum(values**2, 0) / (values**2).sum().clamp_min(1e-30)
    return max(1, min(len(values), int((share < sv_fro - 1e-7).sum()) + 1))


def low_rank(delta: torch.Tensor, shape: torch.Size, rank: int | None, sv_ratio: float | None = None,
             sv_fro: float | None = None) -> tuple[dict[str, torch.Tensor], float]:
    """A kohya LoRA entry (alpha = rank, scale 1) for `delta`, and the share of its squared
    Frobenius norm the kept singular values hold."""
    u, s, vh = torch.linalg.svd(delta.flatten(1).double(), full_matrices=False)
    k = chosen_rank(s, rank, sv_ratio, sv_fro)
    kept = float((s[:k] ** 2).sum() / (s**2).sum().clamp_min(1e-30))
    up, down = (u[:, :k] * s[:k]).float(), vh[:k].float()
    if len(shape) == 4:
        up, down = up.reshape(shape[0], k, 1, 1), down.reshape(k, *shape[1:])
    return {"lora_down.weight": down.contiguous(), "lora_up.weight": up.contiguous(),
            "alpha": torch.tensor(float(k))}, kept


def resize(path: str, output: str, rank: int | None, sv_ratio: float | None, sv_fro: float | None) -> list[float]:
    """Rewrite a LoRA file at a lower rank; returns the Frobenius share each layer kept."""
    grouped = entries(load_file(path))
    state, shares = {}, []
    for name, entry in grouped.items():
        if "lora_down.weight" not in entry:
            raise ToolError(f"{path}: '{name}' is not a LoRA entry (lora_down/lora_up); only LoRA files resize.")
        down, up = entry["lora_down.weight"], entry["lora_up.weight"]
        shape = torch.Size([up.shape[0], *down.shape[1:]])
        new, kept = low_rank(entry_delta(entry, shape).flatten(1), shape, rank, sv_ratio, sv_fro)
        state.update({f"{name}.{suffix}": value for suffix, value in new.items()})
        shares.append(kept)
    metadata = file_metadata(path)
    metadata["ss_network_dim"] = str(rank) if rank is not None else "Dynamic"
    metadata["ss_network_alpha"] = metadata["ss_network_dim"]
    save_file(state, output, metadata=metadata)
    logger.info("Resized %s: kept %.4f of the squared Frobenius norm at worst, %.4f on average",
                path, min(shares), sum(shares) / len(shares))
    return shares


def extract(base: str, tuned: str, output: str, rank: int, min_diff: float = 1e-6) -> list[float]:
    """A LoRA of rank `rank` for every layer that differs by more than `min_diff` between the two
    models; returns the Frobenius share each kept."""
    layers_base, layers_tuned = layer_map(load_base(base)), layer_map(load_base(tuned))
    if layers_base.keys() != layers_tuned.keys():
        first = sorted(layers_base.keys() ^ layers_tuned.keys())[0]
        raise ToolError(f"{base} and {tuned} are different architectures: '{first}' is in only one of them.")
    state, shares = {}, []
    for name, (module, key) in layers_base.items():
        weight = module.get_parameter(key).detach()
        other = layers_tuned[name][0].get_parameter(layers_tuned[name][1]).detach()
        if other.shape != weight.shape:
            raise ToolError(f"'{name}' has shape {tuple(weight.shape)} in {base}, {tuple(other.shape)} in {tuned}.")
        delta = (other - weight).float()
        if delta.abs().max() <= min_diff:
            continue
        new, kept = low_rank(delta, weight.shape, rank)
        state.update({f"{name}.{suffix}": value for suffix, value in new.items()})
        shares.append(kept)
    if not state:
        raise ToolError(f"{base} and {tuned} do not differ by more than {min_diff} in any layer.")
    save_file(state, output, metadata={"ss_network_module": "networks.lora", "ss_network_dim": str(rank),
                                       "ss_network_alpha": str(rank), "ss_sd_model_name": base})
    return shares


def file_metadata(path: str) -> dict[str, str]:
    with safe_open(path, framework="pt") as handle:
        return dict(handle.metadata() or {})


# --------------------------------------------------------------------------- command line


def parse_lora(value: str) -> tuple[str, float]:
    """FILE or FILE:WEIGHT."""
    path, weight = value, 1.0
    head, _, tail = value.rpartition(":")
    if head:
        try:
            path, weight = head, float(tail)
        except ValueError:
            pass
    if not Path(path).is_file():
        raise argparse.ArgumentTypeError(f"'{path}' is not a file.")
    return path, weight


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sdft.lora_tools", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    m = commands.add_parser("merge", help="Fold LoRA/LoHa/LoKr files into a base and save a diffusers folder.")
    m.add_argument("--base", required=True, help="Diffusers folder (or Hub id) of the base model.")
    m.add_argument("--lora", required=True, action="append", type=parse_lora,
                   help="kohya/LyCORIS file, optionally ':WEIGHT' (default 1); repeat for several.")
    m.add_argument("--output", required=True, help="Folder for the merged diffusers model.")
    r = commands.add_parser("resize", help="Rewrite a LoRA file at a lower rank by SVD.")
    r.add_argument("--lora", required=True, help="kohya-layout LoRA file.")
    r.add_argument("--output", required=True, help="File to write.")
    how = r.add_mutually_exclusive_group(required=True)
    how.add_argument("--rank", type=int, help="Fixed rank.")
    how.add_argument("--sv_ratio", type=float, help="Keep singular values at least the largest / this.")
    how.add_argument("--sv_fro", type=float, help="Keep this share (0-1] of the squared Frobenius norm.")
    e = commands.add_parser("extract", help="A LoRA from the difference of two models.")
    e.add_argument("--base", required=True, help="Diffusers folder of the original model.")
    e.add_argument("--tuned", required=True, help="Diffusers folder of the fine-tuned model.")
    e.add_argument("--rank", type=int, required=True, help="Rank of every extracted layer.")
    e.add_argument("--output", required=True, help="File to write.")
    c = commands.add_parser("convert", help="A diffusers/PEFT adapter file in the kohya/LyCORIS layout, or back.")
    c.add_argument("--input", required=True, help="Adapter file; its layout is read from its keys.")
    c.add_argument("--output", required=True, help="File to write, in the other layout.")
    c.add_argument("--base", default=None,
                   help="Diffusers folder of the base model: needed to read kohya names (default: none).")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "merge":
            print(merge(args.base, args.lora, args.output))
        elif args.command == "resize":
            if args.sv_fro is not None and not 0 < args.sv_fro <= 1:
                raise ToolError(f"--sv_fro must be in (0, 1], got {args.sv_fro}.")
            shares = resize(args.lora, args.output, args.rank, args.sv_ratio, args.sv_fro)
            print(json.dumps({"kept_frobenius_share_min": min(shares), "mean": sum(shares) / len(shares)}))
        elif args.command == "convert":
            print(json.dumps({"written": args.output, "layout": convert(args.input, args.output, args.base)}))
        else:
            shares = extract(args.base, args.tuned, args.output, args.rank)
            print(json.dumps({"layers": len(shares), "kept_frobenius_share_min": min(shares)}))
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
