"""Where a base model is loaded from: a Hub id or local folder, plus revision/variant/cache."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ModelSource:
    path: str
    revision: str | None = None
    variant: str | None = None
    cache_dir: str | None = None
    denoiser_dtype: torch.dtype | None = None   # --full_bf16: read the trained weights as bf16, never as fp32
    # --full_bf16 with frozen text encoders: read them in the training precision too (an fp32 copy,
    # freed after the cast, stays in the allocator's heap: ~3 GB of SDXL's peak, benchmarks/README.md)
    text_encoder_dtype: torch.dtype | None = None
    # --base_precision: the denoiser's Linear weights stored in fp8/int8/nf4 as they are read
    # (sdft.quantization), from denoiser_dtype, the training dtype they compute in
    denoiser_storage: str | None = None

    def hub_kwargs(self) -> dict:
        """For configs and tokenizers, which have no weight variants."""
        return {"revision": self.revision, "cache_dir": self.cache_dir}

    def weight_kwargs(self) -> dict:
        return {**self.hub_kwargs(), "variant": self.variant}

    def denoiser_kwargs(self) -> dict:
        dtype = {} if self.denoiser_dtype is None else {"dtype": self.denoiser_dtype}
        return {**self.weight_kwargs(), **dtype}

    def text_encoder_kwargs(self) -> dict:
        dtype = {} if self.text_encoder_dtype is None else {"dtype": self.text_encoder_dtype}
        return {**self.weight_kwargs(), **dtype}
