"""The MoSLoRA layer, as a PEFT LoRA variant.

    y = W0 x + s * B M A x      A: r x in (lora_A), M: r x r (lora_mixer), B: out x r (lora_B)

The forward computes the same product in one of three orders, all exact, choosing the cheapest for
the call: M on every token's r features, B (M (A x)) (r^2 per token; few tokens), or M folded into
the narrower side once per call, (B M) (A x) (r^2 * out) or B ((M A) x) (r^2 * in). A conv layer
always folds M into A (its kernel); merging adds s * B M A to W0. Plain LoRA adapters can live in the
same layer: only adapters created from a :class:`~moslora_diffusion.MoSLoRAConfig` carry a mixer.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.lora import layer as peft_lora_layer
from peft.tuners.lora.layer import LoraLayer, LoraVariant
from peft.tuners.lora.variants import _register_frozen_peft_weight
from peft.tuners.tuners_utils import check_adapters_to_merge
from torch import nn

MIXER = "lora_mixer"


def init_mixer_(weight: torch.Tensor, mixer_init: str) -> None:
    """Initialise an r x r mixer in place: kaiming-uniform (a=sqrt(5)), orthogonal or identity."""
    with torch.no_grad():
        if mixer_init == "kaiming":
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
        elif mixer_init == "orthogonal":
            nn.init.orthogonal_(weight)
        elif mixer_init == "identity":
            weight.copy_(torch.eye(weight.shape[0], dtype=weight.dtype, device=weight.device))
        else:
            raise ValueError(f"Unknown mixer_init {mixer_init!r}")


def fold_mixer_into_lora_a(lora_a: torch.Tensor, mixer: torch.Tensor) -> torch.Tensor:
    """A' = M A for a linear (r, in) or conv (r, in, kh, kw) down weight."""
    return (mixer @ lora_a.flatten(1)).view_as(lora_a)


def fold_mixer_into_lora_b(lora_b: torch.Tensor, mixer: torch.Tensor) -> torch.Tensor:
    """B' = B M for a linear (out, r) or 1x1-conv (out, r, 1, 1) up weight; exact, so B' A == B M A."""
    if lora_b.dim() == 4:
        return (lora_b[..., 0, 0] @ mixer)[..., None, None]
    return lora_b @ mixer


