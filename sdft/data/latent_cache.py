"""VAE latents: sampled per step from the images, or from posteriors encoded once (--cache_latents).

A cached entry is the posterior's moments (mean and log-variance), so every step still draws a
fresh sample with the step's generator, as it would from the image. Entries are keyed by image,
not by position in a shuffled loader, so each latent stays with its own caption (diffusers #14430:
upstream indexes its cache by step and pairs latents with the wrong captions after a reshuffle).
"""

from __future__ import annotations

import logging

import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)


def sample_latents(vae, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return vae.encode(pixels.to(vae.dtype)).latent_dist.sample(generator=generator)


def sample_from_moments(moments: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return DiagonalGaussianDistribution(moments).sample(generator=generator)


@torch.no_grad()
def fill_latent_cache(dataset, vae, device: torch.device, show_progress: bool = True) -> dict:
    """Encode each distinct image of `dataset` once (its `cache_items()`). The moments live on the
    CPU: they are small, and data-loading workers cannot hand CUDA tensors around."""
    cache = {}
    for key, example in tqdm(dataset.cache_items(), desc="Caching latents", total=len(dataset.cache_keys()),
                             disable=not show_progress):
        pixels = example["pixel_values"].unsqueeze(0).to(device)
        cache[key] = vae.encode(pixels.to(vae.dtype)).latent_dist.parameters[0].cpu()
    logger.info("Cached the latents of %d images", len(cache))
    return cache
