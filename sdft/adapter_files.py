"""The kohya/LyCORIS file layout of peft's adapters: written for the UIs, read back to continue.

One entry per adapted layer, named `<prefix>_<module path with dots as underscores>` (prefixes
lora_unet, lora_te for SD 1.x/2.x, lora_te1/lora_te2 for SDXL), the layout ComfyUI's and Forge's
key maps and A1111's built-in networks read (community-trainers.md section 2.10). SD3's transformer
is `lora_transformer_<diffusers module path>` (OneTrainer's names, which ComfyUI's SD3 key map reads
through its diffusers-to-MMDiT table, q/k/v as slices of the fused qkv weight), its CLIP encoders
lora_te1/lora_te2 as for SDXL:

- LoRA/LoCon: `.lora_down.weight` (rank x in[, kh, kw]), `.lora_up.weight` (out x rank[, 1, 1]), `.alpha`;
  delta = alpha/rank * up @ down.
- LoHa: `.hada_w1_a`, `.hada_w1_b`, `.hada_w2_a`, `.hada_w2_b`, `.alpha`;
  delta = alpha/rank * (w1_a @ w1_b) * (w2_a @ w2_b) (Hadamard product), reshaped to the weight.
- LoKr: `.lokr_w1` or `.lokr_w1_a`/`.lokr_w1_b`, `.lokr_w2` or `.lokr_w2_a`/`.lokr_w2_b`, `.alpha`;
  delta = scale * kron(w1, w2), where the loaders use alpha/rank only when a factor is decomposed and
  1 when both are full matrices. peft scales by alpha/rank in both cases, so for two full factors
  the scale is folded into `lokr_w1` (and divided out again on reading).

- DoRA (LoRA/LoCon with `.dora_scale`): ComfyUI's and Forge's `weight_decompose` read a dora_scale
  with one entry per output row (shape out x 1[x 1 x 1]) as W' = (W + delta) * dora_scale / ||W||,
  the norm taken per output row of the base weight W; peft's DoRA is W' = m * (W + delta) / ||W + delta||.
  The file holds dora_scale = m * ||W|| / ||W + delta||, so both give peft's weight for the base the
  run trained on. A1111's built-in networks (and ComfyUI before its weight adapters) read dora_scale
  per input column only (shape 1 x in, norm of W + delta per column): no vector expresses peft's
  per-output-row magnitude that way, so those loaders do not apply this file's DoRA layers exactly.

peft and LyCORIS name these parameters alike, so the tensors are written as peft holds them.
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft.tuners.loha import LoHaLayer
from peft.tuners.lokr import LoKrLayer
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file

from sdft.errors import UserError
from sdft.lora import WEIGHT_NAME, apply_lora_state

KOHYA_WEIGHT_NAME = "pytorch_lora_weights_kohya.safetensors"
ADAPTER = "default"
DENOISER_PREFIXES = {"unet": "lora_unet", "transformer": "lora_transformer"}
LOHA_PARTS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
LOKR_PARTS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")


class AdapterFileError(UserError):
    """An adapter file that does not fit the model it is loaded into."""


def adapted_layers(modules: dict[str, torch.nn.Module],
                   text_encoder_prefixes: dict[str, str]) -> dict[str, torch.nn.Module]:
    """kohya name -> peft layer, for every adapted layer of every role. Text encoders' names carry
    the `text_model` level the UIs expect (transformers 5 dropped it from CLIPTextModel, not from
    CLIPTextModelWithProjection)."""
    layers = {}
    for role, module in modules.items():
        prefix = text_encoder_prefixes.get(role) or DENOISER_PREFIXES[role]
        level = "text_model." if role in text_encoder_prefixes and not hasattr(module, "text_model") else ""
        for name, layer in module.named_modules():
            if isinstance(layer, (LoraLayer, LoHaLayer, LoKrLayer)) and ADAPTER in layer.r:
                layers[kohya_name(prefix, level + name)] = layer
    return layers


def kohya_name(prefix: str, module_name: str) -> str:
    return f"{prefix}_{module_name.replace('.', '_')}"


def is_decomposed_lokr(layer: LoKrLayer) -> bool:
    return ADAPTER in layer.lokr_w1_a or ADAPTER in layer.lokr_w2_a


def layer_tensors(layer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The file entries of one layer (suffix -> tensor), in the layout the module docstring gives."""
    rank, scaling = layer.r[ADAPTER], layer.scaling[ADAPTER]
    alpha = torch.tensor(float(scaling * rank))
    if isinstance(layer, LoraLayer):
        tensors = {"lora_down.weight": layer.lora_A[ADAPTER].weight, "lora_up.weight": layer.lora_B[ADAPTER].weight,
                   "alpha": alpha}
        if layer.use_dora.get(ADAPTER):
            magnitude = layer.lora_magnitude_vector[ADAPTER].weight
            tensors["dora_scale"] = magnitude.detach().float().reshape(-1, *norm_shape(layer)) * dora_ratio(layer)
        return tensors
    if isinstance(layer, LoHaLayer):
        return {**{part: getattr(layer, part)[ADAPTER] for part in LOHA_PARTS}, "alpha": alpha}
    tensors = {part: getattr(layer, part)[ADAPTER] for part in LOKR_PARTS if ADAPTER in getattr(layer, part)}
    if not is_decomposed_lokr(layer):
        tensors["lokr_w1"] = tensors["lokr_w1"] * scaling
    return {**tensors, "alpha": alpha}


def norm_shape(layer: LoraLayer) -> list[int]:
    return [1] * (layer.get_base_layer().weight.dim() - 1)


