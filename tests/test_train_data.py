"""Objectives and the loss of a batch: targets, min-SNR and flow-matching weights, masked loss, prior weighting.

(The images, buckets, sampler and items the trainer reads are tested in tests/test_datasets_*.py.)"""

from __future__ import annotations

import pytest
import torch

from moslora_diffusion.training.objectives import FlowMatching, NoisePrediction, combine_instance_and_prior_losses

# ---------------------------------------------------------------------------------------------- objectives

SD_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_noise_prediction_targets_and_min_snr_weights(prediction_type):
    objective = NoisePrediction(dict(SD_SCHEDULER, prediction_type=prediction_type), snr_gamma=5.0)
    latents = torch.randn(4, 4, 8, 8)
    torch.manual_seed(0)
    noisy = objective.add_noise(latents)
    torch.manual_seed(0)
    noise = torch.randn(latents.shape)
    t = noisy.timesteps
    alpha_bar = objective.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(noisy.model_input, alpha_bar.sqrt() * latents + (1 - alpha_bar).sqrt() * noise)
    expected = noise if prediction_type == "epsilon" else alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * latents
    torch.testing.assert_close(noisy.target, expected)
    snr = (alpha_bar / (1 - alpha_bar)).flatten()
    weight = torch.clamp(snr, max=5.0) / (snr if prediction_type == "epsilon" else snr + 1)
    torch.testing.assert_close(noisy.weights, weight)
    assert objective.loss_per_sample(noisy.target, noisy).abs().max() == 0


def test_flow_matching_interpolates_and_targets_the_velocity():
    objective = FlowMatching(dict(num_train_timesteps=1000, shift=3.0), weighting_scheme="logit_normal")
    latents = torch.randn(3, 16, 4, 4)
    torch.manual_seed(0)
    noisy = objective.add_noise(latents)
    torch.manual_seed(0)
    noise = torch.randn(latents.shape)
    s = noisy.sigmas
    torch.testing.assert_close(noisy.model_input, (1 - s) * latents + s * noise)
    torch.testing.assert_close(noisy.target, noise - latents)
    torch.testing.assert_close(noisy.timesteps.float(), s.flatten() * 1000)
    preconditioned = FlowMatching(dict(num_train_timesteps=1000, shift=3.0), precondition_outputs=True)
    torch.manual_seed(0)
    noisy = preconditioned.add_noise(latents)
    velocity = noise - latents  # the exact velocity gives x_0 back: zero loss
    assert preconditioned.loss_per_sample(velocity, noisy).max() < 1e-10


def test_prior_loss_weights_each_reg_sample_in_the_batch_mean():
    """kohya's semantics: reg (prior-preservation) samples mixed into the batch, each weighted by prior_loss_weight."""
    per_sample = torch.tensor([1.0, 3.0, 10.0, 20.0])
    is_reg = torch.tensor([False, True, False, True])
    expected = (1.0 + 0.5 * 3.0 + 10.0 + 0.5 * 20.0) / 4
    assert combine_instance_and_prior_losses(per_sample, is_reg, 0.5).item() == expected
    no_reg = torch.zeros(4, dtype=torch.bool)
    assert combine_instance_and_prior_losses(per_sample, no_reg, 0.5).item() == per_sample.mean().item()


OBJECTIVES = {
    "epsilon": lambda: NoisePrediction(dict(SD_SCHEDULER, prediction_type="epsilon"), snr_gamma=5.0),
    "flow": lambda: FlowMatching(dict(num_train_timesteps=1000, shift=3.0), weighting_scheme="logit_normal"),
}


@pytest.mark.parametrize("name", OBJECTIVES)
def test_masked_loss_equals_the_hand_computed_weighted_loss(name):
    objective = OBJECTIVES[name]()
    latents = torch.randn(2, 4, 6, 6)
    noisy = objective.add_noise(latents)
    prediction = torch.randn(latents.shape)
    weights = torch.rand(2, 1, 6, 6)
    weights[1] = 1.0  # an unmasked (e.g. reg) sample: exactly the plain loss
    masked = objective.loss_per_sample(prediction, noisy, weights)
    per_timestep = noisy.weights
    if name == "flow":
        from diffusers.training_utils import compute_loss_weighting_for_sd3

        element = compute_loss_weighting_for_sd3("logit_normal", noisy.sigmas) * (prediction - noisy.target) ** 2
    else:
        element = (prediction - noisy.target) ** 2
    expected = torch.stack([(element[i] * weights[i]).sum() / element[i].numel() for i in range(2)]) * per_timestep
    torch.testing.assert_close(masked, expected)
    torch.testing.assert_close(masked[1], objective.loss_per_sample(prediction, noisy)[1])


@pytest.mark.parametrize("family,expected", [("sd15", 32), ("sd3", 32), ("flux", 1024)])
def test_native_resolution_is_sample_size_times_vae_stride(family, expected):
    from moslora_diffusion.families import get_family
    from moslora_diffusion.testing import make_tiny_pipeline

    # Flux's transformer has no sample_size: the family default (1024) applies.
    assert get_family(family).native_resolution(make_tiny_pipeline(family).components) == expected
