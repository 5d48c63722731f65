"""Notices of the libraries we use that are not the user's concern, silenced where they are emitted.

Importing this module is enough (it imports nothing heavy): ``moslora train`` and ``moslora merge`` both do.

- transformers 5 logs "`CLIPImageProcessor` requires torchvision (not installed); falling back to
  `CLIPImageProcessorPil`" (and the same for Siglip) when diffusers' pipeline modules are imported: the
  PIL fallback is what we want, and we never use the image processors (no safety checker, no IP-Adapter).
- With the optional quantization backends installed (PEFT and diffusers import them when present): torchao
  logs that its CUDA-only kernels (mxfp8, cutlass) failed to load on a CPU machine, and torch that torchao
  registers Enums the old way; bitsandbytes that the optional `kernels` package is missing; diffusers that
  torchao no longer has its old tensor classes (only for loading old torchao pickles, which we never do),
  and that int8 supports only bf16 (weight-only int8 runs in fp32 too; the trainer loads in its weight dtype).
"""

from __future__ import annotations

import logging

# logger -> the start of (or a phrase in) each notice it emits that is not the user's concern
_NOTICES = {
    "transformers.utils.import_utils": ("requires torchvision (not installed); falling back to",),
    "torchao": ("Failed to load ",),
    "torch.utils._pytree": ("is an Enum subclass and is now natively supported",),
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward from kernels-community",),
    "diffusers.quantizers.torchao.torchao_quantizer": (
        "Unable to import `torchao` Tensor objects",
        "for integer quantization, but only bfloat16 is supported right now",  # fp32 works (tests/test_quantized.py)
    ),
}


class _DropNotices(logging.Filter):
    def __init__(self, phrases: tuple[str, ...]):
        super().__init__()
        self.phrases = phrases

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(phrase in message for phrase in self.phrases)


def silence_library_notices() -> None:
    """Install the filters (idempotent)."""
    for name, phrases in _NOTICES.items():
        emitter = logging.getLogger(name)
        if not any(isinstance(f, _DropNotices) for f in emitter.filters):
            emitter.addFilter(_DropNotices(phrases))


silence_library_notices()
