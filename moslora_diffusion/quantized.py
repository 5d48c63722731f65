"""MoSLoRA over quantized base layers (bitsandbytes, torchao, optimum-quanto), riding on PEFT's own layers.

    y = dequant(Wq) x + s * B M A x          merge: Wq <- quant(dequant(Wq) + s * B M A)

PEFT builds its own LoRA layer per backend (bitsandbytes Linear8bitLt / Linear4bit, torchao
TorchaoLoraLinear; quanto has none and gets the generic layer). MoSLoRA subclasses each of them with
:class:`~moslora_diffusion.layer._MoSLoRAMixin`, so the same variant (forward, delta weight, merge hooks)
runs inside PEFT's quantized forward and its dequantize-add-requantize merge. quanto gets that merge here.
Any other quantized weight (GGUF, an unknown backend) refuses to merge in one line instead of adding the
delta to a copy that is thrown away.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from .layer import MoSLoRAConv2d, MoSLoRALinear, _MoSLoRAMixin

# top-level module of a quantized tensor's class -> the backend's name for people
_BACKEND_OF_MODULE = {"torchao": "torchao", "optimum": "optimum-quanto", "bitsandbytes": "bitsandbytes"}


def quantization_backend(weight: Any) -> str | None:
    """The backend that quantized ``weight`` ("torchao", "optimum-quanto", "bitsandbytes", "gguf"), else None."""
    if weight is None:
        return None
    cls = type(weight)
    backend = _BACKEND_OF_MODULE.get(cls.__module__.split(".")[0])
    if backend is not None:
        return backend
    if "GGUF" in cls.__name__:
        return "gguf"
    if isinstance(weight, torch.Tensor) and not (weight.dtype.is_floating_point or weight.is_meta):
        return f"{cls.__name__} ({weight.dtype})"
    return None


def refuse_merge_into_quantized(layer: nn.Module) -> None:
    """ValueError naming the layer and backend when ``layer``'s base weight is quantized and cannot be requantized."""
    backend = quantization_backend(getattr(layer.get_base_layer(), "weight", None))
    if backend is not None:
        name = getattr(layer, "moslora_layer_name", None) or type(layer.get_base_layer()).__name__
        raise ValueError(
            f"cannot merge into {name}: its base weight is quantized by {backend}, which MoSLoRA cannot requantize; "
            "merge into the full-precision base instead (moslora merge --base <folder>)"
        )


class MoSLoRAQuantoLinear(MoSLoRALinear):
    """MoSLoRA over an optimum-quanto ``QLinear``: merge dequantizes, adds s * B M A, and requantizes."""

    def _requantized(self, sign: float, adapter_names: list[str], safe_merge: bool) -> None:
        base = self.get_base_layer()
        weight = base.weight.dequantize().float()
        for adapter in adapter_names:
            weight = weight + sign * self.get_delta_weight(adapter).float().to(weight.device)
            if self.lora_bias.get(adapter):
                base.bias.data += sign * self.lora_B[adapter].bias.to(base.bias.dtype)
        if safe_merge and not torch.isfinite(weight).all():
            raise ValueError(f"NaNs detected in the merged weights of {self.moslora_layer_name or 'a layer'}")
        # QLinear.freeze quantizes a float weight with the layer's own qtype (as at load).
        base.weight = nn.Parameter(weight.to(base.weight.dtype), requires_grad=False)
        base.freeze()

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        adapter_names = [a for a in check_adapters_to_merge(self, adapter_names) if a in self.lora_A]
        if adapter_names:
            self._requantized(1.0, adapter_names, safe_merge)
            self.merged_adapters.extend(adapter_names)

    def unmerge(self) -> None:
        merged = [a for a in self.merged_adapters if a in self.lora_A]
        if merged:
            self._requantized(-1.0, merged, False)
        self.merged_adapters.clear()


