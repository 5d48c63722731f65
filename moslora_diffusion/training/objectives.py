"""Diffusion training objectives: how a clean latent becomes the denoiser's input, what it must predict,
and how much each sample's squared error weighs.

Noise prediction (SD 1.x, 2.x, SDXL; DDPM forward process, prediction type from the scheduler config):

    x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps         target: eps, or v = sqrt(a_t) eps - sqrt(1 - a_t) x_0
    min-SNR (gamma):  w = min(SNR_t, gamma) / SNR_t  (epsilon)   or   min(SNR_t, gamma) / (SNR_t + 1)  (v)

Flow matching (SD3, Flux; rectified flow):

    x_s = (1 - s) x_0 + s eps                       target: eps - x_0   (x_0 with preconditioned outputs)
    s drawn by diffusers' density (``--weighting_scheme``), w = compute_loss_weighting_for_sd3(s)

With ``loss_weights`` (masked loss: (B, 1, h, w) in [0, 1], in the unpacked latent layout) the squared error
is weighted per latent pixel before the mean (kohya's masked loss).

All randomness comes from torch's global generator, which accelerate checkpoints and restores.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3, compute_snr

from ..choices import WEIGHTING_SCHEMES


@dataclass
class NoisyLatents:
    """One training example batch after the forward process."""

    model_input: torch.Tensor  # x_t, what the denoiser sees
    timesteps: torch.Tensor  # what the denoiser is told (integer steps, or sigma * 1000)
    target: torch.Tensor
    weights: torch.Tensor  # per-sample loss weight, shape (B,)
    sigmas: torch.Tensor | None = None  # flow matching only, shaped to broadcast over x_t


def _gaussian_like(latents: torch.Tensor) -> torch.Tensor:
    # Not randn_like: that follows the memory layout (VAE outputs can be channels-last), so the same
    # RNG state would give differently placed noise for equal latents.
    return torch.randn(latents.shape, device=latents.device, dtype=latents.dtype)


def _per_sample_mse(
    prediction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor, loss_weights: torch.Tensor | None = None
) -> torch.Tensor:
    error = (prediction.float() - target.float()) ** 2
    if loss_weights is not None:
        error = error * loss_weights.to(error.device, torch.float32)
    return error.mean(dim=tuple(range(1, error.dim()))) * weights


class NoisePrediction:
    """Epsilon or v-prediction on the DDPM schedule of the base's scheduler, with optional min-SNR and noise offset."""

    def __init__(self, scheduler_config, snr_gamma: float | None = None, noise_offset: float = 0.0):
        self.scheduler = DDPMScheduler.from_config(scheduler_config)
        self.prediction_type = self.scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"Unsupported prediction_type {self.prediction_type!r} in the scheduler config")
        self.snr_gamma = snr_gamma
        self.noise_offset = noise_offset

    @property
    def description(self) -> str:
        extras = [f"min-SNR gamma={self.snr_gamma}"] if self.snr_gamma else []
        extras += [f"noise offset {self.noise_offset}"] if self.noise_offset else []
        return ", ".join([self.prediction_type.replace("_", "-"), *extras])

    def add_noise(self, latents: torch.Tensor) -> NoisyLatents:
        noise = _gaussian_like(latents)
        if self.noise_offset:
            # A per-channel constant shift teaches very dark / bright images (Guttenberg, 2023).
            noise = noise + self.noise_offset * torch.randn(
                latents.shape[0], latents.shape[1], 1, 1, device=latents.device, dtype=latents.dtype
            )
        steps = self.scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, steps, (latents.shape[0],), device=latents.device).long()
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        target = noise if self.prediction_type == "epsilon" else self.scheduler.get_velocity(latents, noise, timesteps)
        weights = torch.ones(latents.shape[0], device=latents.device)
        if self.snr_gamma:
            snr = compute_snr(self.scheduler, timesteps)
            clipped = torch.clamp(snr, max=self.snr_gamma)
            weights = clipped / snr if self.prediction_type == "epsilon" else clipped / (snr + 1)
        return NoisyLatents(noisy, timesteps, target, weights.float())

    def loss_per_sample(
        self, prediction: torch.Tensor, noisy: NoisyLatents, loss_weights: torch.Tensor | None = None
    ) -> torch.Tensor:
        return _per_sample_mse(prediction, noisy.target, noisy.weights, loss_weights)


