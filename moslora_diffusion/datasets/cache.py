"""Caches of VAE latents and text-encoder outputs: one safetensors entry per key, in memory or on disk.

A key is a SHA-256 over everything that determines the tensors: for a latent, the image's bytes, the VAE
weights (a fingerprint string from the caller, e.g. :func:`weights_fingerprint`) and the transform (the
:class:`~moslora_diffusion.datasets.buckets.Placement`: bucket, resize, crop, flip); for a text embedding,
the caption and the encoders' fingerprint. So a changed image, VAE or crop misses the cache instead of
reusing a wrong entry. Entries are written atomically (fileio), so a crash never leaves half of one; an
entry that is corrupt or whose recorded key disagrees with its name is recomputed with a warning.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from pathlib import Path

import torch

from ..fileio import load_safetensors, save_safetensors
from .buckets import Placement

logger = logging.getLogger(__name__)

CACHE_FORMAT = "moslora-cache-1"  # part of every key: a new layout never reads an old entry
Tensors = dict[str, torch.Tensor]


def _digest(*parts: str) -> str:
    hasher = hashlib.sha256()
    for part in (CACHE_FORMAT, *parts):
        hasher.update(part.encode("utf-8", "surrogatepass"))
        hasher.update(b"\x00")
    return hasher.hexdigest()


_FILE_DIGESTS: dict[tuple[str, int, int], str] = {}


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes (remembered per path, size and modification time within the process)."""
    path = Path(path)
    stat = path.stat()
    memo = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if memo not in _FILE_DIGESTS:
        hasher = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                hasher.update(block)
        _FILE_DIGESTS[memo] = hasher.hexdigest()
    return _FILE_DIGESTS[memo]


def weights_fingerprint(module: torch.nn.Module) -> str:
    """SHA-256 of a module's parameters and buffers (names, dtypes, shapes, values): the VAE's identity."""
    hasher = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        hasher.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        hasher.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return hasher.hexdigest()


def latent_cache_key(image_path: str | Path, vae_fingerprint: str, placement: Placement, extra: str = "") -> str:
    """The key of one image's latent at one placement; ``extra`` for anything else that matters (dtype)."""
    return _digest("latent", file_digest(image_path), vae_fingerprint, repr(placement), extra)


def caption_cache_key(caption: str, encoder_fingerprint: str) -> str:
    """The key of one caption's text-encoder outputs."""
    return _digest("caption", caption, encoder_fingerprint)


class TensorCache:
    """Tensors by key: on disk in ``folder`` (``<key>.safetensors``), or in memory when ``folder`` is None.

    ``hits`` and ``computed`` count lookups answered from the cache and calls of ``compute``.
    """

    def __init__(self, folder: str | Path | None, kind: str):
        self.folder = Path(folder) if folder is not None else None
        self.kind = kind
        self.memory: dict[str, Tensors] = {}
        self.hits = self.computed = 0

    def path(self, key: str) -> Path | None:
        return self.folder / f"{key}.safetensors" if self.folder is not None else None

    def get_or_compute(self, key: str, compute: Callable[[], Tensors]) -> Tensors:
        """The cached tensors of ``key``, else ``compute()``'s, stored for next time."""
        cached = self._read(key)
        if cached is not None:
            self.hits += 1
            return cached
        tensors = {name: tensor.detach().cpu() for name, tensor in compute().items()}
        self.computed += 1
        self._write(key, tensors)
        return tensors

    def _read(self, key: str) -> Tensors | None:
        if self.folder is None:
            return self.memory.get(key)
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            tensors, metadata = load_safetensors(path)
        except ValueError as err:
            logger.warning("%s cache entry %s is unreadable (%s); computing it again", self.kind, path, err)
            return None
        if metadata.get("key") != key or metadata.get("format") != CACHE_FORMAT:
            logger.warning("%s cache entry %s was written for another input; computing it again", self.kind, path)
            return None
        return tensors

    def _write(self, key: str, tensors: Tensors) -> None:
        if self.folder is None:
            self.memory[key] = tensors
            return
        try:
            save_safetensors(tensors, self.path(key), metadata={"key": key, "format": CACHE_FORMAT, "kind": self.kind})
        except OSError as err:
            logger.warning(
                "Cannot write %s cache entry %s (%s); training goes on without it", self.kind, self.path(key), err
            )
