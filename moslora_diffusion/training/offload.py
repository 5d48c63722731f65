"""Frozen components that training no longer needs leave the accelerator, and come back to sample.

Once every caption's embedding is cached (frozen text encoders) and every latent is cached, the text
encoders and the VAE only serve validation, which runs the whole pipeline: they wait in CPU memory and
return to the accelerator for the duration of each validation (or class-image generation).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator

import torch

logger = logging.getLogger(__name__)


class OffloadedComponents:
    """``names`` of ``components`` kept on the CPU between uses; :meth:`restored` brings them to ``device``."""

    def __init__(self, components: dict, names: list[str], device: torch.device):
        self.components, self.names, self.device = components, [n for n in names if components.get(n)], device

    def __bool__(self) -> bool:
        return bool(self.names) and torch.device(self.device).type != "cpu"

    def offload(self) -> None:
        if not self:
            return
        for name in self.names:
            torch.nn.Module.to(self.components[name], "cpu")  # diffusers' .to warns on fp32 models
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        logger.info("Moved %s off the accelerator (their outputs are cached)", ", ".join(self.names))

    @contextlib.contextmanager
    def restored(self) -> Iterator[None]:
        """The components on the accelerator inside the block, back on the CPU after it."""
        if not self:
            yield
            return
        for name in self.names:
            torch.nn.Module.to(self.components[name], self.device)
        try:
            yield
        finally:
            self.offload()

    def around(self, function: Callable) -> Callable:
        """``function`` run with the components restored (validation runs the whole pipeline)."""

        @functools.wraps(function)
        def wrapped(*args, **kwargs):
            with self.restored():
                return function(*args, **kwargs)

        return wrapped
