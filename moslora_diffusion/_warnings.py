"""Notices of the libraries we use that are not the user's concern, silenced where they are emitted.

Importing this module is enough (it imports nothing heavy): ``moslora train`` and ``moslora merge`` both do.

- transformers 5 logs "`CLIPImageProcessor` requires torchvision (not installed); falling back to
  `CLIPImageProcessorPil`" (and the same for Siglip) when diffusers' pipeline modules are imported: the
  PIL fallback is what we want, and we never use the image processors (no safety checker, no IP-Adapter).
"""

from __future__ import annotations

import logging

_TORCHVISION_FALLBACK = "requires torchvision (not installed); falling back to"


class _DropTorchvisionFallbackNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return _TORCHVISION_FALLBACK not in record.getMessage()


def silence_library_notices() -> None:
    """Install the filters (idempotent)."""
    emitter = logging.getLogger("transformers.utils.import_utils")
    if not any(isinstance(f, _DropTorchvisionFallbackNotice) for f in emitter.filters):
        emitter.addFilter(_DropTorchvisionFallbackNotice())


silence_library_notices()
