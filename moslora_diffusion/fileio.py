"""The one place that writes and reads files: atomic writes, and safetensors reads that fail clearly.

Every file the project writes goes through :func:`atomic_path` (write to a temporary name in the same
folder, fsync, rename), so a crash or a full disk leaves either the old file or the new one, never half
of one. Reads of user-supplied files go through :func:`load_safetensors`, which only ever parses
safetensors (no pickle) and turns every parse failure into one ``ValueError`` naming the file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import re
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
        # mkstemp (and safetensors' writer) leave 0600 files; outputs get the usual permissions.
        os.chmod(tmp, 0o666 & ~_umask())
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
    os.chmod(tmp, 0o777 & ~_umask())
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


def save_safetensors(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> Path:
    """Write ``tensors`` (contiguous copies) to ``path`` atomically; metadata values must be strings."""
    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        try:
            save_file(tensors, str(tmp), metadata=metadata)
        except SafetensorError as err:
            raise as_os_error(err, path) from None
    return Path(path)


def as_os_error(err: BaseException, path: str | os.PathLike) -> BaseException:
    """safetensors reports a full disk as ``SafetensorError("... I/O error: ... (os error 28)")``; make such
    errors the OSError (errno ENOSPC, ...) they are, naming ``path``. Other errors come back unchanged."""
    text = str(err)
    match = re.search(r"os error (\d+)", text)
    if "I/O error" not in text and not match:
        return err
    code = int(match.group(1)) if match else errno.EIO
    return OSError(code, os.strerror(code), str(path))


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
        raise ValueError(
            f"{path}: only .safetensors files are accepted (pickle formats such as .bin/.ckpt/.pt are refused)"
        )
    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError, OverflowError) as err:
        raise ValueError(f"{path}: not a valid safetensors file ({err})") from None
    with handle as f:
        yield f


def dumps_metadata(value) -> str:
    """JSON for a safetensors metadata value (which must be a string)."""
    return json.dumps(value, sort_keys=True, default=str)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


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


# --------------------------------------------------------------------------------------------------
# Streaming safetensors: one tensor in memory at a time, for files the size of a whole model.

# The format's dtype codes (https://github.com/huggingface/safetensors, "Format").
_SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_SAFETENSORS_CODES = {dtype: code for code, dtype in _SAFETENSORS_DTYPES.items()}
_MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies in a safetensors file: dtype, shape and absolute byte range."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int


class SafetensorsReader:
    """Reads a safetensors file one tensor at a time with plain file reads.

    ``safe_open`` memory-maps the whole file, and every page it touches stays resident; reading each
    tensor into its own buffer instead keeps memory at one tensor however large the file. The header is
    checked when opening, so a corrupt or truncated file is one ``ValueError`` naming it.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise ValueError(f"{self.path}: no such file")
        self._file = open(self.path, "rb")  # noqa: SIM115 - closed by close() / the context manager
        try:
            self.tensors, self.metadata = self._read_header()
        except BaseException:
            self._file.close()
            raise

    def _read_header(self) -> tuple[dict[str, TensorInfo], dict[str, str]]:
        size = os.fstat(self._file.fileno()).st_size
        prefix = self._file.read(8)
        header_len = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        if header_len <= 0 or header_len > min(_MAX_HEADER_BYTES, size - 8):
            raise ValueError(
                f"{self.path}: not a valid safetensors file (bad header length); the file is corrupt or truncated"
            )
        try:
            header = json.loads(self._file.read(header_len))
        except (UnicodeDecodeError, ValueError) as err:
            raise ValueError(f"{self.path}: not a valid safetensors file (unreadable header: {err})") from None
        if not isinstance(header, dict):
            raise ValueError(f"{self.path}: not a valid safetensors file (the header is not a JSON object)")
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise ValueError(f"{self.path}: not a valid safetensors file (__metadata__ must map names to strings)")
        data_start = 8 + header_len
        tensors = {}
        for name, entry in header.items():
            try:
                dtype = _SAFETENSORS_DTYPES[entry["dtype"]]
                shape, offsets = entry["shape"], entry["data_offsets"]
                if not all(_is_count(d) for d in shape) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
                    raise ValueError
                begin, end = offsets
            except (KeyError, TypeError, ValueError):
                raise ValueError(f"{self.path}: not a valid safetensors file (bad header entry for {name!r})") from None
            numel = 1
            for d in shape:
                numel *= d
            if end - begin != numel * dtype.itemsize or data_start + end > size:
                raise ValueError(
                    f"{self.path}: tensor {name!r} lies outside the file; the file is corrupt or truncated"
                )
            tensors[name] = TensorInfo(dtype, tuple(shape), data_start + begin, data_start + end)
        return tensors, metadata

    def read(self, name: str) -> torch.Tensor:
        """The tensor ``name``, in a fresh buffer of its own (writable, on the CPU)."""
        info = self.tensors[name]
        buffer = bytearray(info.end - info.start)
        self._file.seek(info.start)
        if self._file.readinto(buffer) != len(buffer):
            raise ValueError(f"{self.path}: tensor {name!r} is cut short; the file is truncated")
        if not buffer:
            return torch.empty(info.shape, dtype=info.dtype)
        return torch.frombuffer(buffer, dtype=info.dtype).reshape(info.shape)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _is_count(value) -> bool:
    """A non-negative JSON integer (a dimension or a byte offset)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def write_safetensors_streaming(
    path: str | os.PathLike,
    entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
    tensor_for,
    metadata: dict[str, str] | None = None,
) -> int:
    """Write a safetensors file whose tensors are produced one by one; returns the bytes of tensor data.

    ``entries`` declares (name, dtype, shape) of every tensor in file order, so the header can be written
    first; ``tensor_for(name)`` then produces each tensor, which is written and dropped before the next.
    Writes ``path`` directly: call it on the temporary path of :func:`atomic_path` / :func:`atomic_directory`.
    """
    header: dict[str, object] = {}
    offset = 0
    for name, dtype, shape in entries:
        numel = 1
        for d in shape:
            numel *= d
        nbytes = numel * dtype.itemsize
        header[name] = {
            "dtype": _SAFETENSORS_CODES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)  # the format aligns the data start to 8 bytes
    with open(path, "wb") as f:
        f.write(len(header_bytes).to_bytes(8, "little"))
        f.write(header_bytes)
        for name, dtype, shape in entries:
            tensor = tensor_for(name)
            if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
                raise ValueError(
                    f"{path}: tensor {name!r} came out {tensor.dtype} {tuple(tensor.shape)}, "
                    f"declared {dtype} {tuple(shape)}"
                )
            if tensor.numel():
                f.write(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
    return offset