def _torchao_layer(base_cls: type) -> type:
    class MoSLoRATorchaoLinear(_MoSLoRAMixin, base_cls):
        """MoSLoRA over torchao: PEFT's merge dequantizes, adds s * B M A, requantizes with the load config."""

        def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
            if self.get_apply_tensor_subclass is None and check_adapters_to_merge(self, adapter_names):
                raise ValueError(
                    f"cannot merge into {self.moslora_layer_name or 'a torchao layer'}: the torchao quantization "
                    "config is unknown (load the model with diffusers' TorchAoConfig to requantize after merging)"
                )
            super().merge(safe_merge=safe_merge, adapter_names=adapter_names)

    return MoSLoRATorchaoLinear


@functools.cache
def _peft_quantized_layers() -> dict[str, type]:
    """PEFT's LoRA layer classes for the quantized backends that are installed, subclassed with the mixer."""
    from peft.import_utils import is_bnb_4bit_available, is_bnb_available, is_torchao_available

    layers: dict[str, type] = {}
    if is_bnb_available():
        from peft.tuners.lora import bnb as peft_bnb

        layers["bnb8"] = type("MoSLoRALinear8bitLt", (_MoSLoRAMixin, peft_bnb.Linear8bitLt), {"__module__": __name__})
        if is_bnb_4bit_available():
            layers["bnb4"] = type("MoSLoRALinear4bit", (_MoSLoRAMixin, peft_bnb.Linear4bit), {"__module__": __name__})
    if is_torchao_available():
        from peft.tuners.lora.torchao import TorchaoLoraLinear

        layers["torchao"] = _torchao_layer(TorchaoLoraLinear)
    return layers


def _linear_class_and_kwargs(base: nn.Module, kwargs: dict) -> tuple[type, dict]:
    """The MoSLoRA Linear class for ``base`` (and the keyword arguments PEFT's own dispatcher would add)."""
    layers = _peft_quantized_layers()
    backend = quantization_backend(getattr(base, "weight", None))
    if backend == "bitsandbytes":
        import bitsandbytes as bnb

        if isinstance(base, bnb.nn.Linear8bitLt):
            extra = {"has_fp16_weights": base.state.has_fp16_weights, "threshold": base.state.threshold}
            return layers["bnb8"], {**kwargs, **extra, "index": getattr(base, "index", None)}
        if isinstance(base, bnb.nn.Linear4bit) and "bnb4" in layers:
            extra = {
                "compute_dtype": base.compute_dtype,
                "compress_statistics": base.weight.compress_statistics,
                "quant_type": base.weight.quant_type,
            }
            return layers["bnb4"], {**kwargs, **extra}
    if backend == "torchao":
        return layers["torchao"], kwargs
    if backend == "optimum-quanto" and hasattr(base, "freeze"):
        return MoSLoRAQuantoLinear, kwargs
    return MoSLoRALinear, kwargs


def _base_of(target: nn.Module) -> nn.Module:
    return target.get_base_layer() if isinstance(target, BaseTunerLayer) else target


def moslora_linear(target: nn.Module, adapter_name: str, config, **kwargs) -> nn.Module:
    """PEFT custom-module factory for Linear targets: the MoSLoRA layer matching the base's quantization."""
    cls, kwargs = _linear_class_and_kwargs(_base_of(target), kwargs)
    layer = cls(target, adapter_name, config=config, **kwargs)
    layer.moslora_layer_name = kwargs.get("target_name")
    return layer


def moslora_conv2d(target: nn.Module, adapter_name: str, config, **kwargs) -> nn.Module:
    """PEFT custom-module factory for Conv2d targets (no backend here requantizes convs: merging them refuses)."""
    layer = MoSLoRAConv2d(target, adapter_name, config=config, **kwargs)
    layer.moslora_layer_name = kwargs.get("target_name")
    return layer


def upgraded_layer_class(layer: nn.Module) -> type | None:
    """The MoSLoRA class for a PEFT LoRA layer created earlier by a plain LoRA (None: not a PEFT LoRA layer)."""
    from peft.tuners.lora.layer import Conv2d, Linear

    if type(layer) is Linear:
        return _linear_class_and_kwargs(layer.get_base_layer(), {})[0]
    if type(layer) is Conv2d:
        return MoSLoRAConv2d
    for cls in _peft_quantized_layers().values():
        if type(layer) is cls.__bases__[1]:
            return cls
    return None
