"""Read a denoiser in a narrower dtype (--full_bf16) without holding its fp32 file in memory.

diffusers' from_pretrained memory-maps a whole safetensors shard and casts every tensor while the
map is open, so all of the shard's pages become resident at once: for SDXL's single ~10 GB fp32
UNet file that is ~10 GB of file-backed pages beside the 5 GB of bf16 weights (peak RSS 15.8 GiB,
benchmarks/README.md). Here the model is built on the meta device from its config and each tensor
is read, cast and kept while the file is open for at most CHUNK_BYTES of tensor data; closing it
unmaps the pages read so far, so at most one chunk of fp32 pages is resident at a time.

The result is the model from_pretrained(torch_dtype=dtype) gives (same weights bit for bit, same
config, eval mode; tests/unit/test_streamed_load.py). Files are found the way diffusers finds them
(a local folder or a Hub id, --variant, --revision, a sharded index); where no safetensors file
exists (.bin weights) or the class keeps modules in fp32, from_pretrained is used as is.
"""

from __future__ import annotations

import json

import accelerate
import torch
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFETENSORS_WEIGHTS_NAME
from diffusers.utils.hub_utils import _add_variant, _get_model_file
from safetensors import safe_open

from sdft.families.source import ModelSource
from sdft.quantization import quantize_linears

CHUNK_BYTES = 256 * 2**20   # fp32 pages resident at once while reading; small next to a UNet


def load_denoiser(model_cls: type[ModelMixin], source: ModelSource, subfolder: str,
                  revision: str | None = None) -> ModelMixin:
    """The trained denoiser; streamed tensor by tensor when it is read in a narrower dtype."""
    kwargs = source.denoiser_kwargs()
    if revision is not None:
        kwargs["revision"] = revision
    files = None
    if source.denoiser_dtype is not None and model_cls._keep_in_fp32_modules is None:
        files = _safetensors_files(source, subfolder, kwargs["revision"])
    if files is None:
        model = model_cls.from_pretrained(source.path, subfolder=subfolder, **kwargs)
        if source.denoiser_storage is not None:
            quantize_linears(model, source.denoiser_storage, source.denoiser_dtype)
        return model
    config = model_cls.load_config(source.path, subfolder=subfolder, revision=kwargs["revision"],
                                   cache_dir=source.cache_dir)
    if source.denoiser_storage is not None:
        return _build_quantized(model_cls, config, files, source.denoiser_dtype, source)
    return _build_streamed(model_cls, config, files, source.denoiser_dtype, source.path)


def _safetensors_files(source: ModelSource, subfolder: str, revision: str | None) -> list[str] | None:
    """The safetensors file(s) from_pretrained would read (one file, else the shards its index
    names), resolved by diffusers' own lookup; None when there are none."""
    where = {"subfolder": subfolder, "revision": revision, "cache_dir": source.cache_dir}
    try:
        return [_get_model_file(source.path, weights_name=_add_variant(SAFETENSORS_WEIGHTS_NAME, source.variant),
                                **where)]
    except OSError:
        pass
    try:
        index = _get_model_file(source.path, weights_name=_add_variant(SAFE_WEIGHTS_INDEX_NAME, source.variant),
                                **where)
    except OSError:
        return None
    with open(index) as handle:
        shards = sorted(set(json.load(handle)["weight_map"].values()))
    return [_get_model_file(source.path, weights_name=shard, **where) for shard in shards]


def _empty_model(model_cls: type[ModelMixin], config: dict, dtype: torch.dtype) -> ModelMixin:
    # Built under the target default dtype, as from_pretrained does, so buffers created in
    # __init__ (not in the file) get the same dtype.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with accelerate.init_empty_weights():
            model = model_cls.from_config(config)
    finally:
        torch.set_default_dtype(previous)
    return model


def _build_streamed(model_cls: type[ModelMixin], config: dict, files: list[str], dtype: torch.dtype,
                    name_or_path: str) -> ModelMixin:
    model = _empty_model(model_cls, config, dtype)
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(_read_cast(file, dtype))
    model.load_state_dict(state, strict=True, assign=True)
    model.register_to_config(_name_or_path=name_or_path)
    return model.eval()


def _build_quantized(model_cls: type[ModelMixin], config: dict, files: list[str], dtype: torch.dtype,
                     source: ModelSource) -> ModelMixin:
    """--base_precision: each chunk's Linear weights are quantized as soon as they are read, so the
    model is never held whole in `dtype` (sdft.quantization)."""
    model = _empty_model(model_cls, config, dtype)
    for file in files:
        for chunk in _chunks(file, dtype):
            model.load_state_dict(chunk, strict=False, assign=True)
            quantize_linears(model, source.denoiser_storage, dtype)
    missing = [name for name, param in model.named_parameters() if param.is_meta]
    if missing:
        raise KeyError(f"{files[0]}: no weight for {', '.join(missing[:5])}")
    model.register_to_config(_name_or_path=source.path)
    return model.eval()


def _read_cast(file: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every tensor of one safetensors file, floating ones cast to dtype."""
    out: dict[str, torch.Tensor] = {}
    for chunk in _chunks(file, dtype):
        out.update(chunk)
    return out


def _chunks(file: str, dtype: torch.dtype):
    """The tensors of one safetensors file, floating ones cast to dtype, CHUNK_BYTES at a time,
    reopening the file for each chunk so the memory map of what was already read is released."""
    with safe_open(file, framework="pt") as handle:
        keys = list(handle.keys())
    while keys:
        read = 0
        out: dict[str, torch.Tensor] = {}
        with safe_open(file, framework="pt") as handle:
            while keys and read < CHUNK_BYTES:
                tensor = handle.get_tensor(keys[0])
                read += tensor.numel() * tensor.element_size()
                # .to copies out of the map; a tensor already in dtype is cloned for the same reason
                out[keys.pop(0)] = tensor.to(dtype, copy=True) if tensor.is_floating_point() else tensor.clone()
        yield out
