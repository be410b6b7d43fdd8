"""Conditioning computed once per distinct caption when the text encoders are frozen.

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


class ConditionCache:
    """The text part of the conditioning (`family.encode_text`) per distinct caption; the part that
    depends on the images (SDXL's size/crop numbers) is still added per batch by the trainer."""

    def __init__(self, family, models, device: torch.device, captions: set[str]):
        with torch.no_grad():
            self.entries = {caption: family.encode_text(models, [caption], device) for caption in sorted(captions)}

    def __call__(self, batch: dict) -> dict:
        return stack_conditions([self.entries[caption] for caption in batch["captions"]])
