"""A quantized frozen base: --quantize_base {int8,fp8,nf4} through diffusers' and transformers' own configs.

Only the frozen base's linear layers are quantized (weights only); the MoSLoRA adapters on top stay in full
precision, and what they learn is saved exactly as over a full-precision base. Which backend runs where:

    kind   CUDA (auto)      CPU (auto)    also
    int8   bitsandbytes     torchao       quanto; torchao on CUDA
    fp8    torchao          quanto        torchao on CPU; quanto on CUDA
    nf4    bitsandbytes     (needs CUDA)

diffusers refuses bitsandbytes without a GPU, and bitsandbytes' 4-bit CPU path fails on layers narrower
than its block size, so bitsandbytes is for CUDA only here. Every choice is checked (and the package
looked up) before any weight is loaded: a bad one is one line and exit status 2.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

import torch

# backend -> (module to look for, pip package)
_PACKAGES = {
    "torchao": ("torchao", "torchao"),
    "quanto": ("optimum.quanto", "optimum-quanto"),
    "bitsandbytes": ("bitsandbytes", "bitsandbytes"),
}
_KINDS_OF_BACKEND = {"torchao": ("int8", "fp8"), "quanto": ("int8", "fp8"), "bitsandbytes": ("int8", "nf4")}


@dataclass(frozen=True)
class BaseQuantization:
    """How to quantize the frozen base: ``kind`` by ``backend`` (resolved, never "auto")."""

    kind: str
    backend: str
    text_encoders: bool = False  # also the text encoders that are not trained (T5-XXL, ...)
    denoiser: bool = True  # False over a GGUF denoiser: quantized in its file, only the text encoders here

    def components(self, family, trained_text_encoders: tuple[str, ...], present: list[str]) -> list[str]:
        """The component names to quantize: the denoiser, and the frozen text encoders when asked."""
        names = [family.denoiser] if self.denoiser else []
        if self.text_encoders:
            names += [n for n in present if n.startswith("text_encoder") and n not in trained_text_encoders]
        return names

    def config_for(self, model_cls: type, torch_dtype: torch.dtype) -> Any:
        """The quantization config ``model_cls.from_pretrained`` takes: diffusers' for diffusers models,
        transformers' for text encoders (both libraries spell the same settings)."""
        is_diffusers = model_cls.__module__.split(".")[0] == "diffusers"
        library = importlib.import_module("diffusers" if is_diffusers else "transformers")
        if self.backend == "torchao":
            from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig

            quant_type = Int8WeightOnlyConfig() if self.kind == "int8" else Float8WeightOnlyConfig()
            return library.TorchAoConfig(quant_type)
        if self.backend == "quanto":
            weights = {"int8": "int8", "fp8": "float8"}[self.kind]
            # diffusers and transformers name the same setting differently
            return library.QuantoConfig(**{"weights_dtype" if is_diffusers else "weights": weights})
        if self.kind == "nf4":
            return library.BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch_dtype
            )
        return library.BitsAndBytesConfig(load_in_8bit=True)


def resolve_quantization(kind: str | None, backend: str, text_encoders: bool, cuda: bool) -> BaseQuantization | None:
    """Check --quantize_base / --quantization_backend / --quantize_text_encoders; ValueError in one line."""
    if kind is None:
        if backend != "auto" or text_encoders:
            raise ValueError("--quantization_backend and --quantize_text_encoders need --quantize_base int8|fp8|nf4")
        return None
    if backend == "auto":
        if cuda:
            backend = "bitsandbytes" if kind in ("int8", "nf4") else "torchao"
        elif kind == "nf4":
            raise ValueError("--quantize_base nf4 needs a CUDA GPU (bitsandbytes); without one use int8 or fp8")
        else:
            backend = "torchao" if kind == "int8" else "quanto"
    if kind not in _KINDS_OF_BACKEND[backend]:
        others = [b for b, kinds in _KINDS_OF_BACKEND.items() if kind in kinds]
        raise ValueError(
            f"--quantization_backend {backend} has no {kind}; "
            f"use {' or '.join(others)} (or --quantization_backend auto)"
        )
    if backend == "bitsandbytes" and not cuda:
        raise ValueError("--quantization_backend bitsandbytes needs a CUDA GPU; without one use torchao or quanto")
    module, package = _PACKAGES[backend]
    if importlib.util.find_spec(module.split(".")[0]) is None or importlib.util.find_spec(module) is None:
        raise ValueError(f"--quantize_base {kind} with {backend} needs {package}: pip install {package}")
    return BaseQuantization(kind, backend, text_encoders)


def is_quantized(model: Any) -> bool:
    """Whether ``model`` was loaded with a quantization config (its weights must not be cast)."""
    return getattr(model, "hf_quantizer", None) is not None


def contiguous_quanto_inputs(model) -> None:
    """optimum-quanto's int8 CPU kernel (torch._weight_int8pack_mm, bf16) refuses an input whose last dimension
    is strided, as SD2/SDXL's proj_in gets one (a permuted feature map): give every quanto linear layer a
    contiguous input (a no-op where it already is)."""
    from optimum.quanto.nn import QLinear

    if not isinstance(model, torch.nn.Module):
        return
    for module in model.modules():
        if isinstance(module, QLinear):
            module.register_forward_pre_hook(lambda _, args: (args[0].contiguous(), *args[1:]))
