"""A training checkpoint folder (``checkpoint-N/``), read as a native adapter.

    checkpoint-N/adapter_<component>.safetensors   PEFT parameter names: <module>.lora_A.<adapter>.weight,
                                                   .lora_mixer.<adapter>.weight, .lora_B.<adapter>.weight;
                                                   metadata "moslora.config": the component's CONFIG_FIELDS
    checkpoint-N/training_state.json               {"step", "seed", "family", "base_model", ...}

The tensors and configs become a native state dict and header and go through the native reader, so a
checkpoint is checked exactly as a native file is. Checkpoints written before the metadata existed
cannot be read: the error says which files of the run to use instead.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..clip_names import with_clip_root
from ..families import get_family
from ..fileio import load_safetensors
from .checks import checked_family, json_metadata
from .names import FACTOR_SUFFIXES, NATIVE_HEADER_KEY
from .native import FORMAT_VERSION, parse_native
from .state import AdapterState

CHECKPOINT_CONFIG_KEY = "moslora.config"
TRAINING_STATE_FILE = "training_state.json"
_ADAPTER_FILE = re.compile(r"adapter_(\w+)\.safetensors")
# A PEFT parameter name: the module, the factor, the adapter name.
_PEFT_KEY = re.compile(r"(.+)\.(lora_A|lora_B|lora_mixer)\.([^.]+)\.weight")
_FACTOR_OF_PEFT = {"lora_A": "A", "lora_B": "B", "lora_mixer": "M"}


def training_checkpoint_folder(path: str | Path) -> Path | None:
    """The checkpoint folder ``path`` is or holds an ``adapter_<component>.safetensors`` of; else None."""
    path = Path(path)
    if not path.is_dir() and not (path.is_file() and _ADAPTER_FILE.fullmatch(path.name)):
        return None
    folder = path if path.is_dir() else path.parent
    if not (folder / TRAINING_STATE_FILE).is_file() or not any(folder.glob("adapter_*.safetensors")):
        return None
    return folder


def read_training_checkpoint(path: str | Path) -> AdapterState:
    """The adapter of a checkpoint folder (every component) or of one of its adapter files."""
    path = Path(path)
    folder = training_checkpoint_folder(path)
    if folder is None:
        raise ValueError(f"{path}: not a training checkpoint (no {TRAINING_STATE_FILE} beside adapter_*.safetensors)")
    files = [path] if path.is_file() else sorted(folder.glob("adapter_*.safetensors"))
    training_state = _training_state(folder)
    family = checked_family(training_state.get("family"), folder / TRAINING_STATE_FILE)
    clip_components = get_family(family).clip_text_encoders() if family else ()
    tensors, configs = {}, {}
    for file in files:
        component = _ADAPTER_FILE.fullmatch(file.name).group(1)
        file_tensors, metadata = load_safetensors(file)
        if CHECKPOINT_CONFIG_KEY not in (metadata or {}):
            final = folder.parent / "moslora_weights.safetensors"
            raise ValueError(
                f"{file}: a training checkpoint without {CHECKPOINT_CONFIG_KEY!r} metadata (an earlier version's), "
                f"so not readable as an adapter; use the run's final adapter {final}, or resume the run from it"
            )
        configs[component] = json_metadata(metadata, CHECKPOINT_CONFIG_KEY, file)
        for key, tensor in file_tensors.items():
            module, factor = _native_name(key, file)
            if component in clip_components:
                module = with_clip_root(module)
            tensors[f"{component}.{module}{FACTOR_SUFFIXES['native'][factor]}"] = tensor
    header = {
        "format_version": FORMAT_VERSION,
        "family": family,
        "base_model": training_state.get("base_model"),
        "components": configs,
    }
    state = parse_native(tensors, {NATIVE_HEADER_KEY: json.dumps(header)}, path)
    state.source_format, state.source_path = "checkpoint", path
    return state


def _training_state(folder: Path) -> dict:
    try:
        state = json.loads((folder / TRAINING_STATE_FILE).read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{folder / TRAINING_STATE_FILE}: unreadable ({err})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{folder / TRAINING_STATE_FILE}: should be a JSON object")
    return state


def _native_name(key: str, file: Path) -> tuple[str, str]:
    """(module, factor A/B/M) of a PEFT parameter name."""
    match = _PEFT_KEY.fullmatch(key)
    if match is None:
        raise ValueError(
            f"{file}: unexpected key {key!r}; a checkpoint's adapter keys end in "
            ".lora_A.<adapter>.weight / .lora_B.<adapter>.weight / .lora_mixer.<adapter>.weight"
        )
    return match.group(1), _FACTOR_OF_PEFT[match.group(2)]
