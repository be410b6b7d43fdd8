"""Closed-form tests for sdft.objectives."""

import math

import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_snr

from sdft.objectives import (
    DDPMObjective,
    FlowMatchingObjective,
    Noised,
    flow_sigma_table,
    min_snr_weights,
    snr_from_alphas_cumprod,
    split_prior,
    timestep_bias_weights,
    validate_timestep_bias,
)

# ᾱ chosen so the square roots are exact-ish: sqrt(0.36) = 0.6, sqrt(1 - 0.36) = 0.8.
# Index 0 has ᾱ = 1 (SNR = inf), index 3 has ᾱ = 0 (zero terminal SNR).
ALPHAS = torch.tensor([1.0, 0.64, 0.36, 0.0])


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def only(t: int, num: int = 4) -> torch.Tensor:
    """Timestep weights that always select timestep t."""
    return torch.nn.functional.one_hot(torch.tensor(t), num).float()


def ddpm(prediction_type="epsilon", t=2, **kw) -> DDPMObjective:
    return DDPMObjective(ALPHAS, prediction_type, timestep_weights=only(t), **kw)


def latents(b=3, c=4, h=5, w=6, seed=123) -> torch.Tensor:
    return torch.randn(b, c, h, w, generator=gen(seed))


def assert_same_noised(a: Noised, b: Noised) -> None:
    for name in ("noisy", "timesteps", "target", "weighting"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


# --------------------------------------------------------------------------- DDPM noising


def test_ddpm_noisy_and_targets_closed_form():
    x0 = latents()
    eps_noised = ddpm("epsilon").noise(x0, gen(7))
    eps = eps_noised.target
    assert torch.equal(eps_noised.timesteps, torch.full((3,), 2, dtype=torch.int64))
    torch.testing.assert_close(eps_noised.noisy, 0.6 * x0 + 0.8 * eps)

    v_noised = ddpm("v_prediction").noise(x0, gen(7))
    torch.testing.assert_close(v_noised.noisy, eps_noised.noisy)
    torch.testing.assert_close(v_noised.target, 0.6 * eps - 0.8 * x0)
    # sqrt(ᾱ)·x_t − sqrt(1−ᾱ)·v = (ᾱ + 1 − ᾱ)·x0
    torch.testing.assert_close(0.6 * v_noised.noisy - 0.8 * v_noised.target, x0)

    sample_noised = ddpm("sample").noise(x0, gen(7))
    torch.testing.assert_close(sample_noised.target, x0)
    assert torch.equal(sample_noised.weighting, torch.ones(3))
    assert sample_noised.sigmas is None


def test_ddpm_extreme_alphas():
    x0 = latents()
    clean = ddpm("v_prediction", t=0).noise(x0, gen(1))  # ᾱ = 1: x_t = x0, v = ε
    torch.testing.assert_close(clean.noisy, x0)
    pure = ddpm("v_prediction", t=3).noise(x0, gen(1))  # ᾱ = 0: x_t = ε, v = −x0
    torch.testing.assert_close(pure.target, -x0)
    torch.testing.assert_close(pure.noisy, clean.target)


def test_ddpm_noisy_keeps_latent_dtype_and_does_not_mutate():
    x0 = latents().to(torch.bfloat16)
    before = x0.clone()
    noised = ddpm().noise(x0, gen())
    assert noised.noisy.dtype == torch.bfloat16
    assert noised.target.shape == x0.shape
    assert noised.timesteps.dtype == torch.int64 and noised.weighting.dtype == torch.float32
    assert torch.equal(x0, before)


def test_ddpm_uniform_timesteps_cover_range():
    obj = DDPMObjective(torch.linspace(0.99, 0.01, 10), "epsilon")
    t = obj.noise(torch.zeros(5000, 1, 1, 1), gen()).timesteps
    assert t.dtype == torch.int64
    assert set(t.tolist()) == set(range(10))


def test_unknown_prediction_type_raises():
    with pytest.raises(ValueError, match="flow"):
        DDPMObjective(ALPHAS, "flow")


def test_timestep_weights_must_match_schedule():
    with pytest.raises(ValueError, match="timestep_weights"):
        DDPMObjective(ALPHAS, "epsilon", timestep_weights=torch.ones(5))


def test_noise_offset_adds_per_sample_per_channel_constant():
    x0 = latents()
    plain = ddpm().noise(x0, gen(3))
    offset = ddpm(noise_offset=0.5).noise(x0, gen(3))
    diff = offset.target - plain.target
    assert torch.equal(offset.timesteps, plain.timesteps)
    torch.testing.assert_close(diff, diff[:, :, :1, :1].expand_as(diff))
    assert diff.abs().min() > 0  # a draw of exactly 0 has probability 0
    assert diff[:, :, 0, 0].unique().numel() == 12  # independent per (sample, channel)
    torch.testing.assert_close(offset.noisy - plain.noisy, 0.8 * diff)


def test_input_perturbation_changes_noisy_not_target():
    x0 = latents()
    plain = ddpm().noise(x0, gen(3))
    perturbed = ddpm(input_perturbation=0.1).noise(x0, gen(3))
    assert torch.equal(perturbed.target, plain.target)
    assert not torch.allclose(perturbed.noisy, plain.noisy)
    # x_t − x_t_plain = sqrt(1 − ᾱ)·p·ξ with ξ ~ N(0, I): never a multiple of ε.
    xi = (perturbed.noisy - plain.noisy) / (0.8 * 0.1)
    assert 0.7 < xi.std() < 1.3


def test_determinism_same_seed_equal_different_seed_differs():
    x0 = latents()
    obj = DDPMObjective(ALPHAS, "epsilon", snr_gamma=5.0, noise_offset=0.1, input_perturbation=0.1)
    assert_same_noised(obj.noise(x0, gen(42)), obj.noise(x0, gen(42)))
    a, b = obj.noise(x0, gen(42)), obj.noise(x0, gen(43))
    assert not torch.equal(a.target, b.target)
    assert not torch.equal(a.noisy, b.noisy)


# --------------------------------------------------------------------------- Min-SNR

SNR = torch.tensor([0.0, 1.0, 4.0, 10.0, math.inf])


@pytest.mark.parametrize(
    "prediction_type, expected",
    [
        ("epsilon", [1.0, 1.0, 1.0, 0.5, 0.0]),  # min(SNR, 5)/SNR, limit 1 at SNR = 0
        ("v_prediction", [0.0, 0.5, 0.8, 5 / 11, 0.0]),  # min(SNR, 5)/(SNR + 1)
        ("sample", [0.0, 1.0, 4.0, 5.0, 5.0]),  # min(SNR, 5)
    ],
)
def test_min_snr_exact_values(prediction_type, expected):
    weights = min_snr_weights(SNR, 5.0, prediction_type)
    assert torch.isfinite(weights).all()
    torch.testing.assert_close(weights, torch.tensor(expected))


def test_min_snr_rejects_bad_gamma_and_type():
    with pytest.raises(ValueError, match="--snr_gamma"):
        min_snr_weights(SNR, 0.0, "epsilon")
    with pytest.raises(ValueError, match="--snr_gamma"):
        DDPMObjective(ALPHAS, "epsilon", snr_gamma=-1.0)
    with pytest.raises(ValueError, match="x0"):
        min_snr_weights(SNR, 5.0, "x0")


def test_snr_matches_diffusers_compute_snr():
    scheduler = DDPMScheduler()
    t = torch.arange(1000)
    snr = snr_from_alphas_cumprod(scheduler.alphas_cumprod, t)
    torch.testing.assert_close(snr, compute_snr(scheduler, t), rtol=1e-4, atol=0)
    # Hang et al.'s min(SNR, γ)/SNR agrees with our rewrite wherever SNR > 0.
    torch.testing.assert_close(min_snr_weights(snr, 5.0, "epsilon"), torch.clamp(snr, max=5.0) / snr)
    expected = torch.tensor([math.inf, 16 / 9, 9 / 16, 0.0])
    torch.testing.assert_close(snr_from_alphas_cumprod(ALPHAS, torch.arange(4)), expected)


def test_objective_weighting_is_min_snr_and_loss_is_weighted_mean():
    x0 = latents()
    noised = ddpm("epsilon", t=1, snr_gamma=1.0).noise(x0, gen())  # SNR = 0.64/0.36 = 16/9
    torch.testing.assert_close(noised.weighting, torch.full((3,), 9 / 16))

    target = torch.zeros(2, 1, 2, 2)
    pred = torch.ones(2, 1, 2, 2) * torch.tensor([1.0, 2.0]).view(2, 1, 1, 1)
    t = torch.zeros(2, dtype=torch.int64)
    hand = Noised(noisy=target, timesteps=t, target=target, weighting=torch.tensor([0.5, 2.0]))
    torch.testing.assert_close(ddpm().loss(pred, hand), torch.tensor([0.5 * 1.0, 2.0 * 4.0]))
    torch.testing.assert_close(ddpm().loss(pred.half(), hand), torch.tensor([0.5, 8.0]))
    with pytest.raises(ValueError, match="shape"):
        ddpm().loss(pred[:, :, :1], hand)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_zero_terminal_snr_schedule_has_no_nan(prediction_type):
    alphas = DDPMScheduler(beta_schedule="scaled_linear", rescale_betas_zero_snr=True).alphas_cumprod
    assert alphas[-1] == 0
    t = torch.arange(1000)
    weights = min_snr_weights(snr_from_alphas_cumprod(alphas, t), 5.0, prediction_type)
    assert torch.isfinite(weights).all()
    if prediction_type == "epsilon":
        assert weights[-1] == 1.0
    # The terminal step through the objective: x_t is pure noise.
    obj = DDPMObjective(alphas, prediction_type, snr_gamma=5.0, timestep_weights=only(999, 1000))
    x0 = latents()
    noised = obj.noise(x0, gen())
    loss = obj.loss(torch.zeros_like(x0), noised)
    assert torch.isfinite(noised.noisy).all() and torch.isfinite(loss).all()


# --------------------------------------------------------------------------- DREAM


def test_dream_closed_form():
    x0 = latents()
    noised = ddpm("epsilon", t=2).noise(x0, gen(5))
    eps = noised.target.clone()
    noisy_before = noised.noisy.clone()
    pred = 0.25 * eps  # ε̂ fixed: ε − ε̂ = 0.75·ε

    dreamed = ddpm().dream(noised, pred, detail_preservation=1.0)  # λ = 0.8, Δ = 0.6·ε
    torch.testing.assert_close(dreamed.noisy, noisy_before + 0.8 * 0.6 * eps)
    torch.testing.assert_close(dreamed.target, 1.6 * eps)
    assert torch.equal(dreamed.timesteps, noised.timesteps)
    assert torch.equal(noised.noisy, noisy_before) and torch.equal(noised.target, eps)

    dreamed0 = ddpm().dream(noised, pred, detail_preservation=0.0)  # λ = 1, Δ = 0.75·ε
    torch.testing.assert_close(dreamed0.target, 1.75 * eps)
    torch.testing.assert_close(dreamed0.noisy, noisy_before + 0.8 * 0.75 * eps)


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_dream_other_prediction_types_not_implemented(prediction_type):
    obj = ddpm(prediction_type)
    noised = obj.noise(latents(), gen())
    with pytest.raises(NotImplementedError, match=prediction_type):
        obj.dream(noised, torch.zeros_like(noised.target), 1.0)


# --------------------------------------------------------------------------- timestep bias


@pytest.mark.parametrize(
    "kwargs, raw",
    [
        (dict(strategy="none"), [1] * 10),
        (dict(strategy="later", multiplier=2.0, portion=0.3), [1] * 7 + [2] * 3),
        (dict(strategy="earlier", multiplier=2.0, portion=0.3), [2] * 3 + [1] * 7),
        (dict(strategy="range", multiplier=3.0, begin=2, end=5, portion=0.0), [1, 1, 3, 3, 3, 1, 1, 1, 1, 1]),
        (dict(strategy="later", multiplier=0.5, portion=1.0), [1] * 10),  # all biased = uniform
    ],
)
def test_timestep_bias_exact_weights(kwargs, raw):
    weights = timestep_bias_weights(num_timesteps=10, **kwargs)
    raw = torch.tensor(raw, dtype=torch.float32)
    torch.testing.assert_close(weights, raw / raw.sum())


@pytest.mark.parametrize(
    "kwargs, biased",
    [
        (dict(strategy="later", multiplier=2.5, portion=0.2), slice(800, 1000)),
        (dict(strategy="earlier", multiplier=0.5, portion=0.4), slice(0, 400)),
        (dict(strategy="range", multiplier=4.0, begin=100, end=300), slice(100, 300)),
    ],
)
def test_timestep_bias_sampling_share(kwargs, biased):
    num, m = 1000, kwargs["multiplier"]
    n = biased.stop - biased.start
    weights = timestep_bias_weights(num_timesteps=num, **kwargs)
    obj = DDPMObjective(torch.linspace(0.999, 0.001, num), "epsilon", timestep_weights=weights)
    t = obj.noise(torch.zeros(200_000, 1, 1, 1), gen(11)).timesteps
    share = ((t >= biased.start) & (t < biased.stop)).float().mean().item()
    expected = m * n / (m * n + num - n)
    assert abs(share - expected) < 0.005  # ≈ 4.5 standard errors at 200k draws


@pytest.mark.parametrize(
    "kwargs, flag",
    [
        (dict(strategy="middle"), "--timestep_bias_strategy"),
        (dict(strategy="later", multiplier=0.0), "--timestep_bias_multiplier"),
        (dict(strategy="later", multiplier=-1.0), "--timestep_bias_multiplier"),
        (dict(strategy="none", multiplier=math.nan), "--timestep_bias_multiplier"),
        (dict(strategy="later", portion=0.0), "--timestep_bias_portion"),
        (dict(strategy="earlier", portion=1.5), "--timestep_bias_portion"),
        (dict(strategy="later", portion=0.05), "--timestep_bias_portion"),  # int(0.05·10) = 0
        (dict(strategy="range", begin=-1, end=5), "--timestep_bias_begin"),
        (dict(strategy="range", begin=5, end=5), "--timestep_bias_begin"),
        (dict(strategy="range", begin=0, end=11), "--timestep_bias_end"),
    ],
)
def test_timestep_bias_invalid_values_name_the_flag(kwargs, flag):
    with pytest.raises(ValueError, match=flag):
        timestep_bias_weights(num_timesteps=10, **kwargs)


def test_validate_timestep_bias_without_scheduler():
    validate_timestep_bias("range", 2.0, begin=0, end=5000, portion=0.25)  # end vs T checked later
    validate_timestep_bias("later", 2.0, begin=7, end=3, portion=0.25)  # range flags ignored
    with pytest.raises(ValueError, match="--timestep_bias_begin"):
        validate_timestep_bias("range", 2.0, begin=7, end=3, portion=0.25)
    with pytest.raises(ValueError, match="--timestep_bias_multiplier"):
        validate_timestep_bias("none", 0.0, begin=0, end=1000, portion=0.25)


# --------------------------------------------------------------------------- flow matching


def flow(weighting_scheme="logit_normal", sigmas=None, timesteps=None, **kw) -> FlowMatchingObjective:
    if sigmas is None:
        sigmas, timesteps = flow_sigma_table(FlowMatchEulerDiscreteScheduler(shift=3.0))
    elif timesteps is None:
        timesteps = sigmas * 1000
    return FlowMatchingObjective(sigmas, timesteps, weighting_scheme=weighting_scheme, **kw)


def test_flow_sigma_table_matches_shifted_schedule_without_mutation():
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    before = scheduler.sigmas.clone(), scheduler.timesteps.clone()
    sigmas, timesteps = flow_sigma_table(scheduler)
    s = torch.arange(1000, 0, -1, dtype=torch.float32) / 1000
    torch.testing.assert_close(sigmas, 3 * s / (1 + 2 * s))
    torch.testing.assert_close(timesteps, sigmas * 1000)
    assert sigmas[0] == 1 and (sigmas[1:] < sigmas[:-1]).all() and sigmas[-1] > 0
    sigmas.zero_()  # a copy: the scheduler must stay untouched
    assert torch.equal(scheduler.sigmas, before[0]) and torch.equal(scheduler.timesteps, before[1])

    scheduler.set_timesteps(28)
    with pytest.raises(ValueError, match="set_timesteps"):
        flow_sigma_table(scheduler)


def test_flow_noisy_and_targets_and_exact_velocity_gives_zero_loss():
    x0 = latents()
    velocity_obj, precond_obj = flow(precondition_outputs=False), flow(precondition_outputs=True)
    raw = velocity_obj.noise(x0, gen(9))
    pre = precond_obj.noise(x0, gen(9))
    eps = raw.target + x0  # velocity target is ε − x0
    assert raw.sigmas.shape == (3, 1, 1, 1) and raw.sigmas.dtype == torch.float32
    torch.testing.assert_close(raw.noisy, (1 - raw.sigmas) * x0 + raw.sigmas * eps)
    torch.testing.assert_close(pre.noisy, raw.noisy)
    torch.testing.assert_close(pre.target, x0)

    exact_velocity = eps - x0
    torch.testing.assert_close(velocity_obj.loss(exact_velocity, raw), torch.zeros(3))
    torch.testing.assert_close(precond_obj.loss(exact_velocity, pre), torch.zeros(3), atol=1e-6, rtol=0)
    # Preconditioning: x̂0 = x_t − σ·v̂; a zero prediction leaves the error x_t − x0.
    expected = ((pre.noisy - x0) ** 2).mean(dim=(1, 2, 3)) * pre.weighting
    torch.testing.assert_close(precond_obj.loss(torch.zeros_like(x0), pre), expected)


def test_flow_timesteps_and_sigmas_come_from_the_scheduler_table():
    obj = flow()
    noised = obj.noise(torch.zeros(4096, 1, 2, 2), gen(2))
    sig = noised.sigmas.reshape(-1)
    assert torch.isin(sig, obj.scheduler_sigmas).all()
    assert noised.timesteps.dtype == torch.float32
    torch.testing.assert_close(noised.timesteps, sig * 1000)
    idx = torch.searchsorted(-obj.scheduler_sigmas, -sig)
    assert torch.equal(obj.scheduler_timesteps[idx], noised.timesteps)


def test_flow_determinism():
    obj, x0 = flow(), latents()
    first = obj.noise(x0, gen(2))
    assert_same_noised(first, obj.noise(x0, gen(2)))
    assert torch.equal(first.sigmas, obj.noise(x0, gen(2)).sigmas)
    other = obj.noise(x0, gen(3))
    assert not torch.equal(first.noisy, other.noisy) and not torch.equal(first.sigmas, other.sigmas)


@pytest.mark.parametrize(
    "scheme, expected",
    [
        ("sigma_sqrt", 4.0),  # σ^-2
        ("cosmap", 4 / math.pi),  # 2/(π(1 − 2σ + 2σ²))
        ("none", 1.0),
        ("uniform", 1.0),
        ("logit_normal", 1.0),
        ("mode", 1.0),
    ],
)
def test_flow_weighting_at_known_sigma(scheme, expected):
    obj = flow(scheme, sigmas=torch.tensor([0.5]))  # every draw selects σ = 0.5
    noised = obj.noise(latents(), gen())
    assert noised.weighting.shape == (3,) and noised.weighting.dtype == torch.float32
    torch.testing.assert_close(noised.weighting, torch.full((3,), expected))


def test_flow_weighting_follows_sigma():
    obj = flow("cosmap")
    noised = obj.noise(torch.zeros(64, 1, 1, 1), gen())
    s = noised.sigmas.reshape(-1)
    torch.testing.assert_close(noised.weighting, 2 / (math.pi * (1 - 2 * s + 2 * s**2)))
    noised = flow("sigma_sqrt").noise(torch.zeros(64, 1, 1, 1), gen())
    torch.testing.assert_close(noised.weighting, noised.sigmas.reshape(-1) ** -2)


def draw_u(scheme, n=100_000, num=1000, **kw) -> torch.Tensor:
    """Midpoint of the sampled table cell, i.e. u up to 1/(2·num)."""
    timesteps = torch.arange(num, dtype=torch.float32)  # timesteps table = index
    obj = flow(scheme, sigmas=torch.linspace(1.0, 0.001, num), timesteps=timesteps, **kw)
    idx = obj.noise(torch.zeros(n, 1, 1, 1), gen(17)).timesteps
    return (idx + 0.5) / num


@pytest.mark.parametrize("scheme", ["none", "uniform", "sigma_sqrt", "cosmap"])
def test_flow_uniform_schemes_draw_uniform_u(scheme):
    u = draw_u(scheme)
    assert abs(u.mean() - 0.5) < 0.005
    assert abs(u.var() - 1 / 12) < 0.002
    # Kolmogorov–Smirnov: critical value at α = 0.001 is 1.95/sqrt(n); cells add 1/num.
    empirical = torch.arange(1, u.numel() + 1) / u.numel()
    ks = (u.sort().values - empirical).abs().max()
    assert ks < 1.95 / math.sqrt(u.numel()) + 1e-3


def test_flow_logit_normal_moments():
    u = draw_u("logit_normal", logit_mean=0.7, logit_std=0.8)
    logit = torch.log(u / (1 - u))
    assert abs(logit.mean() - 0.7) < 0.02
    assert abs(logit.std() - 0.8) < 0.02


@pytest.mark.parametrize("mean, expected_index", [(40.0, 999), (-40.0, 0)])
def test_flow_indices_stay_in_range_when_u_saturates(mean, expected_index):
    obj = flow(logit_mean=mean)  # sigmoid(40) == 1.0 in float32: u·N == N
    noised = obj.noise(torch.zeros(16, 1, 1, 1), gen())
    assert torch.equal(noised.sigmas.reshape(-1), obj.scheduler_sigmas[expected_index].expand(16))


def test_flow_mode_scheme_stays_in_range():
    obj = flow("mode", mode_scale=1.29)
    noised = obj.noise(torch.zeros(10_000, 1, 1, 1), gen())
    assert torch.isin(noised.sigmas.reshape(-1), obj.scheduler_sigmas).all()


def test_flow_invalid_configuration_raises():
    with pytest.raises(ValueError, match="--weighting_scheme"):
        flow("logit-normal")
    with pytest.raises(ValueError, match="--mode_scale"):
        flow("mode", mode_scale=3.0)
    with pytest.raises(ValueError, match="equal-length"):
        flow(sigmas=torch.ones(3), timesteps=torch.ones(4))


# --------------------------------------------------------------------------- DreamBooth prior


def test_split_prior_exact_value():
    per_sample = torch.tensor([1.0, 3.0, 10.0, 20.0])
    torch.testing.assert_close(split_prior(per_sample, 0.5), torch.tensor(2.0 + 0.5 * 15.0))


@pytest.mark.parametrize("shape", [(3,), (0,), (2, 2)])
def test_split_prior_rejects_bad_batches(shape):
    with pytest.raises(ValueError, match="even"):
        split_prior(torch.ones(shape), 1.0)


# --------------------------------------------------------------------------- gradients


def test_losses_are_differentiable_and_dream_does_not_backprop_into_its_prediction():
    x0 = latents().to(torch.bfloat16)
    for obj in (ddpm(snr_gamma=5.0), flow("cosmap")):
        noised = obj.noise(x0, gen())
        pred = torch.zeros_like(x0, requires_grad=True)
        obj.loss(pred, noised).sum().backward()
        assert pred.grad is not None and torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0
    pred = torch.zeros_like(x0, requires_grad=True)
    dreamed = ddpm().dream(ddpm().noise(x0, gen()), pred, 1.0)
    assert not dreamed.target.requires_grad and not dreamed.noisy.requires_grad
