"""Batching per-caption conditioning (the entries of sdft.data.text_cache).

DreamBooth runs see one or two prompts for thousands of steps; encoding them once and keeping the
embeddings spares the text encoders (T5-XXL alone is ~9 GB in fp16), which can then wait on the CPU
until validation needs them.
"""

from __future__ import annotations

import torch


def stack_conditions(items: list[dict]) -> dict:
    """Concatenate per-caption condition dicts (tensors with batch 1, possibly nested) on the batch axis."""
    first = items[0]
    return {key: stack_conditions([item[key] for item in items]) if isinstance(first[key], dict)
            else torch.cat([item[key] for item in items]) for key in first}


def prompt_texts(prompt: str, negative_prompt: str | None) -> dict:
    """A pipeline call's prompt arguments as texts, for a family whose pipeline encodes them as training does."""
    return {"prompt": prompt, **({"negative_prompt": negative_prompt} if negative_prompt is not None else {})}
