"""From a data batch to its loss: the conditioning of its captions (cached or encoded every step), latents
(from cached VAE posteriors or by encoding the pixels), and the DreamBooth loss of one batch.

What differs per family (prompt encoding, latent scaling, micro-conditioning, the denoiser call) goes
through :mod:`moslora_diffusion.families`; the maths of the objective through :mod:`.objectives`.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from torch import nn

from ..datasets.cache import TensorCache, caption_cache_key, weights_fingerprint
from .objectives import combine_instance_and_prior_losses


def hash_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass
class PromptConditioning:
    """Conditioning tensors for a batch's captions: looked up in a cache where every caption was encoded once
    (frozen text encoders), else encoded for every batch (trained encoders, or shuffled captions)."""

    family: Any
    max_sequence_length: int | None
    text_components: dict[str, Any]  # tokenizers and text encoders (trained ones as prepared by accelerate)
    device: torch.device  # where the denoiser reads the conditioning
    trained: bool = False  # a text encoder is trained: encode with gradients, never cache
    cached: dict[str, dict[str, torch.Tensor]] | None = None  # caption -> tensors (CPU, fp32)

    def encode(self, captions: list[str]) -> dict[str, torch.Tensor]:
        return self.family.encode_prompt(self.text_components, captions, self.max_sequence_length)

    def cache(self, captions: Iterable[str], store: TensorCache | None = None, fingerprint: str = "",
              progress: Callable = lambda items, **kwargs: items) -> TensorCache:  # fmt: skip
        """Encode each unique caption once, without gradients, into ``store`` (in memory by default; on disk,
        keyed by the caption and ``fingerprint``, the encoders' identity).

        Kept in fp32, as trained (autocast) encoders return them, so both paths feed the denoiser alike.
        """
        store = store or TensorCache(None, "text encoder")
        cached = {}
        with torch.no_grad():
            for caption in progress(sorted(set(captions)), desc="Encoding captions"):
                cached[caption] = store.get_or_compute(
                    caption_cache_key(caption, fingerprint),
                    lambda caption=caption: {key: t.float() for key, t in self.encode([caption]).items()},
                )
        self.cached = cached
        return store

    def for_batch(self, captions: list[str]) -> dict[str, torch.Tensor]:
        if self.cached is not None:
            first = self.cached[captions[0]]
            return {key: torch.cat([self.cached[c][key] for c in captions]).to(self.device) for key in first}
        with contextlib.nullcontext() if self.trained else torch.no_grad():
            return self.encode(captions)


def text_encoders_fingerprint(family, text_components: dict[str, Any], max_sequence_length: int | None) -> str:
    """What determines a caption's encoding: the family, T5 length, the tokenizers' vocabularies and every text
    encoder's weights (a disk cache entry of other encoders is never used)."""
    parts = [family.name, str(max_sequence_length)]
    for name in sorted(text_components):
        component = text_components[name]
        if name.startswith("tokenizer") and component is not None:
            vocab = sorted(component.get_vocab().items())
            parts.append(f"{name}:{type(component).__name__}:{component.model_max_length}:{hash_text(repr(vocab))}")
        elif name.startswith("text_encoder") and component is not None:
            parts.append(f"{name}:{weights_fingerprint(component)}")
    return hash_text("|".join(parts))


def _placement(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and dtype of ``model``'s first parameter. (diffusers' ``ModelMixin.device`` / ``.dtype`` walk the
    module with ``inspect`` on every call: 1.5 ms each, several percent of a small model's step.)"""
    param = next(model.parameters())
    return param.device, param.dtype


def vae_posterior_parameters(vae: nn.Module, pixels: torch.Tensor, family) -> torch.Tensor:
    """The VAE posterior of ``pixels`` as diffusers stores it: mean and log-variance stacked on channels."""
    device, dtype = _placement(vae)
    return vae.encode(family.vae_input(pixels.to(device=device, dtype=dtype))).latent_dist.parameters


def batch_latents(batch: dict, vae: nn.Module, family, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A fresh latent sample per image on ``device`` (from cached posteriors, or by encoding the pixels)."""
    if "latent_parameters" in batch:
        _, vae_dtype = _placement(vae)  # the VAE itself may have left the accelerator
        parameters = batch["latent_parameters"].to(device=device, dtype=vae_dtype)
    else:
        with torch.no_grad():
            parameters = vae_posterior_parameters(vae, batch["pixel_values"], family)
    sample = DiagonalGaussianDistribution(parameters).sample()
    # Contiguous: encoder outputs can be channels-last, cached posteriors are not.
    return family.latents_from_vae(vae, sample).to(device=device, dtype=dtype).contiguous()


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
    """DreamBooth loss of one batch: the mean over its samples of each one's loss (masked by ``loss_weights``
    when the batch has them), prior-preservation samples weighted by ``prior_loss_weight``.

    ``guidance_scale``: the guidance value a guidance-distilled denoiser (Flux) is given.
    """
    device, _ = _placement(denoiser)
    latents = batch_latents(batch, vae, family, weight_dtype, device)
    cond = conditioning.for_batch(batch["captions"])
    noisy = objective.add_noise(latents)
    micro = family.micro_conditioning(batch, device)
    prediction = family.predict(
        denoiser, noisy.model_input, noisy.timesteps, cond, micro, guidance_scale=guidance_scale
    )
    per_sample = objective.loss_per_sample(prediction, noisy, batch.get("loss_weights"))
    return combine_instance_and_prior_losses(per_sample, batch["is_reg"], prior_loss_weight)
