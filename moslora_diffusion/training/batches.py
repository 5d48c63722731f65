"""From a data batch to its loss: prompt conditioning (cached or encoded every step), latents (from cached
VAE posteriors or by encoding the pixels), and the DreamBooth loss of one batch.

What differs per family (prompt encoding, latent scaling, micro-conditioning, the denoiser call) goes
through :mod:`moslora_diffusion.families`; the maths of the objective through :mod:`.objectives`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from torch import nn

from .objectives import combine_instance_and_prior_losses


@dataclass
class PromptConditioning:
    """Conditioning for the instance (and class) prompt: cached tensors, or encoders to run every step."""

    family: Any
    instance_prompt: str
    class_prompt: str | None
    max_sequence_length: int | None
    text_components: dict[str, Any]  # tokenizers and text encoders (trained ones as prepared by accelerate)
    cached: dict[str, dict[str, torch.Tensor]] | None = None

    def cache(self) -> None:
        """Encode both prompts once, without gradients (when no text encoder is trained).

        Kept in fp32, as trained (autocast) encoders return them, so both paths feed the denoiser alike.
        """
        prompts = {"instance": self.instance_prompt}
        if self.class_prompt:
            prompts["class"] = self.class_prompt
        with torch.no_grad():
            self.cached = {
                kind: {
                    key: t.float()
                    for key, t in self.family.encode_prompt(self.text_components, [p], self.max_sequence_length).items()
                }
                for kind, p in prompts.items()
            }

    def for_batch(self, num_instance: int, num_class: int) -> dict[str, torch.Tensor]:
        if self.cached is None:
            prompts = [self.instance_prompt] * num_instance + [self.class_prompt] * num_class
            return self.family.encode_prompt(self.text_components, prompts, self.max_sequence_length)
        parts = [("instance", num_instance)] + ([("class", num_class)] if num_class else [])
        return {
            key: torch.cat([self.cached[kind][key].expand(n, *self.cached[kind][key].shape[1:]) for kind, n in parts])
            for key in self.cached["instance"]
        }


def _placement(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and dtype of ``model``'s first parameter. (diffusers' ``ModelMixin.device`` / ``.dtype`` walk the
    module with ``inspect`` on every call: 1.5 ms each, several percent of a small model's step.)"""
    param = next(model.parameters())
    return param.device, param.dtype


def vae_posterior_parameters(vae: nn.Module, pixels: torch.Tensor, family) -> torch.Tensor:
    """The VAE posterior of ``pixels`` as diffusers stores it: mean and log-variance stacked on channels."""
    device, dtype = _placement(vae)
    return vae.encode(family.vae_input(pixels.to(device=device, dtype=dtype))).latent_dist.parameters


def batch_latents(batch: dict, vae: nn.Module, family, dtype: torch.dtype) -> torch.Tensor:
    """A fresh latent sample per image (from cached posteriors, or by encoding the pixels)."""
    if "latent_parameters" in batch:
        device, vae_dtype = _placement(vae)
        parameters = batch["latent_parameters"].to(device=device, dtype=vae_dtype)
    else:
        with torch.no_grad():
            parameters = vae_posterior_parameters(vae, batch["pixel_values"], family)
    sample = DiagonalGaussianDistribution(parameters).sample()
    # Contiguous: encoder outputs can be channels-last, cached posteriors are not.
    return family.latents_from_vae(vae, sample).to(dtype).contiguous()


def batch_loss(
    batch: dict,
    *,
    denoiser,
    vae,
    family,
    objective,
    conditioning: PromptConditioning,
    weight_dtype: torch.dtype,
    prior_loss_weight: float,
    guidance_scale: float,
) -> torch.Tensor:
    """DreamBooth loss of one batch: instance loss plus ``prior_loss_weight`` times the class loss.

    ``guidance_scale``: the guidance value a guidance-distilled denoiser (Flux) is given.
    """
    device, _ = _placement(vae)
    latents = batch_latents(batch, vae, family, weight_dtype)
    num_instance = batch["num_instance"]
    cond = conditioning.for_batch(num_instance, latents.shape[0] - num_instance)
    noisy = objective.add_noise(latents)
    micro = family.micro_conditioning(batch, device)
    prediction = family.predict(
        denoiser, noisy.model_input, noisy.timesteps, cond, micro, guidance_scale=guidance_scale
    )
    per_sample = objective.loss_per_sample(prediction, noisy)
    return combine_instance_and_prior_losses(per_sample, num_instance, prior_loss_weight)
