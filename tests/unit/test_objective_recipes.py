"""Closed-form tests for the objective recipes of issue 21 (kohya sd-scripts' loss and noise knobs,
SD3 timestep shifts, SD3.5 positional-embedding crop) in sdft.objectives."""

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.models.embeddings import PatchEmbed
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

from sdft.objectives import (
    DDPMObjective,
    FlowMatchingObjective,
    Noised,
    ResolutionShift,
    debiased_estimation_weights,
    elementwise_loss,
    flow_sigma_table,
    huber_c_for,
    pos_embed_crop_offset,
    pyramid_noise,
    shift_sigmas,
    split_prior,
    timestep_bias_weights,
    validate_flow_shift,
    validate_input_perturbation,
    validate_loss_type,
    validate_multires_noise,
    validate_noise_offset,
    validate_pos_emb_random_crop_rate,
    validate_timestep_window,
)

# sqrt(ᾱ) and sqrt(1 − ᾱ): t=0 (1, 0), t=1 (0.8, 0.6), t=2 (0.6, 0.8), t=3 (0, 1).
ALPHAS = torch.tensor([1.0, 0.64, 0.36, 0.0])
LINEAR_ALPHAS = torch.linspace(0.999, 0.001, 1000)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def only(t: int, num: int = 4) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(t), num).float()


def latents(b=3, c=4, h=6, w=8, seed=123) -> torch.Tensor:
    return torch.randn(b, c, h, w, generator=gen(seed))


