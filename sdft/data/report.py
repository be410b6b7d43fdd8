"""`--dry_run`: what the data of a run is, read from the sources without loading a model.

The report holds the items per epoch (per subset for a kohya config or N_name folders), the
batches and optimizer steps per epoch, the bucket table per dataset, three example captions of
epoch 0 as the text encoder would see them (augmentation applied), and how many caption variants a
text-encoder cache would hold.
"""

from __future__ import annotations

import math

from sdft.data.captions import augment_caption, caption_rng, planned_variants
from sdft.data.dataset import loader_order


def data_report(dataset, *, batch_size: int, seed: int, gradient_accumulation_steps: int,
                max_train_steps: int | None, num_train_epochs: int) -> str:
    sampler, _ = loader_order(dataset, batch_size, seed)
    batches = len(sampler) if hasattr(sampler, "groups") else math.ceil(len(dataset) / batch_size)
    steps = math.ceil(batches / gradient_accumulation_steps)
    epochs = math.ceil(max_train_steps / steps) if max_train_steps else num_train_epochs
    lines = [f"Items per epoch: {len(dataset)}; batches per epoch: {batches}; optimizer steps per epoch: {steps} "
             f"(one process); epochs: {epochs}"]
    for part in getattr(dataset, "parts", []):
        lines.append(f"  {part.where}: {len(part.images)} images x {part.repeats} repeats"
                     f"{' (regularisation)' if part.is_reg else ''}, {part.transform.resolution}px, "
                     f"batch {part.batch_size}")
        if part.buckets is not None:
            lines += ["    " + row for row in part.buckets.table().splitlines()]
    if getattr(dataset, "buckets", None) is not None:
        lines += ["  " + row for row in dataset.buckets.table().splitlines()]
    items = dataset.caption_items()
    lines.append("Example captions of epoch 0:")
    lines += [f"  {augment_caption(captions[0], settings, 0, caption_rng(seed, 0, index))!r}"
              for index, captions, settings in items[:3]]
    variants = planned_variants(items, seed, epochs)
    lines.append(f"Text-encoder cache: {len(variants | dataset.extra_captions())} caption variants for {epochs} "
                 "epoch(s)" if variants is not None else
                 "Text-encoder cache: too many caption variants (or several captions per image): encoded every step")
    return "\n".join(lines)
