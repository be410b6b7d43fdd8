"""Training objectives as pure tensor functions.

Everything here maps tensors to tensors: no device moves, no logging, no
mutation of schedulers or inputs. All randomness comes from an explicit
``torch.Generator`` so that a resumed run replays the same draws (the trainer
derives one generator per micro-step). Random tensors are drawn in float32 on
the device of the latents, whatever the latents' dtype, so the draws do not
depend on mixed-precision settings.

Two families:

* ``DDPMObjective``: discrete-time diffusion (SD 1.x/2.x, SDXL), Ho et al. 2020
  (arXiv 2006.11239), v-prediction from Salimans & Ho 2022 (arXiv 2202.00512).
* ``FlowMatchingObjective``: rectified flow as trained for SD3, Esser et al.
  2024 (arXiv 2403.03206).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from diffusers.training_utils import (
    compute_density_for_timestep_sampling,
    compute_loss_weighting_for_sd3,
)
from torch import Tensor

__all__ = [
    "PREDICTION_TYPES",
    "TIMESTEP_BIAS_STRATEGIES",
    "FLOW_WEIGHTING_SCHEMES",
    "Noised",
    "DDPMObjective",
    "FlowMatchingObjective",
    "snr_from_alphas_cumprod",
    "min_snr_weights",
    "validate_timestep_bias",
    "timestep_bias_weights",
    "flow_sigma_table",
    "split_prior",
    "latent_mask",
    "masked_per_sample_mse",
]

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_BIAS_STRATEGIES = ("none", "earlier", "later", "range")
FLOW_WEIGHTING_SCHEMES = ("logit_normal", "mode", "uniform", "sigma_sqrt", "cosmap", "none")

# Range of the "mode" density's scale for which f_mode is a bijection of [0, 1]
# (Esser et al. 2024, arXiv 2403.03206, paragraph "Mode Sampling with Heavy Tails").
_MODE_SCALE_MIN, _MODE_SCALE_MAX = -1.0, 2.0 / (math.pi - 2.0)


# eq=False: a generated __eq__ would compare tensors and raise "ambiguous truth value".
@dataclass(frozen=True, eq=False)
class Noised:
    """One noised batch: what the denoiser sees and what its output is compared with."""

    noisy: Tensor  # x_t, same shape/dtype as the latents
    timesteps: Tensor  # (B,) DDPM: int64 indices; flow: float32 = 1000 * sigma from the table
    target: Tensor  # float32 regression target, same shape as the latents
    weighting: Tensor  # (B,) float32 per-sample loss weight
    sigmas: Tensor | None = None  # flow matching only: (B, 1, ..., 1) float32


def _per_sample(values: Tensor, like: Tensor) -> Tensor:
    """Reshape (B,) to (B, 1, ..., 1) so it broadcasts against ``like``."""
    return values.reshape(values.shape[0], *([1] * (like.ndim - 1)))


def _per_sample_mse(pred: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
    """(B,) mean squared error over all non-batch dims, computed in float32; with a latent-grid
    `mask` (B, 1, h, w), the masked mean (see `masked_per_sample_mse`)."""
    if pred.shape != target.shape:
        # Broadcasting would silently compute a different loss.
        raise ValueError(f"prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    squared = (pred.float() - target.float()) ** 2
    if mask is not None:
        return masked_per_sample_mse(squared, mask)
    return squared.reshape(squared.shape[0], -1).mean(dim=1)


# --------------------------------------------------------------------------- masked loss


def latent_mask(mask: Tensor, size: tuple[int, int]) -> Tensor:
    """A pixel mask (B, 1, H, W) in [0, 1] on the latent grid (B, 1, h, w): each latent pixel gets
    the mean of the pixels it covers (an exact box average when H/h is an integer, as with the VAE's
    factor of 8), so a half-covered latent pixel counts half."""
    return torch.nn.functional.adaptive_avg_pool2d(mask.float(), size)


def masked_per_sample_mse(squared: Tensor, mask: Tensor) -> Tensor:
    """(B,) masked mean of squared errors (B, C, h, w) under a latent-grid mask (B, 1, h, w):

        loss_b = Σ_{c,h,w} m_bhw · e_bchw / (C · Σ_{h,w} m_bhw)

    Normalising by the mask's own area keeps the loss scale independent of how much of the image
    the subject covers (an all-ones mask gives exactly the plain mean). An all-zero mask gives 0
    and no gradient.
    """
    if mask.ndim != squared.ndim or mask.shape[0] != squared.shape[0] or mask.shape[1] != 1 \
            or mask.shape[2:] != squared.shape[2:]:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not fit errors of shape {tuple(squared.shape)}: "
                         "expected (B, 1, h, w) on the latent grid")
    weights = mask.float().expand_as(squared)
    batch = squared.shape[0]
    total = weights.reshape(batch, -1).sum(dim=1)
    return (squared * weights).reshape(batch, -1).sum(dim=1) / total.clamp(min=torch.finfo(torch.float32).tiny)


# --------------------------------------------------------------------------- Min-SNR


def snr_from_alphas_cumprod(alphas_cumprod: Tensor, timesteps: Tensor) -> Tensor:
    """SNR_t = ᾱ_t / (1 − ᾱ_t) per timestep, float32 (inf where ᾱ_t = 1, 0 where ᾱ_t = 0)."""
    alpha_bar = alphas_cumprod[timesteps].float()
    return alpha_bar / (1.0 - alpha_bar)


def min_snr_weights(snr: Tensor, gamma: float, prediction_type: str) -> Tensor:
    """Min-SNR-γ loss weights (Hang et al. 2023, arXiv 2303.09556).

    The paper's weight on the x0-loss is min(SNR, γ); the ε-loss equals SNR times
    the x0-loss and the v-loss (SNR + 1) times it, hence the divisions below.
    Finite for SNR in [0, inf] (zero-terminal-SNR schedules reach SNR = 0).
    """
    if not (gamma > 0 and math.isfinite(gamma)):
        raise ValueError(f"--snr_gamma must be a finite number > 0, got {gamma}")
    snr = snr.float()
    if prediction_type == "epsilon":
        # min(SNR, γ)/SNR rewritten as γ/max(SNR, γ): equal for SNR > 0, and its
        # SNR → 0 limit (1) instead of 0/0 at the zero-terminal-SNR step (arXiv 2305.08891).
        return gamma / snr.clamp(min=gamma)
    if prediction_type == "v_prediction":
        return snr.clamp(max=gamma) / (snr + 1.0)  # γ/inf = 0 when ᾱ = 1
    if prediction_type == "sample":
        return snr.clamp(max=gamma)
    raise ValueError(f"unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}")


# --------------------------------------------------------------------------- timestep bias


def validate_timestep_bias(
    strategy: str, multiplier: float, begin: int, end: int, portion: float
) -> None:
    """Check the timestep-bias flags that do not depend on the scheduler; raises ValueError.

    Usable at argument-parsing time. Flags that the chosen strategy ignores are
    not checked, except the multiplier, which is never meaningful when <= 0.
    """
    if strategy not in TIMESTEP_BIAS_STRATEGIES:
        raise ValueError(f"--timestep_bias_strategy must be one of {TIMESTEP_BIAS_STRATEGIES}, got {strategy!r}")
    if not (multiplier > 0 and math.isfinite(multiplier)):  # also rejects NaN
        raise ValueError(f"--timestep_bias_multiplier must be a finite number > 0, got {multiplier}")
    if strategy in ("earlier", "later") and not 0 < portion <= 1:
        raise ValueError(f"--timestep_bias_portion must be in (0, 1], got {portion}")
    if strategy == "range":
        if begin < 0:
            raise ValueError(f"--timestep_bias_begin must be >= 0, got {begin}")
        if begin >= end:
            raise ValueError(
                f"--timestep_bias_begin ({begin}) must be < --timestep_bias_end ({end}); the end is exclusive"
            )


def timestep_bias_weights(
    strategy: str,
    num_timesteps: int,
    multiplier: float = 1.0,
    begin: int = 0,
    end: int = 1000,
    portion: float = 0.25,
) -> Tensor:
    """(T,) float32 sampling weights over DDPM timesteps, normalised to sum 1.

    "later" multiplies the last n = int(portion·T) timesteps (highest t, noisiest),
    "earlier" the first n, "range" the indices begin..end−1 (end exclusive, like
    the slice in the SDXL fine-tuning script; portion ignored), "none" is uniform.
    """
    validate_timestep_bias(strategy, multiplier, begin, end, portion)
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
    weights = torch.ones(num_timesteps, dtype=torch.float32)
    if strategy in ("earlier", "later"):
        n = int(portion * num_timesteps)
        if n == 0:
            # Upstream slices weights[-0:], i.e. the whole table, and silently biases everything.
            raise ValueError(
                f"--timestep_bias_portion={portion} selects no timestep out of {num_timesteps}"
            )
        biased = slice(num_timesteps - n, None) if strategy == "later" else slice(0, n)
        weights[biased] *= multiplier
    elif strategy == "range":
        if end > num_timesteps:
            raise ValueError(
                f"--timestep_bias_end must be <= the number of training timesteps ({num_timesteps}), got {end}"
            )
        weights[begin:end] *= multiplier
    return weights / weights.sum()


# --------------------------------------------------------------------------- DDPM


@dataclass(frozen=True, eq=False)
class DDPMObjective:
    """Discrete-time denoising objective (Ho et al. 2020, arXiv 2006.11239).

    ``alphas_cumprod`` and ``timestep_weights`` must already be on the training
    device; the generator passed to ``noise`` must be on that device too.
    """

    alphas_cumprod: Tensor  # (T,) float32
    prediction_type: str  # "epsilon" | "v_prediction" | "sample"
    snr_gamma: float | None = None  # Min-SNR-γ (Hang et al. 2023, arXiv 2303.09556)
    noise_offset: float = 0.0  # (Guttenberg 2023, "Diffusion with Offset Noise")
    input_perturbation: float = 0.0  # (Ning et al. 2023, arXiv 2301.11706)
    timestep_weights: Tensor | None = None  # (T,) timestep-bias sampling weights; None = uniform

    def __post_init__(self) -> None:
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"unknown prediction_type {self.prediction_type!r}; expected one of {PREDICTION_TYPES}"
            )
        if self.alphas_cumprod.ndim != 1:
            raise ValueError(f"alphas_cumprod must be 1-D, got shape {tuple(self.alphas_cumprod.shape)}")
        if self.snr_gamma is not None:
            min_snr_weights(torch.ones(1), self.snr_gamma, self.prediction_type)  # validates γ
        weights, alphas = self.timestep_weights, self.alphas_cumprod
        if weights is not None and (weights.shape != alphas.shape or weights.device != alphas.device):
            raise ValueError(
                "timestep_weights must match alphas_cumprod in shape and device: "
                f"{tuple(weights.shape)}@{weights.device} vs {tuple(alphas.shape)}@{alphas.device}"
            )

    def _sqrt_alphas(self, timesteps: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        """(sqrt(ᾱ_t), sqrt(1 − ᾱ_t)) as float32, broadcastable against ``like``."""
        alpha_bar = _per_sample(self.alphas_cumprod[timesteps].float(), like)
        return alpha_bar.sqrt(), (1.0 - alpha_bar).sqrt()

    def _sample_timesteps(self, batch_size: int, device: torch.device, generator: torch.Generator) -> Tensor:
        if self.timestep_weights is None:
            num_timesteps = self.alphas_cumprod.shape[0]
            return torch.randint(0, num_timesteps, (batch_size,), generator=generator, device=device)
        return torch.multinomial(self.timestep_weights, batch_size, replacement=True, generator=generator)

    def _sample_noise(self, latents: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """(ε used as the target, ε' used to build x_t), float32."""
        def randn(shape: tuple[int, ...]) -> Tensor:
            return torch.randn(shape, generator=generator, device=latents.device, dtype=torch.float32)

        eps = randn(tuple(latents.shape))
        if self.noise_offset:
            # One constant per sample and channel shifts the mean brightness the model can
            # produce (Guttenberg 2023, "Diffusion with Offset Noise").
            eps = eps + self.noise_offset * randn(tuple(latents.shape[:2]) + (1,) * (latents.ndim - 2))
        eps_input = eps
        if self.input_perturbation:
            # Only the input is perturbed; the target keeps ε (Ning et al. 2023, arXiv 2301.11706).
            eps_input = eps + self.input_perturbation * randn(tuple(latents.shape))
        return eps, eps_input

    def noise(self, latents: Tensor, generator: torch.Generator) -> Noised:
        """Draw t, ε and build x_t = sqrt(ᾱ_t)·x0 + sqrt(1 − ᾱ_t)·ε' with its target."""
        timesteps = self._sample_timesteps(latents.shape[0], latents.device, generator)
        eps, eps_input = self._sample_noise(latents, generator)
        x0 = latents.float()
        sqrt_ab, sqrt_one_minus_ab = self._sqrt_alphas(timesteps, latents)
        noisy = (sqrt_ab * x0 + sqrt_one_minus_ab * eps_input).to(latents.dtype)
        if self.prediction_type == "epsilon":
            target = eps
        elif self.prediction_type == "v_prediction":
            # v = sqrt(ᾱ)·ε − sqrt(1−ᾱ)·x0 (Salimans & Ho 2022, arXiv 2202.00512)
            target = sqrt_ab * eps - sqrt_one_minus_ab * x0
        else:
            target = x0
        if self.snr_gamma is None:
            weighting = torch.ones(latents.shape[0], dtype=torch.float32, device=latents.device)
        else:
            snr = snr_from_alphas_cumprod(self.alphas_cumprod, timesteps)
            weighting = min_snr_weights(snr, self.snr_gamma, self.prediction_type)
        return Noised(noisy=noisy, timesteps=timesteps, target=target, weighting=weighting)

    def loss(self, pred: Tensor, noised: Noised, mask: Tensor | None = None) -> Tensor:
        """(B,) per-sample losses: weighting_b · mean_{c,h,w}((pred − target)²) in float32; with a
        latent-grid mask (B, 1, h, w), the masked mean instead."""
        return noised.weighting * _per_sample_mse(pred, noised.target, mask)

    def dream(self, noised: Noised, pred_no_grad: Tensor, detail_preservation: float) -> Noised:
        """DREAM (Zhou et al. 2023, arXiv 2312.00210): move x_t and the target
        towards the model's own prediction error ε − ε̂, scaled by λ = sqrt(1 − ᾱ_t)^p."""
        if self.prediction_type != "epsilon":
            raise NotImplementedError(
                f"DREAM is implemented for prediction_type 'epsilon' only, got {self.prediction_type!r}"
            )
        _, sqrt_one_minus_ab = self._sqrt_alphas(noised.timesteps, noised.noisy)
        dream_lambda = sqrt_one_minus_ab**detail_preservation
        delta = dream_lambda * (noised.target.float() - pred_no_grad.detach().float())
        noisy = (noised.noisy.float() + sqrt_one_minus_ab * delta).to(noised.noisy.dtype)
        return replace(noised, noisy=noisy, target=noised.target.float() + delta)


# --------------------------------------------------------------------------- flow matching


def flow_sigma_table(scheduler) -> tuple[Tensor, Tensor]:
    """(sigmas, timesteps) training tables of a freshly loaded FlowMatchEulerDiscreteScheduler.

    At construction the scheduler holds num_train_timesteps entries, sigma descending
    from 1 with the static ``shift`` already applied, and timesteps = sigma·N. Once
    ``set_timesteps`` has run, both hold the inference schedule instead (plus a
    terminal sigma of 0), so we refuse it. With ``use_dynamic_shifting=True`` the
    stored table is unshifted (the shift is resolution-dependent at inference).
    Returns float32 copies on the scheduler's device; the scheduler is not touched.
    """
    num_train_timesteps = scheduler.config.num_train_timesteps
    sigmas, timesteps = scheduler.sigmas, scheduler.timesteps
    if sigmas.shape != (num_train_timesteps,) or timesteps.shape != (num_train_timesteps,):
        raise ValueError(
            f"expected the training table of {num_train_timesteps} sigmas/timesteps, got "
            f"{tuple(sigmas.shape)}/{tuple(timesteps.shape)}; set_timesteps() was called on this "
            "scheduler, pass a freshly loaded one"
        )
    return sigmas.detach().float().clone(), timesteps.detach().float().clone()


@dataclass(frozen=True, eq=False)
class FlowMatchingObjective:
    """Rectified-flow objective as trained for SD3 (Esser et al. 2024, arXiv 2403.03206).

    The tables come from ``flow_sigma_table`` and must be on the training device.
    ``weighting_scheme`` selects both the timestep density (logit_normal, mode;
    uniform otherwise) and the loss weighting (sigma_sqrt, cosmap; ones otherwise).
    """

    scheduler_sigmas: Tensor  # (N,) float32, descending from 1, shifted
    scheduler_timesteps: Tensor  # (N,) float32, = sigmas * num_train_timesteps
    weighting_scheme: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    precondition_outputs: bool = True

    def __post_init__(self) -> None:
        if self.weighting_scheme not in FLOW_WEIGHTING_SCHEMES:
            # The diffusers helpers silently fall back to uniform/ones for unknown names.
            raise ValueError(
                f"--weighting_scheme must be one of {FLOW_WEIGHTING_SCHEMES}, got {self.weighting_scheme!r}"
            )
        if self.weighting_scheme == "mode" and not _MODE_SCALE_MIN <= self.mode_scale <= _MODE_SCALE_MAX:
            raise ValueError(
                f"--mode_scale must be in [{_MODE_SCALE_MIN}, {_MODE_SCALE_MAX:.4f}] for the mode density "
                f"to map [0, 1] onto itself, got {self.mode_scale}"
            )
        sigmas, timesteps = self.scheduler_sigmas, self.scheduler_timesteps
        if sigmas.ndim != 1 or sigmas.numel() == 0 or sigmas.shape != timesteps.shape:
            raise ValueError(
                f"scheduler_sigmas/scheduler_timesteps must be equal-length non-empty 1-D tables, "
                f"got {tuple(sigmas.shape)}/{tuple(timesteps.shape)}"
            )

    def _sample_indices(self, batch_size: int, device: torch.device, generator: torch.Generator) -> Tensor:
        # The table is descending (index 0 is sigma = 1), so u → 0 selects high noise and a
        # positive --logit_mean shifts training towards LOW noise: the opposite of the paper,
        # where t = sigmoid(n) is the noise level (arXiv 2403.03206, logit-normal sampling). Same for "mode".
        # Kept as is to match the diffusers SD3 training scripts.
        u = compute_density_for_timestep_sampling(
            weighting_scheme=self.weighting_scheme,
            batch_size=batch_size,
            logit_mean=self.logit_mean,
            logit_std=self.logit_std,
            mode_scale=self.mode_scale,
            device=device,
            generator=generator,
        )
        num_sigmas = self.scheduler_sigmas.shape[0]
        # u can be exactly 1 (float32 sigmoid saturates; f_mode(0) = 1), hence the clamp.
        return (u * num_sigmas).long().clamp(0, num_sigmas - 1)

    def noise(self, latents: Tensor, generator: torch.Generator) -> Noised:
        """Draw sigma and ε and build x_t = (1 − σ)·x0 + σ·ε (rectified flow, arXiv 2403.03206)."""
        indices = self._sample_indices(latents.shape[0], latents.device, generator)
        eps = torch.randn(tuple(latents.shape), generator=generator, device=latents.device, dtype=torch.float32)
        sigmas = _per_sample(self.scheduler_sigmas[indices].float(), latents)
        x0 = latents.float()
        noisy = ((1.0 - sigmas) * x0 + sigmas * eps).to(latents.dtype)
        # Preconditioned outputs are compared with x0, raw outputs with the velocity dx_t/dσ = ε − x0.
        target = x0 if self.precondition_outputs else eps - x0
        weighting = compute_loss_weighting_for_sd3(self.weighting_scheme, sigmas)
        return Noised(
            noisy=noisy,
            timesteps=self.scheduler_timesteps[indices].float(),
            target=target,
            weighting=weighting.reshape(-1).float(),
            sigmas=sigmas,
        )

    def prediction_to_target_space(self, pred: Tensor, noised: Noised) -> Tensor:
        """Map the velocity prediction v̂ to the space of ``noised.target`` (float32).

        Preconditioned: x̂0 = x_t − σ·v̂ (SD3 training scripts' ``precondition_outputs``).
        """
        if not self.precondition_outputs:
            return pred.float()
        return noised.noisy.float() - noised.sigmas * pred.float()

    def loss(self, pred: Tensor, noised: Noised, mask: Tensor | None = None) -> Tensor:
        """(B,) per-sample losses: weighting_b · mean_{c,h,w}((pred' − target)²) in float32; with a
        latent-grid mask (B, 1, h, w), the masked mean instead."""
        return noised.weighting * _per_sample_mse(self.prediction_to_target_space(pred, noised), noised.target, mask)


# --------------------------------------------------------------------------- DreamBooth


def split_prior(per_sample: Tensor, prior_loss_weight: float) -> Tensor:
    """DreamBooth prior preservation (Ruiz et al. 2023, arXiv 2208.12242).

    The batch is [instance half; class half]; returns
    mean(instance losses) + prior_loss_weight · mean(class losses).
    """
    batch_size = per_sample.shape[0] if per_sample.ndim else 0
    if per_sample.ndim != 1 or batch_size == 0 or batch_size % 2:
        raise ValueError(
            f"prior preservation needs a (B,) loss with an even, non-zero B "
            f"(instance half, then class half), got shape {tuple(per_sample.shape)}"
        )
    instance, prior = per_sample.chunk(2)
    return instance.mean() + prior_loss_weight * prior.mean()
