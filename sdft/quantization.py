"""Quantized frozen bases (issue 22): `--base_precision fp8|int8|nf4` stores the frozen denoiser's
Linear weights in that format, `--text_encoder_precision` the frozen text encoders'; the adapters
that train on top stay fp32 and every layer computes in the run's training dtype (the weight is
dequantized inside the matmul).

The library is torchao, because it is the one that runs all three formats on both the CPU and
CUDA with the pinned torch 2.13 (checked with torchao 0.18.0): `Int8WeightOnlyConfig` and
`Float8WeightOnlyConfig` (one scale per output row) and its `NF4Tensor` (QLoRA's 4-bit NormalFloat,
blocks of 64 with double-quantized scales). bitsandbytes 0.50.2 has int8 and nf4 but no fp8 weight
format; optimum-quanto has no NF4 and its last release is from March 2025. peft wraps Linear layers
whose weight is a torchao tensor like any other (it ships a LoRA layer for torchao's int8), so the
adapters, their files and their loaders are the ones of an unquantized run: the exported LoRA is
for the full-precision base.

Only `torch.nn.Linear` layers are quantized (attention, feed-forward, projections: most of a
UNet's or an MMDiT's weights); convolutions, norms and embeddings keep the training dtype, as do
Linear layers whose weight is not in that dtype (modules a model keeps in fp32, e.g. T5's `wo`) and,
for nf4, layers whose size is not a multiple of the 64-value block.
"""

from __future__ import annotations

import importlib.util
import logging
import warnings
from dataclasses import dataclass

import torch

from sdft.errors import CliError

FORMATS = ("fp8", "int8", "nf4")
INSTALL = "pip install -r requirements-quantization.txt"   # torchao at the tested version
NF4_BLOCK = 64          # QLoRA's block size (Dettmers et al. 2023, arXiv:2305.14314)
NF4_SCALER_BLOCK = 256  # QLoRA's second-level block for the double-quantized scales
# Bytes a quantized weight takes per value, scales included (for the memory estimate):
# one byte plus one fp32 scale per row of >= 320 values for fp8/int8; nf4 half a byte, plus one
# 8-bit scale per block of 64 and an fp32 scale per 256 blocks.
STORAGE_BYTES = {"fp8": 1.0, "int8": 1.0, "nf4": 0.5 + 1 / NF4_BLOCK + 4 / (NF4_BLOCK * NF4_SCALER_BLOCK)}

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BasePrecision:
    """How the frozen weights are stored: a FORMATS entry per model part, None for the training dtype."""

    denoiser: str | None = None
    text_encoders: str | None = None

    @property
    def any(self) -> bool:
        return bool(self.denoiser or self.text_encoders)

    def describe(self) -> str:
        """For the model card and the log."""
        parts = [f"{what} {fmt}" for what, fmt in (("denoiser", self.denoiser), ("text encoders", self.text_encoders))
                 if fmt]
        return (f"trained against a quantized base ({', '.join(parts)}; torchao); the adapter applies to the "
                "full-precision base")


def resolve(base_precision: str | None, text_encoder_precision: str | None, fp8_base: bool,
            fp8_base_unet: bool) -> BasePrecision:
    """kohya's aliases: --fp8_base is fp8 for the denoiser and the text encoders, --fp8_base_unet
    for the denoiser only (community-trainers.md; sd-scripts' SD3/FLUX scripts)."""
    return BasePrecision(denoiser=base_precision or ("fp8" if fp8_base or fp8_base_unet else None),
                         text_encoders=text_encoder_precision or ("fp8" if fp8_base else None))


def require_library(flag: str) -> None:
    """Before any model loads: the library is installed, else an error naming the pip install."""
    if importlib.util.find_spec("torchao") is None:
        raise CliError(f"{flag} needs torchao: {INSTALL} (or pip install torchao).")


def _torchao():
    # torchao's import logs a warning per CUDA-only extension it cannot load (mxfp8, cutlass kernels):
    # none is used by weight-only formats, so the CPU log is not filled with them.
    torchao_logger = logging.getLogger("torchao")
    level = torchao_logger.level
    torchao_logger.setLevel(logging.ERROR)
    try:
        import torchao.quantization as quantization
    finally:
        torchao_logger.setLevel(level)
    # peft warns that its torchao LoRA layer cannot merge into the int8 weight; sdft never merges
    # into the quantized base (the adapter is exported on its own).
    warnings.filterwarnings("ignore", message="TorchaoLoraLinear was instantiated without")
    return quantization


def is_quantized(weight: torch.Tensor) -> bool:
    return type(weight.data) is not torch.Tensor


def _nf4_scaler_block(numel: int) -> int | None:
    """The largest second-level block (QLoRA's 256, or a smaller power of two for small layers)
    that divides the layer's count of 64-value blocks; None when the layer cannot be stored in NF4."""
    if numel % NF4_BLOCK:
        return None
    blocks, size = numel // NF4_BLOCK, NF4_SCALER_BLOCK
    while size > 1 and blocks % size:
        size //= 2
    return size if size > 1 else None


def _quantize_linear(quantization, layer: torch.nn.Linear, fmt: str) -> bool:
    weight = layer.weight
    if fmt == "nf4":
        scaler_block = _nf4_scaler_block(weight.numel())
        if scaler_block is None:
            return False
        nf4 = quantization.to_nf4(weight.data, block_size=NF4_BLOCK, scaler_block_size=scaler_block)
        layer.weight = torch.nn.Parameter(nf4, requires_grad=False)
        return True
    config = quantization.Int8WeightOnlyConfig() if fmt == "int8" else quantization.Float8WeightOnlyConfig()
    quantization.quantize_(layer, config)
    layer.weight.requires_grad_(False)
    return True


def quantize_linears(module: torch.nn.Module, fmt: str, dtype: torch.dtype) -> tuple[int, int]:
    """Quantize, in place, every Linear of `module` whose weight is loaded (not on the meta device),
    in `dtype` and not yet quantized. Returns (quantized, left in `dtype`) counts."""
    quantization = _torchao()
    done = kept = 0
    for layer in module.modules():
        if not isinstance(layer, torch.nn.Linear):
            continue
        weight = layer.weight
        if weight.is_meta or is_quantized(weight) or weight.dtype != dtype:
            continue
        if _quantize_linear(quantization, layer, fmt):
            done += 1
        else:
            kept += 1
    return done, kept


def quantized_size(module: torch.nn.Module) -> tuple[int, int]:
    """(quantized Linear layers, all Linear layers) of `module`, adapters' own layers aside, for the log."""
    linears = [layer for name, layer in module.named_modules()
               if isinstance(layer, torch.nn.Linear) and "lora_" not in name]
    return sum(is_quantized(layer.weight) for layer in linears), len(linears)


def log_quantized(role: str, module: torch.nn.Module, fmt: str) -> None:
    done, linears = quantized_size(module)
    logger.info("%s: %d of its %d Linear layers stored in %s (torchao); the rest in the training dtype.",
                role, done, linears, fmt)


def quantize_frozen(components: dict[str, torch.nn.Module], denoiser_role: str, precision: BasePrecision,
                    dtype: torch.dtype) -> None:
    """After loading: the text encoders' Linear weights in their format (the denoiser's were
    quantized as they were read, sdft.families.streamed_load), and a log line for each."""
    for role, module in components.items():
        fmt = precision.denoiser if role == denoiser_role else None if role == "vae" else precision.text_encoders
        if fmt is None:
            continue
        quantize_linears(module, fmt, dtype)
        log_quantized(role, module, fmt)
