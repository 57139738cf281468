"""Our samplers step by step against diffusers' (the `peer` extra, test-only): the same model
outputs and samples go into both, every step's result must agree to float32 round-off. diffusers
keeps its sigmas in float32, we keep the schedule in float64: hence a tolerance, not equality."""

import pytest
import torch

from diffusion.schedulers import DDIMScheduler, DPMSolverMultistepScheduler

diffusers = pytest.importorskip("diffusers")

PREDICTION_TYPES = ["epsilon", "sample", "v_prediction"]


def toy_output(sample: torch.Tensor, timestep: int) -> torch.Tensor:
    """A fixed function of (x, t), as a trained network would be."""
    return torch.tanh(0.7 * sample + 0.001 * timestep) - 0.1 * sample


def run_both(ours, theirs, num_inference_steps: int, shape=(2, 3, 5, 5)) -> None:
    ours.set_timesteps(num_inference_steps, "trailing")
    theirs.set_timesteps(num_inference_steps)
    assert ours.timesteps.tolist() == theirs.timesteps.tolist()
    sample = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    ours_sample, theirs_sample = sample.clone(), sample.clone()
    for timestep in ours.timesteps.tolist():
        # The same input to both, so that each step is compared on its own.
        model_output = toy_output(theirs_sample, timestep)
        ours_sample = ours.step(model_output, timestep, theirs_sample)
        theirs_sample = theirs.step(model_output, timestep, theirs_sample).prev_sample
        torch.testing.assert_close(ours_sample, theirs_sample, rtol=2e-5, atol=2e-5, msg=f"step at t={timestep}")


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("schedule", [("linear", "linear"), ("cosine", "squaredcos_cap_v2")])
@pytest.mark.parametrize("num_inference_steps", [1, 2, 10, 20, 25])
def test_dpm_solver_pp_2m_equals_diffusers_step_by_step(prediction_type, schedule, num_inference_steps):
    ours_schedule, their_schedule = schedule
    ours = DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_schedule=ours_schedule, prediction_type=prediction_type, clip_sample=False
    )
    theirs = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=1000,
        beta_schedule=their_schedule,
        prediction_type=prediction_type,
        algorithm_type="dpmsolver++",
        solver_order=2,
        solver_type="midpoint",
        lower_order_final=True,
        final_sigmas_type="zero",
        timestep_spacing="trailing",
    )
    run_both(ours, theirs, num_inference_steps)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("num_inference_steps", [1, 10, 50])
def test_ddim_equals_diffusers_step_by_step(prediction_type, num_inference_steps):
    ours = DDIMScheduler(num_train_timesteps=1000, prediction_type=prediction_type, clip_sample=False)
    theirs = diffusers.DDIMScheduler(
        num_train_timesteps=1000,
        prediction_type=prediction_type,
        clip_sample=False,
        set_alpha_to_one=True,
        steps_offset=0,
        timestep_spacing="trailing",
    )
    run_both(ours, theirs, num_inference_steps)


def test_dpm_solver_pp_takes_one_model_evaluation_per_step_and_lands_on_x0():
    """N steps, N evaluations; the last step returns the predicted x0, which for an x0-predicting
    model that always says `target` is `target` exactly."""
    from diffusion.methods.ddpm import DDPM

    target = torch.full((3, 1, 4, 4), 0.25)
    calls = []

    def model(x, timesteps, class_labels=None):
        calls.append(timesteps[0].item())
        return target.expand_as(x)

    method = DDPM(num_train_timesteps=1000, prediction_type="sample")
    for steps in (10, 20):
        calls.clear()
        out = method.generate(
            model,
            3,
            (1, 4, 4),
            sampler="dpmsolver++",
            num_inference_steps=steps,
            generator=torch.Generator().manual_seed(0),
        )
        assert len(calls) == steps and len(set(calls)) == steps
        assert torch.equal(out, target)
