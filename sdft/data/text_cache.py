"""Text-encoder outputs computed once per distinct caption while the text encoders are frozen.

The entry is what the family's `encode_text` returns for one caption (SD: the hidden states; SDXL:
those and the pooled output; SD3: the joint CLIP/T5 states and the pooled projections). The part
of the conditioning that depends on the images (SDXL's size/crop numbers) is still added per batch
by the family's `batch_condition`. Caption lists and caption dropout need nothing special: every
caption an item can carry, the empty one included, is a distinct caption and gets its entry.

An entry's name covers the caption, the encoders (source, config, precision), the tokenizers and
the family's text settings (SD3's --max_sequence_length).
"""

from __future__ import annotations

import dataclasses
import functools
from collections import OrderedDict

import torch

from sdft.conditioning import stack_conditions
from sdft.data import cache_store
from sdft.data.cache_store import Job

RECENT_ENTRIES = 64   # read-back entries kept (DreamBooth's one prompt is read from disk once)


def text_identity(family, models, path: str, revision: str | None, variant: str | None) -> dict:
    encoders = {role: {"config": module.config.to_dict(), "dtype": str(module.dtype)}
                for role, module in family.components(models).items() if role.startswith("text_encoder")}
    tokenizers = {field.name: {"name": getattr(models, field.name).name_or_path,
                               "size": len(getattr(models, field.name)),
                               "max_length": getattr(models, field.name).model_max_length}
                  for field in dataclasses.fields(models) if field.name.startswith("tokenizer")}
    return {"family": family.name, "path": path, "revision": revision, "variant": variant, "encoders": encoders,
            "tokenizers": tokenizers, "settings": family.text_settings()}


class TextCache:
    """`cache(batch)` is the text conditioning of `batch["captions"]`, read from the entries."""

    def __init__(self, store, identity_name: str, device: torch.device):
        self.store, self.identity_name, self.device = store, identity_name, device
        self.recent: OrderedDict[str, dict] = OrderedDict()

    def name(self, caption: str) -> str:
        return cache_store.entry_name({"kind": "text", "encoders": self.identity_name, "caption": caption})

    def entry(self, caption: str) -> dict:
        if caption in self.recent:
            self.recent.move_to_end(caption)
            return self.recent[caption]
        found = {key: value.to(self.device) for key, value in
                 self.store.read(self.name(caption), f"caption {caption!r}").items()}
        self.recent[caption] = found
        if len(self.recent) > RECENT_ENTRIES:
            self.recent.popitem(last=False)
        return found

    def __call__(self, batch: dict) -> dict:
        return stack_conditions([self.entry(caption) for caption in batch["captions"]])


def encode_caption_jobs(family, models, device: torch.device, keep_on_device: bool, chunk: list[Job]) -> list[dict]:
    with torch.no_grad():
        encoded = family.encode_text(models, [job.source for job in chunk], device)
    rows = []
    for index in range(len(chunk)):
        row = {key: value[index:index + 1] for key, value in encoded.items()}
        rows.append(row if keep_on_device else {key: value.cpu() for key, value in row.items()})
    return rows


def fill_text_cache(family, models, captions: set[str], store, identity: dict, device: torch.device, *,
                    process_index: int = 0, num_processes: int = 1, show_progress: bool = True,
                    batch_size: int = 8) -> tuple[TextCache, cache_store.FillResult]:
    cache = TextCache(store, cache_store.entry_name(identity), device)
    jobs = [Job(cache.name(caption), f"caption {caption!r}", caption) for caption in sorted(captions)]
    encode = functools.partial(encode_caption_jobs, family, models, device, not store.shared)
    result = cache_store.fill(store, jobs, encode, process_index=process_index, num_processes=num_processes,
                              desc="Caching text-encoder outputs", show_progress=show_progress,
                              batch_size=batch_size)
    return cache, result