def dora_ratio(layer: LoraLayer) -> torch.Tensor:
    """||W|| / ||W + delta|| per output row (shape out x 1[x 1 x 1]): the factor between peft's DoRA
    magnitude and the dora_scale ComfyUI and Forge read (module docstring)."""
    with torch.no_grad():
        base = layer.get_base_layer().weight.detach().float()
        adapted = base + layer.get_delta_weight(ADAPTER).float()
        rows = (base.shape[0], -1)
        ratio = base.reshape(rows).norm(dim=1) / adapted.reshape(rows).norm(dim=1)
    return ratio.reshape(-1, *norm_shape(layer))


def kohya_state(modules: dict[str, torch.nn.Module], text_encoder_prefixes: dict[str, str],
                dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    state = {}
    for name, layer in adapted_layers(modules, text_encoder_prefixes).items():
        for suffix, value in layer_tensors(layer).items():
            value = value.detach()
            if dtype is not None and suffix != "alpha":
                value = value.to(dtype)
            state[f"{name}.{suffix}"] = value.contiguous().cpu()
    return state


def save_kohya(directory: str | Path, modules: dict[str, torch.nn.Module], text_encoder_prefixes: dict[str, str],
               dtype: torch.dtype | None = None, metadata: dict[str, str] | None = None,
               name: str = KOHYA_WEIGHT_NAME) -> Path:
    """The adapters of `modules` in the kohya/LyCORIS layout, the file ComfyUI, A1111 and Forge load."""
    target = Path(directory) / name
    save_file(kohya_state(modules, text_encoder_prefixes, dtype), str(target), metadata=metadata)
    return target


def is_kohya_layout(state: dict[str, torch.Tensor]) -> bool:
    return any(key.startswith(("lora_unet_", "lora_te", "lora_transformer_")) for key in state)


def load_kohya(path: str | Path, modules: dict[str, torch.nn.Module], text_encoder_prefixes: dict[str, str]) -> None:
    """Copy a kohya/LyCORIS file into models that carry the same adapters; every layer must match in
    type, shape and alpha, else an error names the first key that does not."""
    state = load_file(str(path))
    layers = adapted_layers(modules, text_encoder_prefixes)
    in_file = sorted({key.split(".", 1)[0] for key in state})
    unknown = [name for name in in_file if name not in layers]
    if unknown:
        raise AdapterFileError(f"{path}: '{unknown[0]}' ({len(unknown)} entries in all) matches no adapted layer of "
                               "the model; check --lora_type, --lora_targets and the base model.")
    with torch.no_grad():
        for name, layer in layers.items():
            expected = layer_tensors(layer)
            for suffix, value in expected.items():
                key = f"{name}.{suffix}"
                check_entry(path, key, state.get(key), value)
            extra = sorted(k for k in state if k.startswith(name + ".") and k[len(name) + 1:] not in expected)
            if extra:
                raise AdapterFileError(f"{path}: '{extra[0]}' is another adapter type than the model's "
                                       f"{type(layer).__name__} layers (--lora_type).")
            copy_layer(layer, {suffix: state[f"{name}.{suffix}"] for suffix in expected})


def check_entry(path, key: str, found: torch.Tensor | None, expected: torch.Tensor) -> None:
    if found is None:
        raise AdapterFileError(f"{path} has no '{key}': the file adapts other layers or another adapter type "
                               "(--lora_type, --lora_targets).")
    if found.shape != expected.shape:
        raise AdapterFileError(f"{path}: '{key}' has shape {tuple(found.shape)}, the model's adapter "
                               f"{tuple(expected.shape)} (--rank, --conv_rank or LoKr factor differ).")
    if key.endswith(".alpha") and abs(float(found) - float(expected)) > 1e-6 * max(1.0, abs(float(expected))):
        raise AdapterFileError(f"{path}: '{key}' is {float(found):g}, the run's alpha {float(expected):g} "
                               "(--lora_alpha, --conv_alpha).")


def copy_layer(layer: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    if isinstance(layer, LoraLayer):
        layer.lora_A[ADAPTER].weight.copy_(tensors["lora_down.weight"])
        layer.lora_B[ADAPTER].weight.copy_(tensors["lora_up.weight"])
        if "dora_scale" in tensors:   # the magnitude back from the ratio written (module docstring)
            magnitude = layer.lora_magnitude_vector[ADAPTER].weight
            magnitude.copy_((tensors["dora_scale"].float() / dora_ratio(layer)).reshape(magnitude.shape))
        return
    for suffix, value in tensors.items():
        if suffix == "alpha":
            continue
        if isinstance(layer, LoKrLayer) and suffix == "lokr_w1" and not is_decomposed_lokr(layer):
            value = value / layer.scaling[ADAPTER]
        getattr(layer, suffix)[ADAPTER].copy_(value)


def load_adapter_file(path: str | Path, modules: dict[str, torch.nn.Module], pipeline_cls,
                      text_encoder_prefixes: dict[str, str]) -> None:
    """--init_lora: fill the run's fresh adapters from a kohya/LyCORIS file or a diffusers/PEFT LoRA
    file (a file, or a folder holding pytorch_lora_weights.safetensors). Type, layers, shapes and
    (kohya layout) alphas must match the run's adapter flags."""
    path = Path(path)
    if path.is_dir():
        path = path / WEIGHT_NAME
    state = load_file(str(path))
    if is_kohya_layout(state):
        load_kohya(path, modules, text_encoder_prefixes)
        return
    state = pipeline_cls.lora_state_dict(state)
    if isinstance(state, tuple):  # some pipelines also return network alphas
        state = state[0]
    try:
        apply_lora_state(state, modules, path)
    except ValueError as err:
        raise AdapterFileError(str(err)) from err
