"""DDPM: schedules against closed forms, samplers against hand-written steps, loss, sample()."""

import math

import numpy as np
import pytest
import torch

from diffusion.methods.ddpm import DDPM
from diffusion.progress import track
from diffusion.schedulers import DDIMScheduler, DDPMScheduler, NoiseSchedule, make_betas, to_original_and_epsilon

PREDICTION_TYPES = ["epsilon", "sample", "v_prediction"]


def linear_alphas_cumprod(T, beta_start=1e-4, beta_end=0.02):
    return np.cumprod(1 - np.linspace(beta_start, beta_end, T, dtype=np.float64))


def toy_model(T, scale=1.0, seed=0):
    """A fixed, deterministic function of (x, t): a random 3x3 conv modulated by t."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(1, 1, 3, 3, generator=gen) * 0.5
    bias = torch.randn(1, generator=gen) * 0.1

    def model(x, t, class_labels=None):
        out = torch.nn.functional.conv2d(x, weight.to(x.dtype), bias.to(x.dtype), padding=1)
        return scale * out * (1 + t.to(x.dtype).reshape(-1, 1, 1, 1) / T)

    return model


def run_sampler(scheduler, model, start_noise, variance_noises=None, generator=None):
    sample = start_noise
    for i, t in enumerate(scheduler.timesteps.tolist()):
        timesteps = torch.full((sample.shape[0],), t, dtype=torch.long)
        variance_noise = None if variance_noises is None else variance_noises[i]
        sample = scheduler.step(model(sample, timesteps), t, sample, variance_noise=variance_noise, generator=generator)
    return sample


# --- schedules ---------------------------------------------------------------------------------


def test_linear_betas_match_linspace():
    betas = make_betas("linear", 1000, 1e-4, 0.02)
    assert betas.dtype == torch.float64
    np.testing.assert_allclose(betas.numpy(), np.linspace(1e-4, 0.02, 1000), rtol=0, atol=1e-15)
    schedule = NoiseSchedule(1000, "linear")
    np.testing.assert_allclose(schedule.alphas_cumprod.numpy(), linear_alphas_cumprod(1000), rtol=1e-12)


def test_cosine_alphas_cumprod_match_nichol_dhariwal():
    T, s = 1000, 0.008

    def alpha_bar(t):  # f(t) / f(0), Nichol & Dhariwal eq. 17
        def f(u):
            return math.cos((u / T + s) / (1 + s) * math.pi / 2) ** 2

        return f(t) / f(0)

    schedule = NoiseSchedule(T, "cosine")
    assert schedule.alphas_cumprod.dtype == torch.float64
    # alphas_cumprod[t] is alpha_bar after t + 1 noising steps; the 0.999 cap only acts at the end.
    for t in [0, 1, 10, 100, 250, 500, 750, 900, 990]:
        assert schedule.alphas_cumprod[t].item() == pytest.approx(alpha_bar(t + 1), rel=1e-10, abs=1e-15)
    betas = schedule.betas.numpy()
    reference = [min(1 - alpha_bar(i + 1) / alpha_bar(i), 0.999) for i in range(T)]
    np.testing.assert_allclose(betas, reference, rtol=1e-9)
    assert betas[-1] == pytest.approx(0.999)


@pytest.mark.parametrize("beta_schedule", ["linear", "cosine"])
def test_posterior_matches_ddpm_paper(beta_schedule):
    schedule = NoiseSchedule(100, beta_schedule, 1e-4, 0.2)
    betas = schedule.betas.numpy()
    alphas = 1 - betas
    alphas_cumprod = np.cumprod(alphas)
    alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
    # Ho et al. eq. 7: mu_tilde = sqrt(ab_prev) beta / (1 - ab) x0 + sqrt(alpha) (1 - ab_prev) / (1 - ab) x_t
    np.testing.assert_allclose(
        schedule.posterior_mean_coef1.numpy(), np.sqrt(alphas_cumprod_prev) * betas / (1 - alphas_cumprod), rtol=1e-10
    )
    np.testing.assert_allclose(
        schedule.posterior_mean_coef2.numpy(),
        np.sqrt(alphas) * (1 - alphas_cumprod_prev) / (1 - alphas_cumprod),
        rtol=1e-10,
    )
    np.testing.assert_allclose(
        schedule.posterior_variance.numpy(),
        (1 - alphas_cumprod_prev) / (1 - alphas_cumprod) * betas,
        rtol=1e-10,
        atol=1e-300,
    )
    assert schedule.posterior_variance[0].item() == 0.0


# --- forward process and conversions -----------------------------------------------------------


def test_add_noise_and_get_velocity_closed_form():
    schedule = NoiseSchedule(1000, "linear")
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 1, 3, 3, generator=gen)
    noise = torch.randn(4, 1, 3, 3, generator=gen)
    timesteps = torch.tensor([0, 10, 500, 999])
    ab = linear_alphas_cumprod(1000)[timesteps.numpy()].reshape(-1, 1, 1, 1)
    x_t = schedule.add_noise(x0, noise, timesteps)
    v = schedule.get_velocity(x0, noise, timesteps)
    assert x_t.dtype == v.dtype == torch.float32
    np.testing.assert_allclose(
        x_t.numpy(), np.sqrt(ab) * x0.numpy() + np.sqrt(1 - ab) * noise.numpy(), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        v.numpy(), np.sqrt(ab) * noise.numpy() - np.sqrt(1 - ab) * x0.numpy(), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_true_target_converts_back_to_true_x0_and_eps(prediction_type):
    schedule = NoiseSchedule(1000, "cosine")
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randn(5, 2, 4, 4, generator=gen, dtype=torch.float64)
    noise = torch.randn(5, 2, 4, 4, generator=gen, dtype=torch.float64)
    timesteps = torch.tensor([0, 1, 300, 700, 998])
    x_t = schedule.add_noise(x0, noise, timesteps)
    target = {"epsilon": noise, "sample": x0, "v_prediction": schedule.get_velocity(x0, noise, timesteps)}[
        prediction_type
    ]
    alpha_prod_t = schedule.alphas_cumprod[timesteps].reshape(-1, 1, 1, 1)
    pred_x0, pred_eps = to_original_and_epsilon(prediction_type, target, x_t, alpha_prod_t)
    torch.testing.assert_close(pred_x0, x0, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(pred_eps, noise, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_clipped_x0_and_rederived_eps_stay_consistent_with_x_t(prediction_type):
    scheduler = DDIMScheduler(num_train_timesteps=50, prediction_type=prediction_type, clip_sample=True)
    x_t = 3 * torch.randn(8, 1, 4, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    model_output = 3 * torch.randn_like(x_t)
    alpha_prod_t = scheduler.alphas_cumprod[30].item()
    pred_x0, pred_eps = scheduler.predict_original_and_epsilon(model_output, alpha_prod_t, x_t)
    assert pred_x0.abs().max() <= 1 and (pred_x0.abs() == 1).any()  # clipping did something
    torch.testing.assert_close(alpha_prod_t**0.5 * pred_x0 + (1 - alpha_prod_t) ** 0.5 * pred_eps, x_t)


# --- samplers ----------------------------------------------------------------------------------


SPACINGS = ["leading", "trailing", "linspace"]


@pytest.mark.parametrize("spacing", SPACINGS)
def test_every_spacing_gives_exactly_n_distinct_descending_timesteps(spacing):
    for T in (2, 3, 7, 10, 50, 100, 999, 1000, 1001):
        scheduler = DDIMScheduler(num_train_timesteps=T)
        for n in range(1, T + 1):
            scheduler.set_timesteps(n, spacing)
            timesteps = scheduler.timesteps.tolist()
            assert len(timesteps) == n, (T, n, timesteps[-3:])
            assert all(a > b for a, b in zip(timesteps, timesteps[1:])), (T, n)
            assert 0 <= timesteps[-1] and timesteps[0] <= T - 1, (T, n)


def test_trailing_61_of_1000_ends_at_15_not_minus_one():
    scheduler = DDIMScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(61, "trailing")
    assert len(scheduler.timesteps) == 61
    assert scheduler.timesteps[:2].tolist() == [999, 983]
    assert scheduler.timesteps[-3:].tolist() == [48, 32, 15]


@pytest.mark.parametrize("spacing", SPACINGS)
def test_timestep_spacings_match_diffusers_except_its_extra_minus_one(spacing):
    """diffusers (the peer) gives n + 1 trailing timesteps, the last -1, for some n (61 of 1000);
    everywhere else the lists are equal."""
    import diffusers

    extra = 0
    for T in (10, 50, 100, 1000):
        peer = diffusers.DDIMScheduler(num_train_timesteps=T, timestep_spacing=spacing, steps_offset=0)
        ours = DDIMScheduler(num_train_timesteps=T)
        for n in range(1, T + 1):
            peer.set_timesteps(n)
            ours.set_timesteps(n, spacing)
            expected = peer.timesteps.tolist()
            if len(expected) == n + 1:
                assert spacing == "trailing" and expected[-1] == -1, (T, n)
                expected, extra = expected[:-1], extra + 1
            assert ours.timesteps.tolist() == expected, (T, n)
    assert (extra > 0) == (spacing == "trailing")  # the case this test is about does occur


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_sampling_with_61_steps_of_1000_stays_finite(sampler):
    method = DDPM(num_train_timesteps=1000)
    out = method.generate(
        toy_model(1000),
        2,
        (1, 4, 4),
        sampler=sampler,
        num_inference_steps=61,
        generator=torch.Generator().manual_seed(0),
    )
    assert torch.isfinite(out).all()


def test_timestep_spacings_small_case_by_hand():
    scheduler = DDPMScheduler(num_train_timesteps=10)
    expected = {"leading": [6, 3, 0], "trailing": [9, 6, 2], "linspace": [9, 4, 0]}
    for spacing, timesteps in expected.items():
        scheduler.set_timesteps(3, spacing)
        assert scheduler.timesteps.tolist() == timesteps
    scheduler.set_timesteps(10, "trailing")
    assert scheduler.timesteps.tolist() == list(range(9, -1, -1))


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("clip_sample", [True, False])
def test_ddim_eta_one_all_steps_equals_ddpm_ancestral(prediction_type, clip_sample):
    T = 20
    kwargs = dict(
        num_train_timesteps=T,
        beta_schedule="linear",
        beta_start=1e-3,
        beta_end=0.2,
        prediction_type=prediction_type,
        clip_sample=clip_sample,
    )
    ddpm, ddim = DDPMScheduler(**kwargs), DDIMScheduler(eta=1.0, **kwargs)
    ddpm.set_timesteps(T)
    ddim.set_timesteps(T)
    gen = torch.Generator().manual_seed(3)
    start = torch.randn(4, 1, 5, 5, generator=gen, dtype=torch.float64)
    variance_noises = [torch.randn(4, 1, 5, 5, generator=gen, dtype=torch.float64) for _ in range(T)]
    model = toy_model(T, scale=2.0)  # big enough that clipping acts
    out_ddpm = run_sampler(ddpm, model, start, variance_noises)
    out_ddim = run_sampler(ddim, model, start, variance_noises)
    torch.testing.assert_close(out_ddim, out_ddpm, rtol=1e-9, atol=1e-9)
    # The noise mattered: eta=0 lands elsewhere.
    ddim.eta = 0.0
    assert (run_sampler(ddim, model, start) - out_ddpm).abs().max() > 1e-2


def test_ddim_eta_zero_is_deterministic_and_ignores_the_generator():
    scheduler = DDIMScheduler(eta=0.0, num_train_timesteps=100)
    scheduler.set_timesteps(10)
    model = toy_model(100)
    start = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(4))
    gen_a, gen_b = torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)
    state_a = gen_a.get_state()
    out_a = run_sampler(scheduler, model, start, generator=gen_a)
    out_b = run_sampler(scheduler, model, start, generator=gen_b)
    out_c = run_sampler(scheduler, model, start, variance_noises=[torch.randn_like(start) for _ in range(10)])
    assert torch.equal(out_a, out_b) and torch.equal(out_a, out_c)
    assert torch.equal(gen_a.get_state(), state_a)  # eta=0 draws no noise at all
    # Whereas eta > 0 does depend on it.
    scheduler.eta = 0.5
    assert not torch.equal(
        run_sampler(scheduler, model, start, generator=gen_a), run_sampler(scheduler, model, start, generator=gen_b)
    )


@pytest.mark.parametrize("clip_sample", [True, False])
def test_respaced_ddim_steps_by_hand(clip_sample):
    T, eta = 10, 0.7
    scheduler = DDIMScheduler(eta=eta, num_train_timesteps=T, beta_start=0.01, beta_end=0.3, clip_sample=clip_sample)
    scheduler.set_timesteps(3, "trailing")
    assert scheduler.timesteps.tolist() == [9, 6, 2]  # t - T // n would wrongly give 3 after 6
    ab = linear_alphas_cumprod(T, 0.01, 0.3)
    model = toy_model(T, scale=3.0)
    gen = torch.Generator().manual_seed(7)
    sample = torch.randn(2, 1, 4, 4, generator=gen, dtype=torch.float64)
    for t, t_prev in [(9, 6), (6, 2), (2, None)]:
        z = torch.randn(sample.shape, generator=gen, dtype=torch.float64)
        eps = model(sample, torch.full((2,), t))
        ab_t, ab_prev = ab[t], (ab[t_prev] if t_prev is not None else 1.0)
        x0 = (sample - math.sqrt(1 - ab_t) * eps) / math.sqrt(ab_t)
        if clip_sample:
            x0 = x0.clamp(-1, 1)
            eps = (sample - math.sqrt(ab_t) * x0) / math.sqrt(1 - ab_t)
        sigma = eta * math.sqrt((1 - ab_prev) / (1 - ab_t)) * math.sqrt(1 - ab_t / ab_prev)
        expected = math.sqrt(ab_prev) * x0 + math.sqrt(1 - ab_prev - sigma**2) * eps + sigma * z
        got = scheduler.step(model(sample, torch.full((2,), t)), t, sample, variance_noise=z)
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
        sample = got
    if clip_sample:
        assert sample.abs().max() <= 1  # the last step returns the clipped x0


def test_respaced_ddpm_steps_by_hand():
    T = 10
    scheduler = DDPMScheduler(num_train_timesteps=T, beta_start=0.01, beta_end=0.3, clip_sample=False)
    scheduler.set_timesteps(3, "trailing")
    ab = linear_alphas_cumprod(T, 0.01, 0.3)
    model = toy_model(T)
    gen = torch.Generator().manual_seed(8)
    sample = torch.randn(2, 1, 4, 4, generator=gen, dtype=torch.float64)
    for t, t_prev in [(9, 6), (6, 2), (2, None)]:
        z = torch.randn(sample.shape, generator=gen, dtype=torch.float64)
        eps = model(sample, torch.full((2,), t))
        ab_t, ab_prev = ab[t], (ab[t_prev] if t_prev is not None else 1.0)
        beta = 1 - ab_t / ab_prev  # the respaced step's beta
        x0 = (sample - math.sqrt(1 - ab_t) * eps) / math.sqrt(ab_t)
        mean = math.sqrt(ab_prev) * beta / (1 - ab_t) * x0 + math.sqrt(1 - beta) * (1 - ab_prev) / (1 - ab_t) * sample
        expected = mean + math.sqrt((1 - ab_prev) / (1 - ab_t) * beta) * z
        got = scheduler.step(eps, t, sample, variance_noise=z)
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
        sample = got


def test_ddpm_all_steps_uses_the_schedule_posterior():
    scheduler = DDPMScheduler(num_train_timesteps=30, clip_sample=False, prediction_type="sample")
    x0 = torch.rand(2, 1, 3, 3, dtype=torch.float64)
    x_t = torch.randn_like(x0)
    z = torch.randn_like(x0)
    for t in [29, 15, 1, 0]:
        expected = (
            scheduler.posterior_mean_coef1[t] * x0
            + scheduler.posterior_mean_coef2[t] * x_t
            + scheduler.posterior_variance[t].sqrt() * z
        )
        torch.testing.assert_close(scheduler.step(x0, t, x_t, variance_noise=z), expected, rtol=1e-10, atol=1e-10)


# --- the method ---------------------------------------------------------------------------------


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_loss_draws_from_global_rng_and_regresses_the_target(prediction_type):
    method = DDPM(num_train_timesteps=50, prediction_type=prediction_type)
    images = torch.rand(6, 1, 4, 4) * 2 - 1
    labels = torch.arange(6)
    seen = {}

    def model(x, t, class_labels=None):
        seen.update(x=x, t=t, class_labels=class_labels)
        return 0.5 * x

    torch.manual_seed(9)
    loss = method.loss(model, {"images": images, "class_labels": labels})
    torch.manual_seed(9)
    timesteps = torch.randint(0, 50, (6,))
    noise = torch.randn_like(images)
    assert torch.equal(seen["t"], timesteps) and seen["t"].dtype == torch.long
    assert seen["class_labels"] is labels
    x_t = method.schedule.add_noise(images, noise, timesteps)
    torch.testing.assert_close(seen["x"], x_t)
    target = {
        "epsilon": noise,
        "sample": images,
        "v_prediction": method.schedule.get_velocity(images, noise, timesteps),
    }[prediction_type]
    assert loss.ndim == 0
    torch.testing.assert_close(loss, ((0.5 * x_t - target) ** 2).mean())
    method.loss(model, {"images": images})
    assert seen["class_labels"] is None


class TinyDenoiser(torch.nn.Module):
    def __init__(self, T, dim=4, hidden=64):
        super().__init__()
        self.T = T
        self.net = torch.nn.Sequential(
            torch.nn.Linear(dim + 1, hidden),
            torch.nn.SiLU(),
            torch.nn.Linear(hidden, hidden),
            torch.nn.SiLU(),
            torch.nn.Linear(hidden, dim),
        )

    def forward(self, x, t, class_labels=None):
        h = torch.cat([x.flatten(1), (t.float() / self.T)[:, None]], dim=1)
        return self.net(h).reshape(x.shape)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_training_lowers_the_loss(prediction_type):
    torch.manual_seed(0)
    T = 100
    method = DDPM(num_train_timesteps=T, prediction_type=prediction_type)
    dataset = torch.tensor([[1.0, -1, -1, 1], [-1, 1, 1, -1], [1, 1, -1, -1], [-1, -1, 1, 1]]).reshape(4, 1, 2, 2)
    model = TinyDenoiser(T)

    def eval_loss():
        losses = []
        for seed in range(10):
            torch.manual_seed(seed)
            losses.append(method.loss(model, {"images": dataset.repeat(64, 1, 1, 1)}).item())
        return sum(losses) / len(losses)

    before = eval_loss()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    torch.manual_seed(100)
    for _ in range(100):
        loss = method.loss(model, {"images": dataset.repeat(32, 1, 1, 1)})
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = eval_loss()
    assert after < 0.6 * before, (before, after)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_sample_shape_range_and_reproducibility(sampler):
    T = 50
    method = DDPM(num_train_timesteps=T, clip_sample=True)
    model = toy_model(T, scale=5.0)  # far from a good denoiser: x0 estimates leave [-1, 1]
    calls = []

    def recording_model(x, t, class_labels=None):
        calls.append((t, class_labels))
        return model(x, t)

    labels = torch.tensor([3, 1, 4, 1, 5])
    kwargs = dict(sampler=sampler, num_inference_steps=10, eta=1.0)
    out = method.generate(
        recording_model, 5, (1, 6, 6), generator=torch.Generator().manual_seed(0), class_labels=labels, **kwargs
    )
    assert out.shape == (5, 1, 6, 6)
    assert out.abs().max() <= 1
    assert len(calls) == 10
    assert all(t.shape == (5,) and t.dtype == torch.long and torch.equal(c, labels) for t, c in calls)
    again = method.generate(model, 5, (1, 6, 6), generator=torch.Generator().manual_seed(0), progress=track, **kwargs)
    assert torch.equal(out, again)
    other = method.generate(model, 5, (1, 6, 6), generator=torch.Generator().manual_seed(1), **kwargs)
    assert not torch.equal(out, other)
    # The range comes from clip_sample, not from a final clamp.
    unclipped = DDPM(num_train_timesteps=T, clip_sample=False).generate(
        model, 5, (1, 6, 6), generator=torch.Generator().manual_seed(0), **kwargs
    )
    assert unclipped.abs().max() > 1
