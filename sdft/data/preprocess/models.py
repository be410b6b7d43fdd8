"""Loading the preprocessing models (BLIP, Swin2SR, CLIPSeg) through transformers."""

from __future__ import annotations

import torch

from sdft.errors import DataError


def helper_dtype(device: torch.device) -> torch.dtype:
    """Half precision on a GPU (these models are inference-only and tolerate it), float32 elsewhere."""
    return torch.float16 if device.type == "cuda" else torch.float32


def load_pretrained(model_cls, name: str, flag: str, cache_dir: str | None, **kwargs):
    try:
        return model_cls.from_pretrained(name, cache_dir=cache_dir, **kwargs)
    except (OSError, ValueError) as err:
        raise DataError(f"Could not load {flag} '{name}' as {model_cls.__name__}: {err}") from err