class FlowMatching:
    """Rectified-flow matching on the base's FlowMatchEulerDiscrete schedule (shift included), as diffusers'
    SD3/Flux scripts."""

    def __init__(
        self,
        scheduler_config,
        weighting_scheme: str = "none",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        mode_scale: float = 1.29,
        precondition_outputs: bool = False,
    ):
        if weighting_scheme not in WEIGHTING_SCHEMES:
            raise ValueError(f"Unknown weighting scheme {weighting_scheme!r}; choose from {WEIGHTING_SCHEMES}")
        self.scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
        self.weighting_scheme = weighting_scheme
        self.logit_mean, self.logit_std, self.mode_scale = logit_mean, logit_std, mode_scale
        self.precondition_outputs = precondition_outputs

    @property
    def description(self) -> str:
        return f"flow matching, weighting {self.weighting_scheme}" + (
            ", preconditioned outputs" if self.precondition_outputs else ""
        )

    def add_noise(self, latents: torch.Tensor) -> NoisyLatents:
        noise = _gaussian_like(latents)
        u = compute_density_for_timestep_sampling(
            self.weighting_scheme, latents.shape[0], self.logit_mean, self.logit_std, self.mode_scale
        )
        indices = (u * self.scheduler.config.num_train_timesteps).long().clamp(max=len(self.scheduler.timesteps) - 1)
        timesteps = self.scheduler.timesteps[indices].to(latents.device)
        sigmas = self.scheduler.sigmas[indices].to(device=latents.device, dtype=latents.dtype)
        sigmas = sigmas.view(-1, *([1] * (latents.dim() - 1)))
        noisy = (1.0 - sigmas) * latents + sigmas * noise
        target = latents if self.precondition_outputs else noise - latents
        weights = torch.ones(latents.shape[0], device=latents.device)
        return NoisyLatents(noisy, timesteps, target, weights, sigmas)

    def loss_per_sample(
        self, prediction: torch.Tensor, noisy: NoisyLatents, loss_weights: torch.Tensor | None = None
    ) -> torch.Tensor:
        if self.precondition_outputs:
            # Section 5 of the SD3 paper: x_0 estimate from the velocity, x_0 = x_s - s v.
            prediction = prediction * (-noisy.sigmas) + noisy.model_input
        weighting = compute_loss_weighting_for_sd3(self.weighting_scheme, noisy.sigmas.float())
        error = weighting * (prediction.float() - noisy.target.float()) ** 2
        if loss_weights is not None:
            error = error * loss_weights.to(error.device, torch.float32)
        return error.mean(dim=tuple(range(1, error.dim()))) * noisy.weights


def make_objective(
    family,
    scheduler_config,
    *,
    snr_gamma: float | None = None,
    noise_offset: float = 0.0,
    weighting_scheme: str | None = None,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
    precondition_outputs: bool = False,
) -> NoisePrediction | FlowMatching:
    """The objective ``family`` trains with: noise prediction reads ``snr_gamma`` and ``noise_offset``, flow
    matching the rest (``weighting_scheme`` None: the family's default, as diffusers' scripts)."""
    if family.objective == "noise_prediction":
        return NoisePrediction(scheduler_config, snr_gamma=snr_gamma, noise_offset=noise_offset)
    return FlowMatching(
        scheduler_config,
        weighting_scheme=weighting_scheme or family.default_weighting_scheme,
        logit_mean=logit_mean,
        logit_std=logit_std,
        mode_scale=mode_scale,
        precondition_outputs=precondition_outputs,
    )


def combine_instance_and_prior_losses(
    per_sample: torch.Tensor, is_reg: torch.Tensor, prior_loss_weight: float
) -> torch.Tensor:
    """The batch's loss, kohya's way: the mean over its samples, each prior-preservation (``is_reg``) sample's
    loss weighted by ``prior_loss_weight``: mean_i(w_i l_i), w_i = prior_loss_weight if reg else 1."""
    if not bool(is_reg.any()):
        return per_sample.mean()
    weights = torch.where(is_reg.to(per_sample.device), prior_loss_weight, 1.0).to(per_sample.dtype)
    return (per_sample * weights).mean()
