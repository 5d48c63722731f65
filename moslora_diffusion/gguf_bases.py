"""GGUF denoisers as training bases: a transformer in llama.cpp's block-quantized format, loaded by diffusers.

The community shares Flux (and SD3.5) transformers as ``.gguf`` files (city96's conversions, which
ComfyUI-GGUF reads): the original single-file names (``double_blocks.*``, ``joint_blocks.*``), each linear
weight stored in blocks of 32 or 256 values with their own scale (Q8_0, Q4_0, Q4_K, ...), norms and biases
in F32/F16. diffusers reads one with ``from_single_file(path, quantization_config=GGUFQuantizationConfig(
compute_dtype))``; its ``GGUFLinear`` keeps the blocks and dequantizes them in every forward, so with MoSLoRA

    y = dequant(Wq) x + b + s * B M A x          gradients reach A, M and B only (Wq is frozen bytes)

The MoSLoRA layer wraps ``GGUFLinear`` as any linear layer (PEFT's generic path). For training, every
``GGUFLinear`` dequantizes again in the backward rather than letting autograd keep its dequantized weight
(:func:`dequantize_again_in_backward`). No backend requantizes
llama.cpp's blocks, so merging into a GGUF layer or file refuses in one line: merge into the full-precision
file or folder the GGUF was made from. Only the denoiser comes from the file; everything else (configs,
tokenizers, text encoders, VAE) from ``--base_config``.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

GGUF_SUFFIX = ".gguf"


def is_gguf_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a GGUF file (by its suffix, as diffusers' loader decides)."""
    return Path(path).suffix.lower() == GGUF_SUFFIX


def check_gguf_installed() -> None:
    """ValueError in one line when the ``gguf`` package diffusers reads GGUF files with is missing."""
    if importlib.util.find_spec("gguf") is None:
        raise ValueError("GGUF bases need the gguf package: pip install gguf (or 'moslora-diffusion[gguf]')")


def read_gguf_tensor_names(path: str | os.PathLike) -> set[str]:
    """The tensor names of a GGUF file (its header; the tensor data stays memory-mapped, unread).

    ValueError in one line when the file is missing, not GGUF, or truncated (a tensor reaching past its end).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    if path.suffix != GGUF_SUFFIX:  # diffusers picks its GGUF reader by the exact suffix, else it unpickles
        raise ValueError(f"{path}: rename it to end in {GGUF_SUFFIX} (lower case), the suffix diffusers reads GGUF by")
    check_gguf_installed()
    from gguf import GGUFReader

    try:
        return {tensor.name for tensor in GGUFReader(str(path)).tensors}
    except Exception as err:  # noqa: BLE001 - GGUFReader raises ValueError, IndexError, OSError on bad bytes
        reason = " ".join(str(err).split())[:200] or type(err).__name__
        raise ValueError(f"{path}: not a readable GGUF file, or a truncated one ({reason})") from None


def gguf_quantization_config(compute_dtype: torch.dtype | None):
    """diffusers' config for reading a GGUF denoiser: weights stay in their blocks, layers compute in
    ``compute_dtype`` (the run's weight dtype; fp32 when None)."""
    from diffusers import GGUFQuantizationConfig

    return GGUFQuantizationConfig(compute_dtype=compute_dtype or torch.float32)


def refuse_merge_into_gguf(path: str | os.PathLike) -> None:
    """ValueError in one line: a GGUF base holds block-quantized weights that a merge cannot rewrite exactly."""
    if is_gguf_file(path):
        raise ValueError(
            f"--base {path} is a GGUF file: its weights are quantized in llama.cpp's blocks, which a merge cannot "
            "rewrite; merge into the full-precision .safetensors file or diffusers folder it was made from "
            "(the adapter trained over the GGUF loads there unchanged)"
        )


class _DequantizeAgainInBackward(torch.autograd.Function):
    """y = x dequant(Wq)^T + b, saving nothing: the backward dequantizes Wq again for dL/dx.

    Through ``torch.nn.functional.linear`` autograd keeps each layer's dequantized weight until the backward,
    a full-precision copy of every GGUF layer the step ran (without gradient checkpointing: the whole
    transformer at compute precision, so a Q4_0 base held more memory in training than a bf16 one).
    """

    @staticmethod
    def forward(ctx, inputs: torch.Tensor, layer: torch.nn.Module) -> torch.Tensor:
        ctx.layer = layer
        return type(layer).forward_native(layer, inputs)  # diffusers' own forward; no autograd records here

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        from diffusers.quantizers.gguf.utils import dequantize_gguf_tensor

        weight = dequantize_gguf_tensor(ctx.layer.weight).to(ctx.layer.compute_dtype)
        return grad_output @ weight.to(grad_output.dtype), None


def _lean_forward_native(layer: torch.nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    if torch.is_grad_enabled() and inputs.requires_grad:
        return _DequantizeAgainInBackward.apply(inputs, layer)
    return type(layer).forward_native(layer, inputs)  # nothing is saved without a gradient to carry


def dequantize_again_in_backward(model: torch.nn.Module) -> int:
    """Make every diffusers ``GGUFLinear`` in ``model`` keep no dequantized weight for the backward (it
    dequantizes again there: one more dequantization per layer and step, for a full-precision copy of the
    weights less in memory). Outputs and gradients are unchanged. Returns the number of layers changed."""
    from diffusers.quantizers.gguf.utils import GGUFLinear

    layers = [module for module in model.modules() if isinstance(module, GGUFLinear)]
    for layer in layers:
        layer.forward_native = _lean_forward_native.__get__(layer)
    return len(layers)
