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
    "LOSS_TYPES",
    "HUBER_SCHEDULES",
    "FLOW_TIMESTEP_SAMPLING",
    "validate_loss_type",
    "huber_c_for",
    "elementwise_loss",
    "debiased_estimation_weights",
    "validate_timestep_window",
    "windowed_timestep_weights",
    "validate_noise_offset",
    "noise_offset_strength",
    "validate_multires_noise",
    "pyramid_noise",
    "validate_input_perturbation",
    "shift_sigmas",
    "ResolutionShift",
    "validate_flow_shift",
    "validate_pos_emb_random_crop_rate",
    "pos_embed_crop_offset",
]

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_BIAS_STRATEGIES = ("none", "earlier", "later", "range")
FLOW_WEIGHTING_SCHEMES = ("logit_normal", "mode", "uniform", "sigma_sqrt", "cosmap", "none")
LOSS_TYPES = ("l2", "l1", "huber", "smooth_l1")  # kohya sd-scripts' --loss_type choices
HUBER_SCHEDULES = ("constant", "exponential", "snr")  # kohya sd-scripts' --huber_schedule choices
FLOW_TIMESTEP_SAMPLING = ("table", "uniform")

# Range of the "mode" density's scale for which f_mode is a bijection of [0, 1]
# (Esser et al. 2024, arXiv 2403.03206, paragraph "Mode Sampling with Heavy Tails").
_MODE_SCALE_MIN, _MODE_SCALE_MAX = -1.0, 2.0 / (math.pi - 2.0)


# eq=False: a generated __eq__ would compare tensors and raise "ambiguous truth value".
@dataclass(frozen=True, eq=False)
class Noised:
    """One noised batch: what the denoiser sees and what its output is compared with."""

    noisy: Tensor  # x_t, same shape/dtype as the latents
    timesteps: Tensor  # (B,) DDPM: int64 indices; flow: float32 = num_train_timesteps * sigma
    target: Tensor  # float32 regression target, same shape as the latents
    weighting: Tensor  # (B,) float32 per-sample loss weight
    sigmas: Tensor | None = None  # flow matching only: (B, 1, ..., 1) float32


def _per_sample(values: Tensor, like: Tensor) -> Tensor:
    """Reshape (B,) to (B, 1, ..., 1) so it broadcasts against ``like``."""
    return values.reshape(values.shape[0], *([1] * (like.ndim - 1)))


# --------------------------------------------------------------------------- loss types


