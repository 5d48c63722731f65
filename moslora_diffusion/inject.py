"""Put MoSLoRA adapters into diffusers and transformers models through their own adapter API."""

from __future__ import annotations

import dataclasses

from peft import inject_adapter_in_model
from torch import nn

from .config import MoSLoRAConfig
from .layer import upgrade_lora_layers
from .targets import resolve_target_modules


def config_for_model(model: nn.Module, config: MoSLoRAConfig) -> MoSLoRAConfig:
    """``config`` with a preset (or None) narrowed to ``model``'s own module names."""
    if config.target_preset is None:
        return config
    return dataclasses.replace(config, target_modules=resolve_target_modules(model, config.target_preset))


def add_moslora(model: nn.Module, config: MoSLoRAConfig, adapter_name: str = "default") -> nn.Module:
    """Add a MoSLoRA adapter named ``adapter_name`` to a UNet, SD3/Flux transformer or text encoder.

    Goes through the model's own ``add_adapter`` (diffusers ``ModelMixin`` / transformers
    ``PreTrainedModel``), so ``set_adapters``, ``fuse_lora``, ``disable_lora``, ``delete_adapters`` and
    friends see the adapter. Afterwards only adapter parameters require grad. Returns ``model``.
    """
    if not isinstance(config, MoSLoRAConfig):
        raise TypeError(f"add_moslora needs a MoSLoRAConfig, got {type(config).__name__}")
    existing = getattr(model, "peft_config", {}) or {}
    if adapter_name in existing:
        raise ValueError(f"{type(model).__name__} already has an adapter named {adapter_name!r}; pick another name")
    config = config_for_model(model, config)
    # A plain LoRA loaded earlier left stock PEFT layers, which would refuse a MoSLoRA config.
    upgrade_lora_layers(model)
    if hasattr(model, "add_adapter"):
        model.add_adapter(config, adapter_name=adapter_name)
    else:
        inject_adapter_in_model(config, model, adapter_name)
    return model


def adapter_parameters(model: nn.Module, adapter_name: str | None = None) -> list[nn.Parameter]:
    """The trainable adapter parameters (A, M, B) of ``model``, optionally of one adapter only."""
    params = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if adapter_name is not None and f".{adapter_name}." not in f".{name}.":
            continue
        params.append(param)
    return params
