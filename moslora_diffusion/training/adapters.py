"""The trained part of a run: the frozen base's precision and placement, the MoSLoRA adapters on the
denoiser (and text encoders), and their parameter groups by role (A, B, M) for the optimizer.

Components take the values they need, never the whole run configuration: the recipe
(:mod:`moslora_diffusion.training.dreambooth`) reads :class:`~.config.RunConfig` and passes them on.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..config import MoSLoRAConfig
from ..inject import add_moslora
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


# Parameter-name part -> role (the paper's letters): y = W0 x + s * B M A x.
ADAPTER_ROLES = {"lora_A": "A", "lora_B": "B", "lora_mixer": "M"}


def adapter_parameters_by_role(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """The trainable adapter parameters of ``model`` by role ("A", "B", "M"); a frozen mixer is absent."""
    roles: dict[str, list[nn.Parameter]] = {role: [] for role in ADAPTER_ROLES.values()}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        role = next((r for part, r in ADAPTER_ROLES.items() if f".{part}." in f".{name}."), None)
        if role is None:
            raise ValueError(f"trainable parameter '{name}' is no adapter weight (expected {', '.join(ADAPTER_ROLES)})")
        roles[role].append(param)
    return roles


def freeze_all_but_mixers(trained: dict[str, nn.Module]) -> int:
    """Keep A and B of every trained model fixed (--train_mixer_only); returns the mixer parameters left to train."""
    count = 0
    for model in trained.values():
        for name, param in model.named_parameters():
            if ".lora_A." in f".{name}." or ".lora_B." in f".{name}.":
                param.requires_grad_(False)
            elif param.requires_grad:
                count += param.numel()
    return count


def adapter_param_groups(
    trained: dict[str, nn.Module],
    family,
    *,
    learning_rate: float,
    text_encoder_lr: float,
    weight_decay: float,
    text_encoder_weight_decay: float,
    loraplus_lr_ratio: float = 1.0,
    mixer_lr: float | None = None,
) -> list[dict]:
    """One optimizer parameter group per component and role, named "<component>.<role>".

    A learns at the component's LR; B at ``loraplus_lr_ratio`` times it (LoRA+, Hayou et al. 2024); M at
    ``mixer_lr`` in the denoiser (default: its LR) and at the text encoders' LR times ``mixer_lr / learning_rate``.
    A role without trainable parameters (a frozen mixer) has no group.
    """
    mixer_ratio = 1.0 if mixer_lr is None or learning_rate == 0 else mixer_lr / learning_rate
    groups = []
    for name, model in trained.items():
        is_denoiser = name == family.denoiser
        lr = learning_rate if is_denoiser else text_encoder_lr
        lrs = {"A": lr, "B": lr * loraplus_lr_ratio, "M": lr * mixer_ratio}
        if is_denoiser and mixer_lr is not None:
            lrs["M"] = mixer_lr  # exactly the flag's value, not a rounded ratio times the LR
        for role, params in adapter_parameters_by_role(model).items():
            if params:
                decay = weight_decay if is_denoiser else text_encoder_weight_decay
                groups.append({"params": params, "lr": lrs[role], "weight_decay": decay, "name": f"{name}.{role}"})
    return groups
