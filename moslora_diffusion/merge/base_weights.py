"""The base checkpoint, read tensor by tensor: each component's safetensors files, and merged tensors on demand."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import torch

from ..clip_names import other_clip_name
from ..fileio import SafetensorsReader, TensorInfo
from .deltas import AdapterDeltas

# Weight files of a component folder that a merge never carries over unmerged (pickles, other frameworks).
FOREIGN_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5", ".onnx", ".pb", ".gguf")
_WEIGHT_FILE = re.compile(r"(diffusion_pytorch_model|model)(?:\.(\w+))?\.safetensors")
WEIGHT_INDEX = re.compile(r"(diffusion_pytorch_model|model)\.safetensors\.index(?:\.(\w+))?\.json")


@dataclasses.dataclass
class ComponentWeights:
    """One component's safetensors weights: the files (shards) merged, and where each tensor lies."""

    name: str
    folder: Path
    files: list[Path]
    index: Path | None
    dropped: list[Path]  # other weight files of the folder, not carried over (stale once merged)
    tensors: dict[str, tuple[Path, TensorInfo]]
    config: dict

    @classmethod
    def find(cls, base: Path, name: str) -> ComponentWeights:
        folder = base / name
        sets: dict[str | None, tuple[Path | None, list[Path]]] = {}
        for path in sorted(folder.iterdir()) if folder.is_dir() else []:
            if match := WEIGHT_INDEX.fullmatch(path.name):
                try:
                    weight_map = json.loads(path.read_text())["weight_map"]
                except (OSError, ValueError, KeyError, TypeError) as err:
                    raise ValueError(f"{path}: unreadable shard index ({err})") from None
                sets[match.group(2)] = (path, [folder / f for f in dict.fromkeys(weight_map.values())])
        for path in sorted(folder.iterdir()) if folder.is_dir() else []:
            match = _WEIGHT_FILE.fullmatch(path.name)
            if match and match.group(2) not in sets:
                sets[match.group(2)] = (None, [path])
        if None in sets:
            variant = None
        elif len(sets) == 1:
            variant = next(iter(sets))
        elif sets:
            raise ValueError(
                f"{folder}: several weight variants ({', '.join(sorted(map(str, sets)))}) and no main weights; keep one"
            )
        else:
            pickles = sorted(p.name for p in folder.glob("*") if p.suffix in FOREIGN_WEIGHT_SUFFIXES)
            found = (
                f"only {', '.join(pickles)}, which are not safetensors (pickles are never loaded)"
                if pickles
                else "no weights"
            )
            raise ValueError(f"{folder}: {found}; save the base model with safe_serialization=True")
        index, files = sets[variant]
        chosen = set(files) | ({index} if index else set())
        dropped = [
            p
            for p in sorted(folder.iterdir())
            if p not in chosen
            and (p.suffix in (".safetensors", *FOREIGN_WEIGHT_SUFFIXES) or WEIGHT_INDEX.fullmatch(p.name))
        ]
        tensors = {}
        for file in files:
            with SafetensorsReader(file) as reader:
                for key, info in reader.tensors.items():
                    tensors[key] = (file, info)
        config_path = folder / "config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        if isinstance(config.get("quantization_config"), dict):
            method = config["quantization_config"].get("quant_method", "unknown")
            raise ValueError(
                f"{folder}: a quantized checkpoint ({method}); merging writes full-precision weights, "
                "so give the full-precision base"
            )
        return cls(name, folder, files, index, dropped, tensors, config)

    def locate(self, model_key: str) -> str | None:
        """The file's name for a model tensor name (transformers 5 drops CLIP's ``text_model.`` level)."""
        if model_key in self.tensors:
            return model_key
        other = other_clip_name(model_key)
        return other if other in self.tensors else None


class MergedTensors:
    """Base tensors with their deltas added, read one at a time; each returned in its output dtype."""

    def __init__(self, weights: dict[str, ComponentWeights], deltas: AdapterDeltas, dtype: torch.dtype | None):
        self.weights = weights
        self.deltas = deltas
        self.dtype = dtype
        self.model_key: dict[tuple[str, str], str] = {}  # (component, file key) -> model key of a delta
        self._readers: dict[Path, SafetensorsReader] = {}
        self.merged = 0

    def out_dtype(self, info: TensorInfo) -> torch.dtype:
        return self.dtype if self.dtype is not None and info.dtype.is_floating_point else info.dtype

    def read(self, component: str, key: str) -> torch.Tensor:
        file, info = self.weights[component].tensors[key]
        if file not in self._readers:
            self._readers[file] = SafetensorsReader(file)
        tensor = self._readers[file].read(key)
        model_key = self.model_key.get((component, key))
        if model_key is not None:
            tensor = tensor.float() + self.deltas.delta(component, model_key)
            self.merged += 1
        return tensor.to(self.out_dtype(info))

    def close(self) -> None:
        for reader in self._readers.values():
            reader.close()
        self._readers.clear()