def flow_table(shift: float = 3.0, num: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    return flow_sigma_table(FlowMatchEulerDiscreteScheduler(shift=shift, num_train_timesteps=num))


# --------------------------------------------------------------------------- loss types

RESIDUALS = torch.tensor([0.0, 0.1, 1.0, -1.0]).reshape(1, 4, 1, 1)
C = torch.tensor([0.1])


@pytest.mark.parametrize(
    "loss_type, expected",
    [
        ("l2", [0.0, 0.01, 1.0, 1.0]),
        ("l1", [0.0, 0.1, 1.0, 1.0]),
        # 2c·(sqrt(r² + c²) − c) with c = 0.1
        ("huber", [0.0, 0.2 * (math.sqrt(0.02) - 0.1), 0.2 * (math.sqrt(1.01) - 0.1), 0.2 * (math.sqrt(1.01) - 0.1)]),
        # 2·(sqrt(r² + c²) − c)
        ("smooth_l1", [0.0, 2 * (math.sqrt(0.02) - 0.1), 2 * (math.sqrt(1.01) - 0.1), 2 * (math.sqrt(1.01) - 0.1)]),
    ],
)
def test_elementwise_loss_closed_form(loss_type, expected):
    pred = RESIDUALS.half()  # low-precision predictions are compared in float32
    loss = elementwise_loss(pred, torch.zeros_like(RESIDUALS), loss_type, C)
    assert loss.dtype == torch.float32 and loss.shape == RESIDUALS.shape
    torch.testing.assert_close(loss.reshape(-1), torch.tensor(expected), atol=1e-6, rtol=1e-3)


def test_pseudo_huber_limits_and_per_sample_threshold():
    small = torch.full((2, 1, 1, 1), 1e-3)
    # |r| ≪ c: huber ≈ r² and smooth_l1 ≈ r²/c; |r| ≫ c: huber ≈ 2c|r| − 2c².
    c = torch.tensor([1.0, 10.0])
    torch.testing.assert_close(elementwise_loss(small, 0 * small, "huber", c).reshape(-1), torch.full((2,), 1e-6))
    torch.testing.assert_close(elementwise_loss(small, 0 * small, "smooth_l1", c).reshape(-1), 1e-6 / c)
    large = torch.full((2, 1, 1, 1), 1e4)
    torch.testing.assert_close(elementwise_loss(large, 0 * large, "huber", c).reshape(-1),
                               2 * c * 1e4 - 2 * c**2, rtol=1e-5, atol=0)
    with pytest.raises(ValueError, match="huber_c"):
        elementwise_loss(small, small, "huber")
    with pytest.raises(ValueError, match="shape"):
        elementwise_loss(small, small[:, :, :0], "l1")
    with pytest.raises(ValueError, match="--loss_type"):
        elementwise_loss(small, small, "l3")


def test_huber_schedules_at_known_ddpm_timesteps():
    t = torch.arange(4)
    ratio = torch.tensor([1.0, 4 / 7, 3 / 7, 0.0])  # sqrt(ᾱ)/(sqrt(ᾱ) + sqrt(1 − ᾱ))
    obj = DDPMObjective(ALPHAS, "epsilon", loss_type="huber", huber_schedule="snr", huber_c=0.1)
    torch.testing.assert_close(obj.huber_thresholds(t), 0.9 * ratio**2 + 0.1)
    # kohya's own form (1 − c)/(1 + sqrt((1 − ᾱ)/ᾱ))² + c where it is finite
    kohya = 0.9 / (1 + ((1 - ALPHAS[1:3]) / ALPHAS[1:3]).sqrt()) ** 2 + 0.1
    torch.testing.assert_close(obj.huber_thresholds(t)[1:3], kohya)

    expo = DDPMObjective(ALPHAS, "epsilon", loss_type="huber", huber_schedule="exponential", huber_c=0.1,
                         huber_scale=2.0)
    torch.testing.assert_close(expo.huber_thresholds(t), 2 * torch.tensor([1.0, 0.1**0.25, 0.1**0.5, 0.1**0.75]))
    long = DDPMObjective(LINEAR_ALPHAS, "epsilon", loss_type="smooth_l1", huber_schedule="exponential", huber_c=0.2)
    # kohya: exp(−(−ln c / T)·t)
    t_long = torch.tensor([0, 500, 999])
    torch.testing.assert_close(long.huber_thresholds(t_long), torch.exp(math.log(0.2) / 1000 * t_long.float()))

    const = DDPMObjective(ALPHAS, "epsilon", loss_type="huber", huber_schedule="constant", huber_c=0.1,
                          huber_scale=3.0)
    torch.testing.assert_close(const.huber_thresholds(t), torch.full((4,), 0.3))


def test_huber_schedules_at_known_flow_sigmas():
    sigmas = torch.tensor([0.0, 0.5, 1.0]).reshape(3, 1, 1, 1)
    table = flow_table()
    snr = FlowMatchingObjective(*table, loss_type="huber", huber_c=0.1)
    torch.testing.assert_close(snr.huber_thresholds(sigmas), torch.tensor([1.0, 0.325, 0.1]))
    expo = FlowMatchingObjective(*table, loss_type="huber", huber_schedule="exponential", huber_c=0.1,
                                 huber_scale=2.0)
    torch.testing.assert_close(expo.huber_thresholds(sigmas), 2 * torch.tensor([1.0, 0.1**0.5, 0.1]))
    torch.testing.assert_close(huber_c_for("constant", sigmas.reshape(-1), 1 - sigmas.reshape(-1), 0.1, 2.0),
                               torch.full((3,), 0.2))


def test_ddpm_huber_loss_with_weighting_mask_and_prior():
    target = torch.zeros(4, 1, 2, 2)
    pred = torch.zeros(4, 1, 2, 2)
    pred[:, 0, 0, 0] = torch.tensor([1.0, 2.0, 1.0, 2.0])  # one pixel off per sample
    t = torch.tensor([1, 1, 2, 2])
    weighting = torch.tensor([0.5, 2.0, 1.0, 4.0])
    noised = Noised(noisy=target, timesteps=t, target=target, weighting=weighting)
    obj = DDPMObjective(ALPHAS, "epsilon", loss_type="huber", huber_schedule="constant", huber_c=0.1)
    at = {1.0: 0.2 * (math.sqrt(1.01) - 0.1), 2.0: 0.2 * (math.sqrt(4.01) - 0.1)}
    plain = torch.tensor([at[1.0], at[2.0], at[1.0], at[2.0]]) / 4  # mean over 4 pixels
    torch.testing.assert_close(obj.loss(pred, noised), weighting * plain)
    # A mask on the wrong pixel half-weighted: loss_b = (1·huber(r) + 0.5·0) / 1.5
    mask = torch.zeros(4, 1, 2, 2)
    mask[:, 0, 0, 0], mask[:, 0, 1, 1] = 1.0, 0.5
    masked = weighting * plain * 4 / 1.5
    torch.testing.assert_close(obj.loss(pred, noised, mask), masked)
    torch.testing.assert_close(split_prior(obj.loss(pred, noised, mask), 0.25),
                               masked[:2].mean() + 0.25 * masked[2:].mean())
    # The snr schedule reads the per-sample timestep: c differs between t = 1 and t = 2.
    snr_obj = DDPMObjective(ALPHAS, "epsilon", loss_type="huber", huber_c=0.1)
    c = 0.9 * torch.tensor([4 / 7, 4 / 7, 3 / 7, 3 / 7]) ** 2 + 0.1
    r = pred[:, 0, 0, 0]
    torch.testing.assert_close(snr_obj.loss(pred, noised), weighting * 2 * c * ((r**2 + c**2).sqrt() - c) / 4)


def test_ddpm_l1_loss_with_min_snr():
    obj = DDPMObjective(ALPHAS, "epsilon", snr_gamma=1.0, loss_type="l1", timestep_weights=only(1))
    x0 = latents()
    noised = obj.noise(x0, gen())
    torch.testing.assert_close(noised.weighting, torch.full((3,), 9 / 16))  # SNR = 16/9
    pred = noised.target + 0.5
    torch.testing.assert_close(obj.loss(pred, noised), torch.full((3,), 9 / 16 * 0.5))


def test_flow_loss_types_with_sd3_weighting_and_preconditioning():
    half = torch.tensor([0.5])
    x0 = latents()
    obj = FlowMatchingObjective(half, half * 1000, "cosmap", loss_type="l1")
    noised = obj.noise(x0, gen(4))
    # zero velocity: x̂0 = x_t, so the error is x_t − x0 = 0.5·(ε − x0)
    expected = 4 / math.pi * (noised.noisy - x0).abs().mean(dim=(1, 2, 3))
    torch.testing.assert_close(obj.loss(torch.zeros_like(x0), noised), expected)

    huber = FlowMatchingObjective(half, half * 1000, "sigma_sqrt", loss_type="huber", precondition_outputs=False)
    noised = huber.noise(x0, gen(4))
    c = 0.9 * 0.25 + 0.1  # snr schedule at σ = 0.5
    r = -noised.target  # zero prediction against the velocity target
    expected = 4.0 * (2 * c * ((r**2 + c**2).sqrt() - c)).mean(dim=(1, 2, 3))
    torch.testing.assert_close(huber.loss(torch.zeros_like(x0), noised), expected)
    # Masked: only the first latent pixel of each sample counts.
    mask = torch.zeros(3, 1, 6, 8)
    mask[:, :, 0, 0] = 1.0
    masked = 4.0 * (2 * c * ((r**2 + c**2).sqrt() - c))[:, :, 0, 0].mean(dim=1)
    torch.testing.assert_close(huber.loss(torch.zeros_like(x0), noised, mask), masked)


@pytest.mark.parametrize(
    "kwargs, flag",
    [
        (dict(loss_type="l3"), "--loss_type"),
        (dict(loss_type="huber", huber_schedule="linear"), "--huber_schedule"),
        (dict(loss_type="huber", huber_c=0.0), "--huber_c"),
        (dict(loss_type="smooth_l1", huber_c=math.nan), "--huber_c"),
        (dict(loss_type="huber", huber_scale=-1.0), "--huber_scale"),
    ],
)
def test_loss_type_validation_names_the_flag(kwargs, flag):
    with pytest.raises(ValueError, match=flag):
        validate_loss_type(**kwargs)
    with pytest.raises(ValueError, match=flag):
        DDPMObjective(ALPHAS, "epsilon", **kwargs)
    with pytest.raises(ValueError, match=flag):
        FlowMatchingObjective(*flow_table(), **kwargs)


def test_loss_type_validation_ignores_huber_numbers_for_l2():
    validate_loss_type("l2", "snr", huber_c=0.0, huber_scale=0.0)


# --------------------------------------------------------------------------- debiased estimation


def test_debiased_weights_at_known_snr():
    snr = torch.tensor([math.inf, 4.0, 1.0, 0.25, 0.0])
    cap = math.sqrt(1000)
    torch.testing.assert_close(debiased_estimation_weights(snr, "epsilon"),
                               torch.tensor([1 / cap, 0.5, 1.0, 2.0, cap]))
    torch.testing.assert_close(debiased_estimation_weights(snr, "v_prediction"),
                               torch.tensor([1 / 1001, 0.2, 0.5, 0.8, 1.0]))
    torch.testing.assert_close(debiased_estimation_weights(snr, "sample"),
                               torch.tensor([cap, 2.0, 1.0, 0.5, 0.0]))
    with pytest.raises(ValueError, match="prediction_type"):
        debiased_estimation_weights(snr, "flow")


def test_debiased_estimation_in_the_objective_multiplies_min_snr():
    x0 = latents()
    # t = 1: SNR = 16/9, 1/sqrt(SNR) = 3/4; Min-SNR with γ = 1 gives 9/16.
    debiased = DDPMObjective(ALPHAS, "epsilon", debiased_estimation=True, timestep_weights=only(1))
    torch.testing.assert_close(debiased.noise(x0, gen()).weighting, torch.full((3,), 0.75))
    both = DDPMObjective(ALPHAS, "epsilon", snr_gamma=1.0, debiased_estimation=True, timestep_weights=only(1))
    torch.testing.assert_close(both.noise(x0, gen()).weighting, torch.full((3,), 9 / 16 * 0.75))
    v_pred = DDPMObjective(ALPHAS, "v_prediction", debiased_estimation=True, timestep_weights=only(1))
    torch.testing.assert_close(v_pred.noise(x0, gen()).weighting, torch.full((3,), 9 / 25))
    # The same draws as without the weighting.
    plain = DDPMObjective(ALPHAS, "epsilon", timestep_weights=only(1)).noise(x0, gen())
    assert torch.equal(debiased.noise(x0, gen()).noisy, plain.noisy)


# --------------------------------------------------------------------------- timestep window


def test_min_max_timestep_bounds_every_draw():
    obj = DDPMObjective(LINEAR_ALPHAS, "epsilon", min_timestep=200, max_timestep=300)
    t = obj.noise(torch.zeros(1000, 1, 1, 1), gen(5)).timesteps
    assert t.min() >= 200 and t.max() < 300
    assert t.min() == 200 and t.max() == 299  # 1000 draws over 100 values reach both ends
    low_only = DDPMObjective(LINEAR_ALPHAS, "epsilon", min_timestep=900)
    t = low_only.noise(torch.zeros(1000, 1, 1, 1), gen(5)).timesteps
    assert t.min() >= 900 and t.max() <= 999


def test_min_max_timestep_with_timestep_bias():
    bias = timestep_bias_weights("later", 1000, multiplier=2.0, portion=0.25)  # doubles 750..999
    obj = DDPMObjective(LINEAR_ALPHAS, "epsilon", timestep_weights=bias, min_timestep=700, max_timestep=800)
    t = obj.noise(torch.zeros(20_000, 1, 1, 1), gen(6)).timesteps
    assert t.min() >= 700 and t.max() < 800
    share = (t >= 750).float().mean().item()
    assert abs(share - 2 / 3) < 0.015  # 2·50 / (2·50 + 50); ≈ 4.5 standard errors
    with pytest.raises(ValueError, match="--min_timestep/--max_timestep"):
        DDPMObjective(LINEAR_ALPHAS, "epsilon", min_timestep=500, max_timestep=600, timestep_weights=only(3, 1000))


def test_default_window_draws_exactly_the_unwindowed_timesteps():
    x0 = torch.zeros(64, 1, 1, 1)
    plain = DDPMObjective(LINEAR_ALPHAS, "epsilon").noise(x0, gen(8))
    full = DDPMObjective(LINEAR_ALPHAS, "epsilon", min_timestep=0, max_timestep=1000).noise(x0, gen(8))
    assert torch.equal(plain.timesteps, full.timesteps) and torch.equal(plain.noisy, full.noisy)


@pytest.mark.parametrize(
    "low, high, num, message",
    [
        (-1, None, 1000, "--min_timestep must be >= 0"),
        (500, 500, 1000, "--min_timestep must be below --max_timestep"),
        (600, 500, None, "--min_timestep must be below --max_timestep"),
        (0, 1001, 1000, "--max_timestep must be <= the number of training timesteps"),
        (1000, None, 1000, "--min_timestep must be below the number of training timesteps"),
    ],
)
def test_timestep_window_validation(low, high, num, message):
    with pytest.raises(ValueError, match=message):
        validate_timestep_window(low, high, num)


def test_timestep_window_validation_at_parse_time_skips_t():
    validate_timestep_window(None, 5000, None)
    validate_timestep_window(None, None, None)
    with pytest.raises(ValueError, match="--max_timestep"):
        DDPMObjective(LINEAR_ALPHAS, "epsilon", max_timestep=5000)


# --------------------------------------------------------------------------- multires noise


def test_multires_noise_one_iteration_closed_form():
    g = gen(3)
    eps = torch.randn(2, 3, 8, 8, generator=g)
    out = pyramid_noise(eps, g, iterations=1)
    replay = gen(3)
    first = torch.randn(2, 3, 8, 8, generator=replay)
    z = torch.randn(2, 3, 8, 8, generator=replay)
    torch.testing.assert_close(out, (first + z) / (first + z).std())


def test_multires_noise_two_iterations_closed_form():
    g = gen(4)
    eps = torch.randn(1, 2, 16, 12, generator=g)
    out = pyramid_noise(eps, g, iterations=2, discount=0.5)
    replay = gen(4)
    torch.randn(1, 2, 16, 12, generator=replay)
    r = 2 + 2 * torch.rand(1, generator=replay).item()
    size = (int(16 / r), int(12 / r))
    z0 = torch.randn(1, 2, 16, 12, generator=replay)
    z1 = torch.randn(1, 2, *size, generator=replay)
    up = torch.nn.functional.interpolate(z1, size=(16, 12), mode="bilinear", align_corners=False)
    total = eps + z0 + 0.5 * up
    torch.testing.assert_close(out, total / total.std())


def test_multires_noise_shape_and_statistics():
    eps = torch.randn(8, 4, 64, 64, generator=gen(1))
    out = pyramid_noise(eps, gen(2), iterations=6, discount=0.8)
    assert out.shape == eps.shape and out.dtype == torch.float32
    assert abs(out.std().item() - 1.0) < 1e-5  # normalised over the batch
    assert abs(out.mean().item()) < 0.1
    # Low-frequency levels correlate neighbouring pixels; white noise does not.
    def neighbour_corr(x):
        return torch.corrcoef(torch.stack([x[..., :-1].reshape(-1), x[..., 1:].reshape(-1)]))[0, 1].item()
    assert abs(neighbour_corr(eps)) < 0.02 and neighbour_corr(out) > 0.2
    tiny = pyramid_noise(torch.randn(1, 1, 4, 4, generator=gen()), gen(), iterations=50)  # stops at 1 pixel
    assert torch.isfinite(tiny).all()


def test_multires_noise_in_the_objective_is_the_target():
    obj = DDPMObjective(ALPHAS, "epsilon", multires_noise_iterations=1, timestep_weights=only(2))
    x0 = latents()
    noised = obj.noise(x0, gen(9))
    replay = gen(9)
    torch.multinomial(only(2), 3, replacement=True, generator=replay)
    eps = torch.randn(x0.shape, generator=replay)
    z = torch.randn(x0.shape, generator=replay)
    torch.testing.assert_close(noised.target, (eps + z) / (eps + z).std())
    torch.testing.assert_close(noised.noisy, 0.6 * x0 + 0.8 * noised.target)


@pytest.mark.parametrize("iterations, discount, flag", [(-1, 0.3, "--multires_noise_iterations"),
                                                        (6, 0.0, "--multires_noise_discount"),
                                                        (6, math.inf, "--multires_noise_discount")])
def test_multires_validation(iterations, discount, flag):
    with pytest.raises(ValueError, match=flag):
        validate_multires_noise(iterations, discount)
    with pytest.raises(ValueError, match=flag):
        DDPMObjective(ALPHAS, "epsilon", multires_noise_iterations=iterations, multires_noise_discount=discount)


# --------------------------------------------------------------------------- input perturbation, noise offset


def replay_timesteps_and_eps(seed: int, shape) -> tuple[torch.Generator, torch.Tensor]:
    g = gen(seed)
    torch.multinomial(only(2), shape[0], replacement=True, generator=g)
    return g, torch.randn(shape, generator=g)


def test_ip_noise_gamma_closed_form():
    x0 = latents()
    noised = DDPMObjective(ALPHAS, "epsilon", input_perturbation=0.5, timestep_weights=only(2)).noise(x0, gen(7))
    g, eps = replay_timesteps_and_eps(7, x0.shape)
    xi = torch.randn(x0.shape, generator=g)
    torch.testing.assert_close(noised.target, eps)
    torch.testing.assert_close(noised.noisy, 0.6 * x0 + 0.8 * (eps + 0.5 * xi))


def test_ip_noise_gamma_random_strength_closed_form():
    x0 = latents()
    obj = DDPMObjective(ALPHAS, "epsilon", input_perturbation=0.5, input_perturbation_random_strength=True,
                        timestep_weights=only(2))
    noised = obj.noise(x0, gen(7))
    g, eps = replay_timesteps_and_eps(7, x0.shape)
    gamma = torch.rand(1, generator=g) * 0.5  # one strength for the batch, as in kohya
    xi = torch.randn(x0.shape, generator=g)
    assert 0 <= gamma.item() < 0.5
    torch.testing.assert_close(noised.noisy, 0.6 * x0 + 0.8 * (eps + gamma * xi))


def test_noise_offset_random_strength_and_adaptive_scale_closed_form():
    x0 = latents() + 2.0
    obj = DDPMObjective(ALPHAS, "epsilon", noise_offset=0.1, noise_offset_random_strength=True,
                        adaptive_noise_scale=0.5, timestep_weights=only(2))
    noised = obj.noise(x0, gen(8))
    g, eps = replay_timesteps_and_eps(8, x0.shape)
    strength = torch.rand(1, generator=g) * 0.1
    offset = strength + 0.5 * x0.mean(dim=(2, 3), keepdim=True).abs()  # (B, C, 1, 1)
    torch.testing.assert_close(noised.target, eps + offset * torch.randn(3, 4, 1, 1, generator=g))
    # A negative adaptive scale is clamped at a zero offset instead of flipping its sign.
    negative = DDPMObjective(ALPHAS, "epsilon", noise_offset=0.1, adaptive_noise_scale=-10.0,
                             timestep_weights=only(2))
    _, eps = replay_timesteps_and_eps(8, x0.shape)
    torch.testing.assert_close(negative.noise(x0, gen(8)).target, eps)


@pytest.mark.parametrize(
    "check, args, message",
    [
        (validate_noise_offset, (0.0, False, 0.5), "--adaptive_noise_scale requires --noise_offset"),
        (validate_noise_offset, (0.0, True, None), "--noise_offset_random_strength requires --noise_offset"),
        (validate_noise_offset, (math.nan, False, None), "--noise_offset must be a finite number"),
        (validate_noise_offset, (0.1, False, math.inf), "--adaptive_noise_scale must be a finite number"),
        (validate_input_perturbation, (-0.1, False), "--ip_noise_gamma"),
        (validate_input_perturbation, (0.0, True), "--ip_noise_gamma_random_strength requires --ip_noise_gamma"),
    ],
)
def test_noise_validation_names_the_flag(check, args, message):
    with pytest.raises(ValueError, match=message):
        check(*args)


def test_objective_runs_the_noise_validations():
    with pytest.raises(ValueError, match="--adaptive_noise_scale requires --noise_offset"):
        DDPMObjective(ALPHAS, "epsilon", adaptive_noise_scale=0.5)
    with pytest.raises(ValueError, match="--ip_noise_gamma_random_strength"):
        DDPMObjective(ALPHAS, "epsilon", input_perturbation_random_strength=True)


# --------------------------------------------------------------------------- SD3 shifts and sampling


def test_static_shift_formula_and_composition():
    sigma = torch.tensor([0.0, 0.25, 0.5, 1.0])
    torch.testing.assert_close(shift_sigmas(sigma, 3.0), torch.tensor([0.0, 0.5, 0.75, 1.0]))
    assert torch.equal(shift_sigmas(sigma, 1.0), sigma)
    torch.testing.assert_close(shift_sigmas(shift_sigmas(sigma, 3.0), 2.0), shift_sigmas(sigma, 6.0))
    torch.testing.assert_close(shift_sigmas(shift_sigmas(sigma, 3.0), 1 / 3), sigma)  # inverse
    # The scheduler's own training table is the unshifted one through the same map.
    base, _ = flow_table(shift=1.0)
    torch.testing.assert_close(shift_sigmas(base, 3.0), flow_table(shift=3.0)[0])


def test_uniform_sampling_with_shift_one_is_flat():
    obj = FlowMatchingObjective(*flow_table(), "uniform", timestep_sampling="uniform", shift=1.0)
    noised = obj.noise(torch.zeros(20_000, 1, 1, 1), gen(12))
    sigma = noised.sigmas.reshape(-1)
    assert sigma.min() > 0 and sigma.max() <= 1
    assert torch.unique(sigma).numel() > 19_000  # continuous, not a 1000-entry table
    torch.testing.assert_close(noised.timesteps, sigma * 1000)
    counts = torch.histc(sigma, bins=20, min=0.0, max=1.0)
    expected = 20_000 / 20
    chi_square = ((counts - expected) ** 2 / expected).sum().item()
    assert chi_square < 43.82  # χ²(19) critical value at α = 0.001
    assert ((counts - expected).abs() < 5 * math.sqrt(expected)).all()


def test_uniform_sampling_with_static_shift_follows_the_shifted_cdf():
    obj = FlowMatchingObjective(*flow_table(), "logit_normal", timestep_sampling="uniform", shift=3.0)
    noised = obj.noise(torch.zeros(20_000, 1, 1, 1), gen(13))
    sigma = noised.sigmas.reshape(-1)
    # P(σ' ≤ y) = shift(y, 1/3): 0.25 at y = 0.5, 0.5 at y = 0.75.
    assert abs((sigma <= 0.5).float().mean().item() - 0.25) < 0.015
    assert abs((sigma <= 0.75).float().mean().item() - 0.5) < 0.015
    # The density is ignored (kohya FLUX's "uniform"), the draws are uniform then shifted:
    replay = gen(13)
    u = 1 - torch.rand(20_000, generator=replay)
    torch.testing.assert_close(sigma, shift_sigmas(u, 3.0))


def test_table_sampling_with_shift_multiplies_the_table_shift():
    sigmas, timesteps = flow_table(shift=1.0)
    x0 = torch.zeros(256, 1, 1, 1)
    shifted = FlowMatchingObjective(sigmas, timesteps, shift=3.0).noise(x0, gen(14))
    reference = FlowMatchingObjective(*flow_table(shift=3.0)).noise(x0, gen(14))
    torch.testing.assert_close(shifted.sigmas, reference.sigmas)
    torch.testing.assert_close(shifted.timesteps, reference.timesteps)


def test_shift_one_is_bit_identical_to_no_shift():
    x0 = latents()
    plain = FlowMatchingObjective(*flow_table()).noise(x0, gen(15))
    one = FlowMatchingObjective(*flow_table(), shift=1.0).noise(x0, gen(15))
    for field in ("noisy", "timesteps", "target", "weighting", "sigmas"):
        assert torch.equal(getattr(plain, field), getattr(one, field)), field


@pytest.mark.parametrize("pixels, expected_mu", [(256, 0.5), (1024, 1.15), (512, 0.5 + 0.65 * 768 / 3840)])
def test_resolution_shift_at_known_sizes(pixels, expected_mu):
    latent = (pixels // 8, pixels // 8)
    rs = ResolutionShift()
    assert rs.image_seq_len(latent) == (pixels // 16) ** 2
    assert rs.shift(latent) == pytest.approx(math.exp(expected_mu), rel=1e-12)
    assert rs.shift(latent) == pytest.approx(math.exp(calculate_shift(rs.image_seq_len(latent))), rel=1e-12)


def test_resolution_shift_in_the_objective():
    obj = FlowMatchingObjective(*flow_table(shift=1.0), "none", timestep_sampling="uniform",
                                resolution_shift=ResolutionShift())
    small = obj.noise(torch.zeros(64, 1, 32, 32), gen(16))  # 256 px
    large = obj.noise(torch.zeros(64, 1, 128, 128), gen(16))  # 1024 px: same u, larger shift
    u = 1 - torch.rand(64, generator=gen(16))
    torch.testing.assert_close(small.sigmas.reshape(-1), shift_sigmas(u, math.exp(0.5)))
    torch.testing.assert_close(large.sigmas.reshape(-1), shift_sigmas(u, math.exp(1.15)))
    assert (large.sigmas >= small.sigmas).all()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(shift=0.0), "--training_shift must be a finite number > 0"),
        (dict(shift=math.nan), "--training_shift"),
        (dict(shift=2.0, resolution_shift=ResolutionShift()), "--training_shift and a resolution-dependent shift"),
        (dict(shift=None, timestep_sampling="sigmoid"), "--timestep_sampling"),
    ],
)
def test_flow_shift_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        validate_flow_shift(**kwargs)
    with pytest.raises(ValueError, match=message):
        FlowMatchingObjective(*flow_table(), **kwargs)