class MoSLoRAVariant(LoraVariant):
    """PEFT variant hooks: mixer creation, the forward (the module docstring's three orders), merging."""

    def supports_lora_conversion(self) -> bool:
        return True  # B' = B M is exact

    @staticmethod
    def init(module: LoraLayer, adapter_name: str, config, **kwargs: Any) -> None:
        if MIXER not in module.adapter_layer_names:
            # Per-instance, as DoRA does, so that set_adapter / delete_adapter / device moves see the mixer.
            module.adapter_layer_names = module.adapter_layer_names[:] + (MIXER,)
        if not hasattr(module, MIXER):
            module.lora_mixer = nn.ModuleDict()
        r = module.r[adapter_name]
        weight_a = module.lora_A[adapter_name].weight
        mixer = nn.Linear(r, r, bias=False).to(device=weight_a.device, dtype=weight_a.dtype)
        if config.mixer_init == "kaiming_folded":
            # The "init-only" control: a kaiming mixer M0 acts once, at initialisation (A = M0 A0), and
            # M stays the identity, so only the initial A differs from plain LoRA (PEFT runs this after
            # reset_lora_parameters, so A is already initialised here).
            init_mixer_(mixer.weight, "kaiming")
            with torch.no_grad():
                weight_a.copy_(fold_mixer_into_lora_a(weight_a, mixer.weight))
            init_mixer_(mixer.weight, "identity")
        else:
            init_mixer_(mixer.weight, config.mixer_init)
        module.lora_mixer[adapter_name] = mixer
        if not config.train_mixer:
            # PEFT re-freezes registered weights after every set_adapter (which otherwise re-enables grads).
            _register_frozen_peft_weight(module, adapter_name, MIXER)

    @staticmethod
    def merge_safe(module: LoraLayer, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return orig_weight + module.get_delta_weight(active_adapter).to(orig_weight.dtype)

    @staticmethod
    def merge_unsafe(module: LoraLayer, active_adapter: str, orig_weight: torch.Tensor) -> None:
        orig_weight.data += module.get_delta_weight(active_adapter).to(orig_weight.dtype)

    @staticmethod
    def unmerge(module: LoraLayer, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return orig_weight - module.get_delta_weight(active_adapter).to(orig_weight.dtype)

    @staticmethod
    def forward(
        module: LoraLayer, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs
    ) -> torch.Tensor:
        lora_a = module.lora_A[active_adapter]
        lora_b = module.lora_B[active_adapter]
        mixer = module.lora_mixer[active_adapter].weight
        scaling = module.scaling[active_adapter]
        dropout = module.lora_dropout[active_adapter]
        if not isinstance(dropout, nn.Identity):
            x = dropout(x)
        if not isinstance(lora_a, nn.Linear):
            down = lora_a._conv_forward(x, fold_mixer_into_lora_a(lora_a.weight, mixer), None)
            return torch.add(result, lora_b(down), alpha=scaling)
        # Linear: the order of the module docstring that costs least. Few tokens (77-token contexts,
        # small latents) mix per token; many fold into the narrower side. The same choice keeps the least
        # for backward (a T x r activation, or an r x out / r x in weight). The scale rides on the sum
        # (add with alpha): four operators, as many as PEFT LoRA's B(A x) * s + result, and no module calls.
        in_features, out_features = lora_a.in_features, lora_b.out_features
        weight_a, weight_b = lora_a.weight, lora_b.weight
        tokens = x.numel() // in_features
        if tokens <= min(in_features, out_features):
            down = F.linear(F.linear(x, weight_a), mixer)
        elif out_features <= in_features:
            down = F.linear(x, weight_a)
            weight_b = weight_b @ mixer
        else:
            down = F.linear(x, mixer @ weight_a)
        return torch.add(result, F.linear(down, weight_b), alpha=scaling)


class _MoSLoRAMixin:
    """Shared by the Linear and Conv2d layers: choose the variant from the config, and the delta weight."""

    moslora_layer_name: str | None = None  # the module's path in its model, for error messages

    def resolve_lora_variant(self, *, config, **kwargs):
        if getattr(config, "use_moslora", False):
            return MoSLoRAVariant()
        return super().resolve_lora_variant(config=config, **kwargs)

    def has_mixer(self, adapter_name: str) -> bool:
        return adapter_name in getattr(self, MIXER, {})

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        if not self.has_mixer(adapter):
            return super().get_delta_weight(adapter)
        weight_b = self.lora_B[adapter].weight
        dtype = weight_b.dtype
        # fp16/bf16 matmuls are slow (and lossy) on CPU: compute in fp32 there, as PEFT does.
        compute_dtype = (
            torch.float32 if weight_b.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16) else dtype
        )
        weight_a = fold_mixer_into_lora_a(
            self.lora_A[adapter].weight.to(compute_dtype), self.lora_mixer[adapter].weight.to(compute_dtype)
        )
        weight_b = weight_b.to(compute_dtype)
        delta = delta_weight_from_factors(
            weight_b, weight_a, self.get_base_layer().weight.shape, getattr(self, "fan_in_fan_out", False)
        )
        return (delta * self.scaling[adapter]).to(dtype)


def delta_weight_from_factors(
    weight_b: torch.Tensor, weight_a: torch.Tensor, base_shape: torch.Size, fan_in_fan_out: bool = False
) -> torch.Tensor:
    """B A shaped like the base weight: linear (out, in), or conv (out, in, kh, kw) with a 1x1 B."""
    if weight_a.dim() == 2:
        delta = weight_b @ weight_a
        return delta.T if fan_in_fan_out else delta
    # conv: B is (out, r, 1, 1); A is (r, in, kh, kw)
    return torch.einsum("or,rikl->oikl", weight_b[..., 0, 0], weight_a).reshape(base_shape)


class _RefuseQuantizedMerge:
    """Generic layers merge by adding to ``weight.data``, which a quantized weight silently ignores: refuse instead.

    (Quantized layers that can be requantized have their own classes in :mod:`moslora_diffusion.quantized`.)
    """

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        from .quantized import refuse_merge_into_quantized

        if check_adapters_to_merge(self, adapter_names):
            refuse_merge_into_quantized(self)
        super().merge(safe_merge=safe_merge, adapter_names=adapter_names)

    def unmerge(self) -> None:
        from .quantized import refuse_merge_into_quantized

        if self.merged:
            refuse_merge_into_quantized(self)
        super().unmerge()


class MoSLoRALinear(_RefuseQuantizedMerge, _MoSLoRAMixin, peft_lora_layer.Linear):
    """PEFT ``lora.Linear`` whose MoSLoRA adapters carry an r x r mixer: y = W0 x + s * B M A x."""


class MoSLoRAConv2d(_RefuseQuantizedMerge, _MoSLoRAMixin, peft_lora_layer.Conv2d):
    """PEFT ``lora.Conv2d`` whose MoSLoRA adapters carry an r x r mixer (kernel on A, 1x1 on B, M A folded)."""

    def update_layer(self, adapter_name, r, lora_alpha, config, **kwargs):
        if getattr(config, "use_moslora", False) and self.get_base_layer().groups != 1:
            raise ValueError("MoSLoRA supports Conv2d layers with groups=1 only")
        return super().update_layer(adapter_name, r, lora_alpha, config=config, **kwargs)


def register_moslora_layers(config) -> None:
    """Make PEFT build MoSLoRA layers for nn.Linear and nn.Conv2d targets of ``config``.

    Linear targets get the MoSLoRA subclass of the layer PEFT itself would pick for the base's
    quantization (bitsandbytes, torchao), see :mod:`moslora_diffusion.quantized`.
    """
    from .quantized import moslora_conv2d, moslora_linear

    config._register_custom_module({nn.Linear: moslora_linear, nn.Conv2d: moslora_conv2d})


def upgrade_lora_layers(model: nn.Module) -> int:
    """Turn existing plain PEFT LoRA layers into MoSLoRA layers in place (their adapters are unchanged).

    Needed when a plain LoRA was loaded before a MoSLoRA adapter is added to the same modules: the
    MoSLoRA classes add behaviour only for adapters that have a mixer. Returns how many were upgraded.
    """
    from .quantized import upgraded_layer_class

    upgraded = 0
    for name, module in model.named_modules():
        target_cls = upgraded_layer_class(module)
        if target_cls is not None:
            module.__class__ = target_cls
            module.moslora_layer_name = name
            upgraded += 1
    return upgraded


def moslora_layers(model: nn.Module):
    """(name, layer) for every layer of ``model`` that holds at least one mixer."""
    for name, module in model.named_modules():
        if isinstance(module, _MoSLoRAMixin) and len(getattr(module, MIXER, {})) > 0:
            yield name, module
