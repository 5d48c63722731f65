"""The trained part of a run: the frozen base's precision and placement, the MoSLoRA adapters on the
denoiser (and text encoders), and their optimizer.

Components take the values they need, never the whole run configuration: the recipe
(:mod:`moslora_diffusion.training.dreambooth`) reads :class:`~.config.RunConfig` and passes them on.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..config import MoSLoRAConfig
from ..inject import add_moslora, adapter_parameters
from .quantization import is_quantized

ADAPTER_NAME = "default"


def weight_dtype_for(mixed_precision: str | None) -> torch.dtype:
    """The dtype of the frozen weights: half precision under mixed precision, fp32 otherwise."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision or "no", torch.float32)


def place_frozen_components(
    components: dict[str, Any], family, device, weight_dtype: torch.dtype, custom_vae: bool
) -> None:
    """Freeze every model and move it to ``device``: base weights in ``weight_dtype``, SDXL's own VAE in fp32.

    A quantized model keeps its dtypes (it was loaded in ``weight_dtype``; a cast would undo the quantization).
    """
    for name, component in components.items():
        if not isinstance(component, nn.Module):
            continue
        component.requires_grad_(False)
        if is_quantized(component):
            if getattr(component, "is_loaded_in_4bit", False) or getattr(component, "is_loaded_in_8bit", False):
                continue  # bitsandbytes loads onto the GPU and refuses .to()
            nn.Module.to(component, device=device)
            continue
        dtype = torch.float32 if name == "vae" and family.vae_in_fp32 and not custom_vae else weight_dtype
        # nn.Module.to: diffusers' ModelMixin.to warns on every dtype cast of an fp32 model.
        nn.Module.to(component, device=device, dtype=dtype)


def add_adapters(
    components: dict[str, Any], family, denoiser_config: MoSLoRAConfig, text_encoder_config: MoSLoRAConfig | None
) -> dict[str, nn.Module]:
    """Add the MoSLoRA adapter to the denoiser, and to the trainable text encoders when ``text_encoder_config``
    is given; returns the adapted models by component name, denoiser first."""
    trained = {family.denoiser: components[family.denoiser]}
    if text_encoder_config is not None:
        trained.update(
            {name: components[name] for name in family.trainable_text_encoders if components.get(name) is not None}
        )
    for name, model in trained.items():
        is_denoiser = name == family.denoiser
        try:
            add_moslora(model, denoiser_config if is_denoiser else text_encoder_config, ADAPTER_NAME)
        except ValueError as err:
            # PEFT: "Target modules {...} not found in the base model"
            raise ValueError(f"--{'target_modules' if is_denoiser else 'text_encoder_target_modules'}: {err}") from None
    return trained


def enable_gradient_checkpointing(trained: dict[str, nn.Module], family) -> None:
    for name, model in trained.items():
        if name == family.denoiser:
            model.enable_gradient_checkpointing()
        else:
            # Non-reentrant, so adapters inside checkpointed blocks get gradients with frozen embeddings.
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def make_optimizer(
    trained: dict[str, nn.Module],
    family,
    *,
    learning_rate: float,
    text_encoder_lr: float,
    weight_decay: float,
    text_encoder_weight_decay: float,
    betas: tuple[float, float],
    eps: float,
    use_8bit_adam: bool = False,
) -> torch.optim.Optimizer:
    """AdamW (or bitsandbytes' 8-bit AdamW) over the adapters: the denoiser's and text encoders' own LR and decay."""
    groups = []
    for name, model in trained.items():
        is_denoiser = name == family.denoiser
        groups.append(
            {
                "params": adapter_parameters(model),
                "lr": learning_rate if is_denoiser else text_encoder_lr,
                "weight_decay": weight_decay if is_denoiser else text_encoder_weight_decay,
            }
        )
    if use_8bit_adam:
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, betas=betas, eps=eps)
    # On CPU torch's default AdamW updates the adapter's tensors one by one in Python (SD 1.5: 144 tensors,
    # 4 ms a step); the fused kernel takes 0.6 ms. On GPUs the default (foreach) is already batched.
    on_cpu = all(p.device.type == "cpu" for group in groups for p in group["params"])
    return torch.optim.AdamW(groups, betas=betas, eps=eps, fused=True if on_cpu else None)