def validate_loss_type(loss_type: str, huber_schedule: str = "snr", huber_c: float = 0.1,
                       huber_scale: float = 1.0) -> None:
    """Check --loss_type and the Huber flags (kohya sd-scripts' names and defaults); raises ValueError.

    Usable at argument-parsing time. The numbers are checked only when a Huber-type loss reads them.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"--loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if huber_schedule not in HUBER_SCHEDULES:
        raise ValueError(f"--huber_schedule must be one of {HUBER_SCHEDULES}, got {huber_schedule!r}")
    if loss_type in ("huber", "smooth_l1"):
        # c = 0 would make the "huber" loss identically 0; the exponential schedule takes log(c).
        if not (huber_c > 0 and math.isfinite(huber_c)):
            raise ValueError(f"--huber_c must be a finite number > 0, got {huber_c}")
        if not (huber_scale > 0 and math.isfinite(huber_scale)):
            raise ValueError(f"--huber_scale must be a finite number > 0, got {huber_scale}")


def huber_c_for(schedule: str, timestep_fraction: Tensor, signal_ratio: Tensor, huber_c: float = 0.1,
                huber_scale: float = 1.0) -> Tensor:
    """(B,) float32 per-sample pseudo-Huber threshold c (scheduled Huber loss, Khrapov et al. 2024,
    arXiv 2403.16728; kohya sd-scripts' --huber_schedule, PR #1228 and #1808 for --huber_scale).

    ``timestep_fraction`` is t/T in [0, 1] (DDPM: index / num_train_timesteps; flow: σ), and
    ``signal_ratio`` is a/(a + s) for x_t = a·x0 + s·ε (DDPM: sqrt(ᾱ)/(sqrt(ᾱ) + sqrt(1−ᾱ));
    flow: 1 − σ, since a + s = 1). With c0 = huber_c:

        constant:     c = c0 · huber_scale
        exponential:  c = huber_scale · c0^(t/T)          (kohya: exp(−(−ln c0 / T)·t))
        snr:          c = (1 − c0) · signal_ratio² + c0    (kohya: (1 − c0)/(1 + sqrt(1/SNR))² + c0)

    The snr form is kohya's written without 1/sqrt(SNR), so it stays finite at SNR = 0 and
    SNR = inf; as in kohya it ignores huber_scale. c → 1 (close to L2 for unit-scale residuals)
    on clean inputs, → c0 (L1-like, robust to outliers) on pure noise.
    """
    if schedule == "constant":
        return torch.full_like(timestep_fraction, huber_c * huber_scale, dtype=torch.float32)
    if schedule == "exponential":
        return huber_scale * torch.pow(huber_c, timestep_fraction.float())
    if schedule == "snr":
        return (1.0 - huber_c) * signal_ratio.float() ** 2 + huber_c
    raise ValueError(f"--huber_schedule must be one of {HUBER_SCHEDULES}, got {schedule!r}")


def elementwise_loss(pred: Tensor, target: Tensor, loss_type: str = "l2", huber_c: Tensor | None = None) -> Tensor:
    """Float32 loss per element of r = pred − target (kohya sd-scripts' --loss_type forms):

        l2: r²    l1: |r|
        huber:      2c·(sqrt(r² + c²) − c)   pseudo-Huber: ≈ r² for |r| ≪ c, ≈ 2c·|r| for |r| ≫ c
        smooth_l1:  2·(sqrt(r² + c²) − c)    the same divided by c: ≈ r²/c near 0, ≈ 2|r| far

    ``huber_c`` is the (B,) per-sample threshold of `huber_c_for`. "smooth_l1" is kohya's
    square-root form, not torch's piecewise SmoothL1Loss: both pseudo-Huber forms are smooth
    everywhere (arXiv 2403.16728).
    """
    if pred.shape != target.shape:
        # Broadcasting would silently compute a different loss.
        raise ValueError(f"prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    residual = pred.float() - target.float()
    if loss_type == "l2":
        return residual**2
    if loss_type == "l1":
        return residual.abs()
    if loss_type not in ("huber", "smooth_l1"):
        raise ValueError(f"--loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if huber_c is None or huber_c.shape != pred.shape[:1]:
        raise ValueError(f"loss_type {loss_type!r} needs a (B,) huber_c for B = {pred.shape[0]}")
    c = _per_sample(huber_c.float(), residual)
    root = torch.sqrt(residual**2 + c**2) - c
    return 2.0 * c * root if loss_type == "huber" else 2.0 * root


def _per_sample_loss(pred: Tensor, target: Tensor, mask: Tensor | None = None, loss_type: str = "l2",
                     huber_c: Tensor | None = None) -> Tensor:
    """(B,) mean of `elementwise_loss` over all non-batch dims, computed in float32; with a
    latent-grid `mask` (B, 1, h, w), the masked mean (see `masked_per_sample_mse`)."""
    errors = elementwise_loss(pred, target, loss_type, huber_c)
    if mask is not None:
        return masked_per_sample_mse(errors, mask)
    return errors.reshape(errors.shape[0], -1).mean(dim=1)


# --------------------------------------------------------------------------- masked loss


def latent_mask(mask: Tensor, size: tuple[int, int]) -> Tensor:
    """A pixel mask (B, 1, H, W) in [0, 1] on the latent grid (B, 1, h, w): each latent pixel gets
    the mean of the pixels it covers (an exact box average when H/h is an integer, as with the VAE's
    factor of 8), so a half-covered latent pixel counts half."""
    return torch.nn.functional.adaptive_avg_pool2d(mask.float(), size)


def masked_per_sample_mse(squared: Tensor, mask: Tensor) -> Tensor:
    """(B,) masked mean of elementwise errors (B, C, h, w) under a latent-grid mask (B, 1, h, w)
    (squared errors for the default L2 loss, any `elementwise_loss` otherwise):

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


# --------------------------------------------------------------------------- DDPM extras


def debiased_estimation_weights(snr: Tensor, prediction_type: str) -> Tensor:
    """Debiased-estimation loss weights (Yu et al. 2024, "Unmasking Bias in Diffusion Model
    Training", arXiv 2310.08442; kohya sd-scripts' --debiased_estimation_loss).

    The paper weights the ε-loss by 1/sqrt(SNR). v-prediction uses 1/(SNR + 1), the form kohya
    adopted (kohya-ss/sd-scripts#1058), which stays finite at zero terminal SNR. For "sample"
    the ε-loss equals SNR times the x0-loss, so the same weight reads sqrt(SNR) on the x0-loss.
    SNR is capped at 1000 as in kohya (SNR = inf at ᾱ = 1); for epsilon it is also floored at
    1/1000 so a zero-terminal-SNR step gets weight sqrt(1000) instead of inf.
    """
    snr = snr.float().clamp(max=1000.0)
    if prediction_type == "epsilon":
        return snr.clamp(min=1e-3).rsqrt()
    if prediction_type == "v_prediction":
        return 1.0 / (snr + 1.0)
    if prediction_type == "sample":
        return snr.sqrt()
    raise ValueError(f"unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}")


def validate_timestep_window(min_timestep: int | None, max_timestep: int | None,
                             num_train_timesteps: int | None = None) -> None:
    """Check --min_timestep/--max_timestep (kohya sd-scripts); raises ValueError.

    Timesteps are drawn from [min, max), the max exclusive as in kohya's torch.randint(min, max);
    None means 0 and T. Pass num_train_timesteps = None at parse time (the scheduler is not
    loaded yet) to skip the checks against T.
    """
    low = 0 if min_timestep is None else min_timestep
    if low < 0:
        raise ValueError(f"--min_timestep must be >= 0, got {min_timestep}")
    if max_timestep is None:
        if num_train_timesteps is not None and low >= num_train_timesteps:
            raise ValueError(
                f"--min_timestep must be below the number of training timesteps ({num_train_timesteps}), got {low}"
            )
        return
    if num_train_timesteps is not None and max_timestep > num_train_timesteps:
        raise ValueError(
            f"--max_timestep must be <= the number of training timesteps ({num_train_timesteps}), got {max_timestep}"
        )
    if low >= max_timestep:
        # kohya's min == max draws t = max, one past the window; an empty window is refused here.
        raise ValueError(f"--min_timestep must be below --max_timestep (exclusive), got {low} and {max_timestep}")


def windowed_timestep_weights(weights: Tensor, min_timestep: int, max_timestep: int) -> Tensor:
    """Timestep-bias sampling weights (T,) with everything outside [min_timestep, max_timestep)
    zeroed, renormalised to sum 1; raises ValueError when no weight is left in the window."""
    inside = torch.zeros_like(weights)
    inside[min_timestep:max_timestep] = 1.0
    windowed = weights * inside
    total = windowed.sum()
    if not total > 0:
        raise ValueError(
            f"the timestep bias puts no weight inside --min_timestep/--max_timestep [{min_timestep}, {max_timestep})"
        )
    return windowed / total


def validate_noise_offset(noise_offset: float, random_strength: bool = False,
                          adaptive_noise_scale: float | None = None) -> None:
    """Check --noise_offset and the kohya flags that modify it; raises ValueError."""
    if not math.isfinite(noise_offset):
        raise ValueError(f"--noise_offset must be a finite number, got {noise_offset}")
    if random_strength and not noise_offset:
        raise ValueError("--noise_offset_random_strength requires --noise_offset")
    if adaptive_noise_scale is not None:
        if not noise_offset:
            raise ValueError("--adaptive_noise_scale requires --noise_offset")
        if not math.isfinite(adaptive_noise_scale):
            raise ValueError(f"--adaptive_noise_scale must be a finite number, got {adaptive_noise_scale}")


def noise_offset_strength(latents: Tensor, noise_offset: float | Tensor,
                          adaptive_noise_scale: float | None = None) -> float | Tensor:
    """The offset-noise strength (Guttenberg 2023, "Diffusion with Offset Noise"). With kohya's
    --adaptive_noise_scale it is per sample and channel, (B, C, 1, ..., 1):

        noise_offset + adaptive_noise_scale · |mean_{h,w} x0|, clamped at 0

    so latents whose mean is far from 0 get a larger offset; the clamp keeps a negative scale
    from flipping the sign of the offset.
    """
    if adaptive_noise_scale is None:
        return noise_offset
    mean_abs = latents.float().mean(dim=tuple(range(2, latents.ndim)), keepdim=True).abs()
    return (noise_offset + adaptive_noise_scale * mean_abs).clamp(min=0.0)


def validate_multires_noise(iterations: int, discount: float = 0.3) -> None:
    """Check --multires_noise_iterations/--multires_noise_discount; raises ValueError."""
    if iterations < 0:
        raise ValueError(f"--multires_noise_iterations must be >= 0, got {iterations}")
    if iterations and not (discount > 0 and math.isfinite(discount)):
        raise ValueError(f"--multires_noise_discount must be a finite number > 0, got {discount}")


def pyramid_noise(noise: Tensor, generator: torch.Generator, iterations: int, discount: float = 0.3) -> Tensor:
    """Multi-resolution ("pyramid") noise (Whitaker 2023, "Multi-Resolution Noise for Diffusion
    Model Training"; kohya sd-scripts' --multires_noise_iterations/--multires_noise_discount).

    Adds, for i = 0..iterations−1, Gaussian noise drawn at (H, W)/rⁱ with r ~ U[2, 4) (r drawn
    per level), bilinearly upsampled and scaled by discountⁱ; stops after the first 1-pixel
    level; then divides by the std of the whole batch, as kohya does, to get back to unit
    variance. Level 0 is full resolution, so one iteration gives (ε + z)/std(ε + z).
    Float32; needs (B, C, H, W).
    """
    if noise.ndim != 4:
        raise ValueError(f"multi-resolution noise needs (B, C, H, W) latents, got shape {tuple(noise.shape)}")
    batch, channels, height, width = noise.shape
    # One draw (and one host sync on GPU) for every level's r: sizes must be Python ints.
    ratios = (2.0 + 2.0 * torch.rand(max(iterations - 1, 0), generator=generator, device=noise.device)).tolist()
    total = noise.float()
    for level in range(iterations):
        r = ratios[level - 1] if level else 1.0
        size = (max(1, int(height / r**level)), max(1, int(width / r**level)))
        layer = torch.randn((batch, channels, *size), generator=generator, device=noise.device, dtype=torch.float32)
        if size != (height, width):
            layer = torch.nn.functional.interpolate(layer, size=(height, width), mode="bilinear", align_corners=False)
        total = total + layer * discount**level
        if 1 in size:
            break
    return total / total.std()


def validate_input_perturbation(gamma: float, random_strength: bool = False) -> None:
    """Check --ip_noise_gamma (kohya; diffusers' --input_perturbation is the same knob) and
    --ip_noise_gamma_random_strength; raises ValueError."""
    if not (gamma >= 0 and math.isfinite(gamma)):
        raise ValueError(f"--ip_noise_gamma (--input_perturbation) must be a finite number >= 0, got {gamma}")
    if random_strength and not gamma:
        raise ValueError("--ip_noise_gamma_random_strength requires --ip_noise_gamma")


# --------------------------------------------------------------------------- DDPM


@dataclass(frozen=True, eq=False)
class DDPMObjective:
    """Discrete-time denoising objective (Ho et al. 2020, arXiv 2006.11239).

    ``alphas_cumprod`` and ``timestep_weights`` must already be on the training
    device; the generator passed to ``noise`` must be on that device too. Every field
    after ``timestep_weights`` (issue 21, kohya sd-scripts' knobs) defaults to "off": with
    the defaults, ``noise`` and ``loss`` draw and return exactly what they did before.
    """

    alphas_cumprod: Tensor  # (T,) float32
    prediction_type: str  # "epsilon" | "v_prediction" | "sample"
    snr_gamma: float | None = None  # Min-SNR-γ (Hang et al. 2023, arXiv 2303.09556)
    noise_offset: float = 0.0  # (Guttenberg 2023, "Diffusion with Offset Noise")
    input_perturbation: float = 0.0  # (Ning et al. 2023, arXiv 2301.11706); kohya's --ip_noise_gamma
    timestep_weights: Tensor | None = None  # (T,) timestep-bias sampling weights; None = uniform
    loss_type: str = "l2"  # "l2" | "l1" | "huber" | "smooth_l1", see `elementwise_loss`
    huber_schedule: str = "snr"  # "constant" | "exponential" | "snr", see `huber_c_for`
    huber_c: float = 0.1
    huber_scale: float = 1.0
    debiased_estimation: bool = False  # `debiased_estimation_weights`, times Min-SNR if both are on
    min_timestep: int | None = None  # sample t in [min_timestep, max_timestep); None = 0 and T
    max_timestep: int | None = None
    noise_offset_random_strength: bool = False  # offset strength ~ U[0, noise_offset), one per batch
    adaptive_noise_scale: float | None = None  # see `noise_offset_strength`
    multires_noise_iterations: int = 0  # 0 = off; see `pyramid_noise`
    multires_noise_discount: float = 0.3
    input_perturbation_random_strength: bool = False  # γ ~ U[0, input_perturbation), one per batch

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
        validate_loss_type(self.loss_type, self.huber_schedule, self.huber_c, self.huber_scale)
        validate_timestep_window(self.min_timestep, self.max_timestep, alphas.shape[0])
        if weights is not None and self._windowed:
            windowed_timestep_weights(weights, *self._timestep_window())  # raises on an empty window
        validate_noise_offset(self.noise_offset, self.noise_offset_random_strength, self.adaptive_noise_scale)
        validate_multires_noise(self.multires_noise_iterations, self.multires_noise_discount)
        validate_input_perturbation(self.input_perturbation, self.input_perturbation_random_strength)

    @property
    def _windowed(self) -> bool:
        return self.min_timestep is not None or self.max_timestep is not None

    def _timestep_window(self) -> tuple[int, int]:
        num_timesteps = self.alphas_cumprod.shape[0]
        low = 0 if self.min_timestep is None else self.min_timestep
        return low, num_timesteps if self.max_timestep is None else self.max_timestep

    def _sqrt_alphas(self, timesteps: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        """(sqrt(ᾱ_t), sqrt(1 − ᾱ_t)) as float32, broadcastable against ``like``."""
        alpha_bar = _per_sample(self.alphas_cumprod[timesteps].float(), like)
        return alpha_bar.sqrt(), (1.0 - alpha_bar).sqrt()

    def _sample_timesteps(self, batch_size: int, device: torch.device, generator: torch.Generator) -> Tensor:
        if self.timestep_weights is None:
            low, high = self._timestep_window()
            return torch.randint(low, high, (batch_size,), generator=generator, device=device)
        weights = self.timestep_weights
        if self._windowed:
            weights = windowed_timestep_weights(weights, *self._timestep_window())
        return torch.multinomial(weights, batch_size, replacement=True, generator=generator)

    def _sample_noise(self, latents: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """(ε used as the target, ε' used to build x_t), float32."""
        def randn(shape: tuple[int, ...]) -> Tensor:
            return torch.randn(shape, generator=generator, device=latents.device, dtype=torch.float32)

        def strength(value: float, random: bool) -> float | Tensor:
            # kohya's *_random_strength: one U[0, value) draw per batch.
            return torch.rand(1, generator=generator, device=latents.device) * value if random else value

        eps = randn(tuple(latents.shape))
        if self.noise_offset:
            # One constant per sample and channel shifts the mean brightness the model can
            # produce (Guttenberg 2023, "Diffusion with Offset Noise").
            offset = strength(self.noise_offset, self.noise_offset_random_strength)
            offset = noise_offset_strength(latents, offset, self.adaptive_noise_scale)
            eps = eps + offset * randn(tuple(latents.shape[:2]) + (1,) * (latents.ndim - 2))
        if self.multires_noise_iterations:
            # After the offset, as in kohya: the pyramid's normalisation covers the offset too.
            eps = pyramid_noise(eps, generator, self.multires_noise_iterations, self.multires_noise_discount)
        eps_input = eps
        if self.input_perturbation:
            # Only the input is perturbed; the target keeps ε (Ning et al. 2023, arXiv 2301.11706).
            gamma = strength(self.input_perturbation, self.input_perturbation_random_strength)
            eps_input = eps + gamma * randn(tuple(latents.shape))
        return eps, eps_input

    def _weighting(self, timesteps: Tensor, batch_size: int, device: torch.device) -> Tensor:
        """(B,) Min-SNR-γ weights times debiased-estimation weights (kohya multiplies both)."""
        if self.snr_gamma is None and not self.debiased_estimation:
            return torch.ones(batch_size, dtype=torch.float32, device=device)
        snr = snr_from_alphas_cumprod(self.alphas_cumprod, timesteps)
        if self.snr_gamma is None:
            return debiased_estimation_weights(snr, self.prediction_type)
        weighting = min_snr_weights(snr, self.snr_gamma, self.prediction_type)
        if self.debiased_estimation:
            weighting = weighting * debiased_estimation_weights(snr, self.prediction_type)
        return weighting

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
        weighting = self._weighting(timesteps, latents.shape[0], latents.device)
        return Noised(noisy=noisy, timesteps=timesteps, target=target, weighting=weighting)

    def huber_thresholds(self, timesteps: Tensor) -> Tensor:
        """(B,) pseudo-Huber thresholds at DDPM timesteps: `huber_c_for` with t/T and
        sqrt(ᾱ)/(sqrt(ᾱ) + sqrt(1 − ᾱ))."""
        sqrt_ab, sqrt_one_minus_ab = self._sqrt_alphas(timesteps, timesteps)
        return huber_c_for(
            self.huber_schedule, timesteps.float() / self.alphas_cumprod.shape[0],
            sqrt_ab / (sqrt_ab + sqrt_one_minus_ab), self.huber_c, self.huber_scale,
        )

    def loss(self, pred: Tensor, noised: Noised, mask: Tensor | None = None) -> Tensor:
        """(B,) per-sample losses: weighting_b · mean_{c,h,w} ℓ(pred − target) in float32, ℓ the
        `elementwise_loss` of ``loss_type`` (r² by default); with a latent-grid mask (B, 1, h, w),
        the masked mean instead."""
        huber_c = self.huber_thresholds(noised.timesteps) if self.loss_type in ("huber", "smooth_l1") else None
        return noised.weighting * _per_sample_loss(pred, noised.target, mask, self.loss_type, huber_c)

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


def shift_sigmas(sigmas: Tensor, shift: float) -> Tensor:
    """σ' = s·σ / (1 + (s − 1)·σ): the timestep shift of Esser et al. 2024 (arXiv 2403.03206,
    eq. 23, with s = sqrt(m/n) for a resolution of m pixels against a base of n), the same map
    as FlowMatchEulerDiscreteScheduler's ``shift`` and kohya's --training_shift. s > 1 moves
    training towards noise. The maps compose by multiplying: shift(shift(σ, a), b) = shift(σ, a·b).
    """
    return shift * sigmas / (1.0 + (shift - 1.0) * sigmas)


@dataclass(frozen=True)
class ResolutionShift:
    """SD3's resolution-dependent shift, as diffusers computes it for dynamic shifting
    (FlowMatchEulerDiscreteScheduler's base_image_seq_len, max_image_seq_len, base_shift,
    max_shift config keys and their defaults; ``calculate_shift`` in the SD3 pipeline):
    μ is linear in the image sequence length L = (h/p)·(w/p), from base_shift at
    base_seq_len to max_shift at max_seq_len (extrapolated outside), and shift = exp(μ).
    With p = 2 on the 8× VAE grid, 256 px gives L = 256 (shift e^0.5) and 1024 px L = 4096 (e^1.15).
    (The SD3 pipeline falls back to max_shift 1.16 when the key is missing; the scheduler's
    default, used here, is 1.15.)
    """

    base_seq_len: int = 256
    max_seq_len: int = 4096
    base_shift: float = 0.5
    max_shift: float = 1.15
    patch_size: int = 2  # the transformer's patch size (SD3: 2)

    def __post_init__(self) -> None:
        if not 0 < self.base_seq_len < self.max_seq_len:
            raise ValueError(
                f"resolution shift needs 0 < base_image_seq_len < max_image_seq_len, "
                f"got {self.base_seq_len} and {self.max_seq_len}"
            )
        if self.patch_size < 1:
            raise ValueError(f"resolution shift needs a patch size >= 1, got {self.patch_size}")

    def image_seq_len(self, latent_size: tuple[int, int]) -> int:
        height, width = latent_size
        return (height // self.patch_size) * (width // self.patch_size)

    def shift(self, latent_size: tuple[int, int]) -> float:
        """exp(μ) for latents of spatial size (h, w)."""
        slope = (self.max_shift - self.base_shift) / (self.max_seq_len - self.base_seq_len)
        mu = self.base_shift + slope * (self.image_seq_len(latent_size) - self.base_seq_len)
        return math.exp(mu)


def validate_flow_shift(shift: float | None, resolution_shift: ResolutionShift | None = None,
                        timestep_sampling: str = "table") -> None:
    """Check --training_shift (kohya; a.k.a. --flow_shift), the resolution shift and the
    timestep sampling; raises ValueError."""
    if timestep_sampling not in FLOW_TIMESTEP_SAMPLING:
        raise ValueError(f"--timestep_sampling must be one of {FLOW_TIMESTEP_SAMPLING}, got {timestep_sampling!r}")
    if shift is not None and not (shift > 0 and math.isfinite(shift)):
        raise ValueError(f"--training_shift must be a finite number > 0, got {shift}")
    if shift is not None and resolution_shift is not None:
        raise ValueError("--training_shift and a resolution-dependent shift exclude each other; give one")


@dataclass(frozen=True, eq=False)
class FlowMatchingObjective:
    """Rectified-flow objective as trained for SD3 (Esser et al. 2024, arXiv 2403.03206).

    The tables come from ``flow_sigma_table`` and must be on the training device.
    ``weighting_scheme`` selects both the timestep density (logit_normal, mode;
    uniform otherwise) and the loss weighting (sigma_sqrt, cosmap; ones otherwise).

    ``timestep_sampling``: "table" (default) indexes the scheduler's table with u from the
    density; "uniform" draws σ ~ U(0, 1] continuously and ignores the density, as kohya's
    FLUX --timestep_sampling uniform does (the weighting still follows ``weighting_scheme``).
    A ``shift`` or ``resolution_shift`` then maps σ through `shift_sigmas`; the table already
    carries the scheduler's own shift, so on "table" the shifts multiply (3 × s for SD3).
    With the defaults (no shift, "table") the draws and results are exactly today's.
    """

    scheduler_sigmas: Tensor  # (N,) float32, descending from 1, shifted
    scheduler_timesteps: Tensor  # (N,) float32, = sigmas * num_train_timesteps
    weighting_scheme: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    precondition_outputs: bool = True
    loss_type: str = "l2"  # "l2" | "l1" | "huber" | "smooth_l1", see `elementwise_loss`
    huber_schedule: str = "snr"  # "constant" | "exponential" | "snr", see `huber_c_for`
    huber_c: float = 0.1
    huber_scale: float = 1.0
    timestep_sampling: str = "table"  # "table" | "uniform"
    shift: float | None = None  # static shift on top of the sampled σ; None = none
    resolution_shift: ResolutionShift | None = None  # shift from the latents' size; None = none
    num_train_timesteps: int = 1000  # timesteps = σ·N wherever σ is not read from the table

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
        validate_loss_type(self.loss_type, self.huber_schedule, self.huber_c, self.huber_scale)
        validate_flow_shift(self.shift, self.resolution_shift, self.timestep_sampling)

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

    def _shift_for(self, latents: Tensor) -> float | None:
        if self.resolution_shift is not None:
            return self.resolution_shift.shift(tuple(latents.shape[-2:]))
        return self.shift

    def _sample_sigmas(self, latents: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """((B,) σ, (B,) timesteps), float32."""
        batch_size, device = latents.shape[0], latents.device
        if self.timestep_sampling == "table":
            indices = self._sample_indices(batch_size, device, generator)
            sigmas, timesteps = self.scheduler_sigmas[indices].float(), self.scheduler_timesteps[indices].float()
        else:
            # 1 − U[0, 1) lies in (0, 1]: σ = 0 would give sigma_sqrt an infinite weight.
            sigmas = 1.0 - torch.rand(batch_size, generator=generator, device=device, dtype=torch.float32)
            timesteps = sigmas * self.num_train_timesteps
        shift = self._shift_for(latents)
        if shift is not None and shift != 1.0:
            sigmas = shift_sigmas(sigmas, shift)
            timesteps = sigmas * self.num_train_timesteps
        return sigmas, timesteps

    def noise(self, latents: Tensor, generator: torch.Generator) -> Noised:
        """Draw sigma and ε and build x_t = (1 − σ)·x0 + σ·ε (rectified flow, arXiv 2403.03206)."""
        sigmas, timesteps = self._sample_sigmas(latents, generator)
        eps = torch.randn(tuple(latents.shape), generator=generator, device=latents.device, dtype=torch.float32)
        sigmas = _per_sample(sigmas, latents)
        x0 = latents.float()
        noisy = ((1.0 - sigmas) * x0 + sigmas * eps).to(latents.dtype)
        # Preconditioned outputs are compared with x0, raw outputs with the velocity dx_t/dσ = ε − x0.
        target = x0 if self.precondition_outputs else eps - x0
        weighting = compute_loss_weighting_for_sd3(self.weighting_scheme, sigmas)
        return Noised(
            noisy=noisy,
            timesteps=timesteps,
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

    def huber_thresholds(self, sigmas: Tensor) -> Tensor:
        """(B,) pseudo-Huber thresholds at noise levels σ: `huber_c_for` with t/T = σ and signal
        ratio 1 − σ. For "snr" this is kohya's DDPM formula read through the rectified flow's
        SNR = ((1 − σ)/σ)², i.e. c = (1 − c0)(1 − σ)² + c0; kohya itself refuses "snr" for
        flow models (kohya-ss/sd-scripts#1868). "exponential" equals kohya's on t = 1000·σ."""
        sigmas = sigmas.reshape(-1).float()
        return huber_c_for(self.huber_schedule, sigmas, 1.0 - sigmas, self.huber_c, self.huber_scale)

    def loss(self, pred: Tensor, noised: Noised, mask: Tensor | None = None) -> Tensor:
        """(B,) per-sample losses: weighting_b · mean_{c,h,w} ℓ(pred' − target) in float32, ℓ the
        `elementwise_loss` of ``loss_type`` (r² by default); with a latent-grid mask (B, 1, h, w),
        the masked mean instead."""
        huber_c = self.huber_thresholds(noised.sigmas) if self.loss_type in ("huber", "smooth_l1") else None
        prediction = self.prediction_to_target_space(pred, noised)
        return noised.weighting * _per_sample_loss(prediction, noised.target, mask, self.loss_type, huber_c)


# --------------------------------------------------------------------------- SD3.5 positional embedding


def validate_pos_emb_random_crop_rate(rate: float) -> None:
    """Check kohya's --pos_emb_random_crop_rate (SD3.5 Medium only); raises ValueError."""
    if not 0.0 <= rate <= 1.0:  # also rejects NaN
        raise ValueError(f"--pos_emb_random_crop_rate must be in [0, 1], got {rate}")


def pos_embed_crop_offset(max_size: int, grid: tuple[int, int], rate: float,
                          generator: torch.Generator) -> tuple[int, int]:
    """(top, left) of the (h, w) window cut from SD3's max_size × max_size positional-embedding grid.

    Default: the centre crop of diffusers' PatchEmbed.cropped_pos_embed, ((max−h)//2, (max−w)//2).
    With probability ``rate`` (kohya's --pos_emb_random_crop_rate, trained into SD3.5 Medium) a
    uniformly random window instead, so small images also see the outer positions. One offset
    per call (kohya: one per forward pass); rate 0 draws nothing from the generator.
    """
    validate_pos_emb_random_crop_rate(rate)
    height, width = grid
    if not (0 < height <= max_size and 0 < width <= max_size):
        raise ValueError(f"patch grid {grid} does not fit the positional-embedding grid of {max_size}")
    if rate == 0.0 or not torch.rand(1, generator=generator, device=generator.device).item() < rate:
        return (max_size - height) // 2, (max_size - width) // 2
    top = torch.randint(0, max_size - height + 1, (1,), generator=generator, device=generator.device)
    left = torch.randint(0, max_size - width + 1, (1,), generator=generator, device=generator.device)
    return int(top.item()), int(left.item())


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
