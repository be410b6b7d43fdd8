"""VAE latents: sampled per step from the images, or from posteriors encoded once (--cache_latents).

A cached entry is the posterior's moments (mean and log-variance), so every step still draws a
fresh sample with the step's generator, as it would from the image. Entries are keyed by image,
not by position in a shuffled loader, so each latent stays with its own caption (diffusers #14430:
upstream indexes its cache by step and pairs latents with the wrong captions after a reshuffle).

The transform of a cached image is fixed per image (crop corner drawn once); with --random_flip
both the image and its mirror image are cached and every epoch's seeded draw picks one. An entry's
name covers the image's content, the VAE, and the transform placement (target size, crop, flip,
interpolation), so a per-image target size (aspect buckets) needs no other change here.

With --cache_latents_to_disk the entries are files read one at a time by the dataset, so memory
does not grow with the number of images; in RAM (--cache_latents alone) they all stay in memory.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import random
from dataclasses import dataclass
from typing import Callable, Hashable

import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from sdft.data import cache_store
from sdft.data.cache_store import Job
from sdft.data.transforms import ImageTransform, Placement, upright_size

logger = logging.getLogger(__name__)


def sample_latents(vae, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return vae.encode(pixels.to(vae.dtype)).latent_dist.sample(generator=generator)


def sample_from_moments(moments: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return DiagonalGaussianDistribution(moments).sample(generator=generator)


@dataclass(frozen=True)
class CacheImage:
    """One distinct image as a cache sees it; `plans` holds one placement, or two with a flip."""

    label: str                        # names the image in warnings and errors
    identity: str                     # its content (hash, or path + size + mtime)
    plans: tuple[Placement, ...]


def describe_image(transform: ImageTransform, header, label: str, identity: str, rng: random.Random,
                   target: tuple[int, int] | None = None, mask=None) -> CacheImage:
    """The fixed placement(s) of an image opened without decoding (`header`): the crop is drawn
    from `rng` once (or centred on `mask` with crop_to_mask); with --random_flip the mirror image
    of that crop is kept too."""
    plain = transform.place(upright_size(header), rng, target, mask=mask, flip=False)
    if not transform.random_flip:
        return CacheImage(label, identity, (plain,))
    (top, left), width = plain.crop_top_left, plain.resized_size[1]
    mirrored = dataclasses.replace(plain, flip=True, crop_top_left=(top, width - left - plain.target_size[1]))
    return CacheImage(label, identity, (plain, mirrored))


def describe_placement(placement: Placement, interpolation: str) -> dict:
    """What a latent depends on besides the image and the VAE: an aspect bucket changes the target."""
    return {"target": list(placement.target_size), "resized": list(placement.resized_size),
            "crop": list(placement.crop_top_left), "flip": placement.flip,
            "original": list(placement.original_size), "interpolation": interpolation}


def vae_identity(vae, path: str, revision: str | None, variant: str | None) -> dict:
    """What a latent depends on besides the image: the VAE's source, config and precision."""
    return {"path": path, "revision": revision, "variant": variant, "dtype": str(vae.dtype),
            "config": dict(vae.config)}


class LatentCache:
    """Maps a dataset's cache keys to entries; `draw` picks the flip variant with the item's rng."""

    def __init__(self, store, names: dict[Hashable, tuple[str, ...]]):
        self.store = store
        self.names = names

    def draw(self, key: Hashable, rng: random.Random) -> dict:
        names = self.names.get(key)
        if names is None:
            raise RuntimeError(f"The latent cache has no entry for {key}: fill it with every key of "
                               "cache_keys(), in this process, before reading items.")
        name = names[int(rng.random() < 0.5)] if len(names) == 2 else names[0]
        entry = self.store.read(name, str(key))
        item = {"latent_moments": entry["moments"], "original_size": tuple(entry["original_size"].tolist()),
                "crop_top_left": tuple(entry["crop_top_left"].tolist()),
                "target_size": tuple(entry["target_size"].tolist())}
        if "mask" in entry:   # cut with the same crop and flip as the latent
            item["mask"] = entry["mask"]
        return item


def latent_jobs(dataset, vae_id: dict) -> tuple[list[Job], dict[Hashable, tuple[str, ...]]]:
    jobs, names = [], {}
    interpolation = dataset.transform.interpolation
    for key in dataset.cache_keys():
        image = dataset.cache_image(key)
        variants = []
        for plan in image.plans:
            name = cache_store.entry_name({"kind": "latent", "image": image.identity, "vae": vae_id,
                                           "transform": describe_placement(plan, interpolation)})
            jobs.append(Job(name, image.label, (key, plan)))
            variants.append(name)
        names[key] = tuple(variants)
    return jobs, names


def fill_latent_cache(dataset, encode: Callable[[torch.Tensor], torch.Tensor], vae_id: dict, store, *,
                      process_index: int = 0, num_processes: int = 1,
                      show_progress: bool = True) -> tuple[LatentCache, cache_store.FillResult]:
    """Encode every distinct image of `dataset` (its `cache_keys()`) that `store` lacks. `encode`
    maps pixels (B,3,H,W) to posterior moments (B,2C,h,w)."""
    jobs, names = latent_jobs(dataset, vae_id)
    encode_jobs = functools.partial(encode_latent_jobs, dataset, encode)
    result = cache_store.fill(store, jobs, encode_jobs, process_index=process_index, num_processes=num_processes,
                              desc="Caching latents", show_progress=show_progress)
    return LatentCache(store, names), result


def encode_latent_jobs(dataset, encode: Callable[[torch.Tensor], torch.Tensor], chunk: list[Job]) -> list[dict]:
    entries = []
    for job in chunk:
        key, plan = job.source
        out = dataset.cache_pixels(key, plan)
        # A copy, never a view: on the CPU a view would keep the encoder's whole output buffer alive.
        entry = {"moments": encode(out.pixels.unsqueeze(0))[0].to("cpu", copy=True),
                 "original_size": torch.tensor(plan.original_size), "crop_top_left": torch.tensor(plan.crop_top_left),
                 "target_size": torch.tensor(plan.target_size)}
        if out.mask is not None:
            entry["mask"] = out.mask
        entries.append(entry)
    return entries


class VaeEncoder:
    """Pixels to posterior moments on `device`; a class (not a closure) so it is plain to test."""

    def __init__(self, vae, device: torch.device):
        self.vae, self.device = vae, device

    @torch.no_grad()
    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(pixels.to(self.device, self.vae.dtype)).latent_dist.parameters