def test_resolution_shift_validation():
    with pytest.raises(ValueError, match="base_image_seq_len"):
        ResolutionShift(base_seq_len=4096, max_seq_len=256)
    with pytest.raises(ValueError, match="patch size"):
        ResolutionShift(patch_size=0)


# --------------------------------------------------------------------------- SD3.5 positional-embedding crop


def test_pos_embed_crop_rate_zero_is_the_diffusers_centre_crop_and_draws_nothing():
    g = gen(17)
    state = g.get_state()
    for grid in [(64, 64), (63, 64), (96, 40)]:
        assert pos_embed_crop_offset(192, grid, 0.0, g) == ((192 - grid[0]) // 2, (192 - grid[1]) // 2)
    assert torch.equal(g.get_state(), state)
    # diffusers' PatchEmbed.cropped_pos_embed cuts the same window.
    embed = PatchEmbed(height=8, width=8, patch_size=1, in_channels=1, embed_dim=4, pos_embed_max_size=8)
    top, left = pos_embed_crop_offset(8, (3, 4), 0.0, g)
    grid = embed.pos_embed.reshape(8, 8, 4)
    torch.testing.assert_close(embed.cropped_pos_embed(3, 4).reshape(3, 4, 4), grid[top:top + 3, left:left + 4])


def test_pos_embed_crop_rate_one_picks_varied_offsets_inside_the_grid():
    g = gen(18)
    offsets = [pos_embed_crop_offset(192, (64, 48), 1.0, g) for _ in range(200)]
    assert len(set(offsets)) > 100
    assert all(0 <= top <= 128 and 0 <= left <= 144 for top, left in offsets)
    assert min(o[0] for o in offsets) < 20 and max(o[0] for o in offsets) > 108
    full = [pos_embed_crop_offset(64, (64, 64), 1.0, g) for _ in range(5)]  # no room: always (0, 0)
    assert set(full) == {(0, 0)}


def test_pos_embed_crop_partial_rate():
    g = gen(19)
    offsets = [pos_embed_crop_offset(192, (64, 64), 0.25, g) for _ in range(4000)]
    centre_share = sum(o == (64, 64) for o in offsets) / len(offsets)
    assert abs(centre_share - 0.75) < 0.03  # a random window hits the centre with p = 1/129²


def test_pos_embed_crop_validation():
    for rate in (-0.1, 1.5, math.nan):
        with pytest.raises(ValueError, match="--pos_emb_random_crop_rate"):
            validate_pos_emb_random_crop_rate(rate)
    with pytest.raises(ValueError, match="does not fit"):
        pos_embed_crop_offset(64, (65, 10), 0.0, gen())
