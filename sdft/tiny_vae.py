"""Fit a tiny VAE to the synthetic shape images, so that the tiny models' pictures mean something.

A randomly initialised AutoencoderKL decodes every latent to coloured noise, so a demo trained on
it shows nothing even when the denoiser learned well. A few hundred Adam steps on generated 32 px
images (seconds to a minute on two CPU cores) give an autoencoder that reconstructs the shapes.
Afterwards the latent scaling is set from the fitted latents' statistics, as for the real VAEs
(SD's 0.18215 is 1/std of its latents; SD3 also subtracts a mean, `shift_factor`), so the
denoiser sees latents of roughly unit variance.

The fit is seeded: the same seed gives the same weights on the same machine and thread count.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL

__all__ = ["VaeFit", "fit_vae", "latent_statistics", "reconstruction_error"]


@dataclass(frozen=True)
class VaeFit:
    steps: int
    final_loss: float        # mean absolute pixel error (on [-1, 1]) of the last batch
    scaling_factor: float
    shift_factor: float | None


def fit_vae(vae: AutoencoderKL, images: torch.Tensor, *, seed: int, steps: int = 400, batch_size: int = 16,
            learning_rate: float = 3e-3, kl_weight: float = 1e-6, with_shift: bool = False) -> VaeFit:
    """Train `vae` in place on `images` (N, 3, H, W in [-1, 1]), then set its latent scaling.

    The loss is L1 on pixels plus a small KL term (the weight of SD's autoencoder recipe) that
    keeps the posterior a distribution, so `latent_dist.sample()` stays close to its mean.
    """
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(vae.parameters(), lr=learning_rate)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=learning_rate, total_steps=steps,
                                                   pct_start=0.1)
    vae.train()
    loss = torch.zeros(())
    for _ in range(steps):
        batch = images[torch.randint(len(images), (batch_size,), generator=generator)]
        posterior = vae.encode(batch).latent_dist
        latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        decoded = vae.decode(latents).sample
        loss = (decoded - batch).abs().mean()
        total = loss + kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        schedule.step()
    vae.eval()
    mean, std = latent_statistics(vae, images)
    shift = mean if with_shift else None
    # Without a shift the scale must cover the mean too: SD scales raw latents, x * s.
    spread = std if with_shift else (std**2 + mean**2) ** 0.5
    vae.register_to_config(scaling_factor=round(1.0 / spread, 5),
                           shift_factor=None if shift is None else round(shift, 5))
    return VaeFit(steps, float(loss.detach()), vae.config.scaling_factor, vae.config.shift_factor)


@torch.no_grad()
def latent_statistics(vae: AutoencoderKL, images: torch.Tensor) -> tuple[float, float]:
    """Mean and standard deviation over all latent values of the posterior means."""
    latents = vae.encode(images).latent_dist.mean
    return float(latents.mean()), float(latents.std())


@torch.no_grad()
def reconstruction_error(vae: AutoencoderKL, images: torch.Tensor) -> float:
    """Mean absolute error, in 0..255 pixel units, of decoding the posterior mean."""
    decoded = vae.decode(vae.encode(images).latent_dist.mean).sample.clamp(-1, 1)
    return float((decoded - images).abs().mean() * 127.5)
