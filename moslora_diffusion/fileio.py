"""The one place that writes and reads files: atomic writes, and safetensors reads that fail clearly.

Every file the project writes goes through :func:`atomic_path` (write to a temporary name in the same
folder, fsync, rename), so a crash or a full disk leaves either the old file or the new one, never half
of one. Reads of user-supplied files go through :func:`load_safetensors`, which only ever parses
safetensors (no pickle) and turns every parse failure into one ``ValueError`` naming the file.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it over ``path``, else remove it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it becomes ``path``, else it is removed.

    With ``overwrite``, an existing ``path`` is replaced only once the new folder is complete.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; choose another output or allow overwriting")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        for file in tmp.rglob("*"):
            if file.is_file():
                _fsync(file)
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """Write ``tensors`` (contiguous copies) to ``path`` atomically; metadata values must be strings."""
    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return Path(path)


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata of a safetensors file ({} if none); ValueError if it is not safetensors."""
    with _open_safetensors(path) as f:
        return dict(f.metadata() or {})


def load_safetensors(path: str | os.PathLike, device: str = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file; any parse failure is one ValueError naming the file."""
    path = Path(path)
    with _open_safetensors(path) as f:
        try:
            tensors = {key: f.get_tensor(key) for key in f.keys()}
        except (SafetensorError, RuntimeError, OSError, ValueError, OverflowError) as err:
            raise ValueError(f"{path}: cannot read tensors ({err}); the file is corrupt or truncated") from None
        return tensors, dict(f.metadata() or {})


@contextlib.contextmanager
def _open_safetensors(path: str | os.PathLike):
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    if path.suffix not in (".safetensors", ".sft"):
        # Pickle-based formats (.bin, .pt, .ckpt) can run code when loaded; we never unpickle user files.
        raise ValueError(f"{path}: only .safetensors files are accepted (pickle formats such as .bin/.ckpt/.pt are refused)")
    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError, OverflowError) as err:
        raise ValueError(f"{path}: not a valid safetensors file ({err})") from None
    with handle as f:
        yield f


def dumps_metadata(value) -> str:
    """JSON for a safetensors metadata value (which must be a string)."""
    return json.dumps(value, sort_keys=True, default=str)


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
