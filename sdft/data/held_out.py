"""Images held out of training for the validation loss (--validation_split, kohya's flag).

The split is a function of (--validation_seed, the number of images) only, and is made before the
training dataset exists, so a held-out image is never trained on, in any epoch or process.
"""

from __future__ import annotations

import dataclasses

import torch

from sdft.data.sources import CaptionedImages
from sdft.errors import DataError


def subset(images: CaptionedImages, rows: list[int]) -> CaptionedImages:
    # replace() keeps the other fields (e.g. the mask column) of the source.
    return dataclasses.replace(images, table=images.table.select(rows))


def split_held_out(images: CaptionedImages, fraction: float,
                   seed: int) -> tuple[CaptionedImages, CaptionedImages | None]:
    """(training images, held-out images): `fraction` of the rows (at least one), chosen with `seed`;
    both keep the source's order. A fraction of 0 holds none out."""
    if not fraction:
        return images, None
    total = len(images)
    held = max(1, int(total * fraction))
    if held >= total:
        raise DataError(f"--validation_split {fraction} of {total} image(s) leaves none to train on.")
    order = torch.randperm(total, generator=torch.Generator().manual_seed(seed)).tolist()
    return subset(images, sorted(order[held:])), subset(images, sorted(order[:held]))
