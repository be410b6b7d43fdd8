"""Filling the latent and text-encoder caches before training (the trainer's `precompute`).

Which caches exist is decided by the flags (`CacheSettings`, built in sdft/builders.py):

- latents: --cache_latents (RAM) or --cache_latents_to_disk (files under <folder>/latents);
- text-encoder outputs, only with frozen text encoders: --cache_text_encoder_outputs (RAM) or
  --cache_text_encoder_outputs_to_disk (files under <folder>/text); without either flag a dataset
  with at most `caption_limit` distinct captions is still encoded once, in RAM, as it always was.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

from accelerate.utils import gather_object

from sdft.data.cache_store import DiskStore, FillResult, MemoryStore
from sdft.data.captions import MAX_CAPTION_VARIANTS, planned_variants
from sdft.data.latent_cache import VaeEncoder, fill_latent_cache, vae_identity
from sdft.data.text_cache import TextCache, fill_text_cache, text_identity

logger = logging.getLogger("sdft")


@dataclass(frozen=True)
class CacheSettings:
    latents: bool = False
    latents_to_disk: bool = False
    text: bool = False
    text_to_disk: bool = False
    folder: Path | None = None       # --latents_cache_dir, for both disk caches


def fill_caches(family, models, dataset, accelerator, settings: CacheSettings, source, *,
                train_text_encoders: bool, caption_limit: int = 64, epochs: int = 1,
                split: tuple[int, int] | None = None) -> tuple[TextCache | None, list[str]]:
    """Fill the caches `settings` asks for; returns the text cache and the roles it made idle.
    `epochs`: how many epochs the run trains, for the caption variants of caption augmentation.
    `split`: (index, count) of this process among those sharing the cache folder (sdft.nodes), by
    default all of them."""
    index, count = split or (accelerator.process_index, accelerator.num_processes)
    where = dict(process_index=index, num_processes=count, show_progress=accelerator.is_local_main_process)
    idle, results = [], {}
    if settings.latents:
        store = DiskStore(settings.folder / "latents") if settings.latents_to_disk else MemoryStore()
        identity = vae_identity(models.vae, source.path, source.revision, source.variant)
        dataset.latent_cache, results["latents"] = fill_latent_cache(
            dataset, VaeEncoder(models.vae, accelerator.device), identity, store, **where)
        idle.append("vae")
    text_cache = None
    captions = None if train_text_encoders else dataset.distinct_captions(math.inf if settings.text else caption_limit)
    if captions is None and settings.text and not train_text_encoders:
        captions = augmented_captions(dataset, epochs)
    if captions is not None:
        store = DiskStore(settings.folder / "text") if settings.text_to_disk else MemoryStore()
        identity = text_identity(family, models, source.path, source.revision, source.variant)
        text_cache, results["text-encoder outputs"] = fill_text_cache(
            family, models, captions, store, identity, accelerator.device, **where)
        idle += [role for role in family.components(models) if role.startswith("text_encoder")]
    if results:
        report(accelerator, results)
    return text_cache, idle


def augmented_captions(dataset, epochs: int) -> set[str] | None:
    """With shuffled or dropped tags, every caption the run will show is known in advance (a pure
    function of seed, epoch and item: sdft.data.captions), so the text cache holds exactly those
    variants. kohya refuses the text cache with caption augmentation (kohya #886, #1460, #1750).
    None, and encoding every step, when there are too many or an item has several captions."""
    found = planned_variants(dataset.caption_items(), dataset.seed, epochs)
    if found is None:
        logger.warning("Not caching text-encoder outputs: the augmented captions of %d epoch(s) are more than %d "
                       "variants (or images have several captions to choose from), so the text encoders stay "
                       "loaded and encode every step.", epochs, MAX_CAPTION_VARIANTS)
        return None
    found |= dataset.extra_captions()
    logger.info("Caption augmentation: caching %d caption variants for %d epoch(s).", len(found), epochs)
    return found


def cache_folder(latents_cache_dir: str | None, output_dir: str | Path) -> Path:
    """--latents_cache_dir, or <output_dir>/cache."""
    return Path(latents_cache_dir) if latents_cache_dir else Path(output_dir) / "cache"


def report(accelerator, results: dict[str, FillResult]) -> None:
    """One line per cache: how many entries each process encoded and how many it found ready. The
    wait is short: every process has already seen every entry on disk."""
    accelerator.wait_for_everyone()
    everyone = gather_object([results]) if accelerator.num_processes > 1 else [results]
    for kind in results:
        encoded = [process[kind].encoded for process in everyone]
        reused = sum(process[kind].reused for process in everyone)
        shares = ", ".join(f"process {index}: {count}" for index, count in enumerate(encoded))
        logger.info("Cached %s: %d encoded (%s), %d reused", kind, sum(encoded), shares, reused)
