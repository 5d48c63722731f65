"""MoSLoRA (mixture-of-subspaces LoRA) adapters for Stable Diffusion-family models.

Train with the mixer, ship as plain LoRA: delta W = s * B M A folds exactly into B' = B M.

The names below load on first use (PEP 562), so that ``import moslora_diffusion`` and the ``moslora``
command's ``--help`` do not wait for torch, diffusers and PEFT.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .version import __version__

# public name -> the submodule that defines it
_EXPORTS = {
    "MIXER_INITS": "choices",
    "MoSLoRAConfig": "config",
    "adapter_parameters": "inject",
    "add_moslora": "inject",
    "detect_format": "formats",
    "read_adapter_file": "formats",
    "resize_adapter": "formats",
    "validate_adapter_state_dict": "formats",
    "MoSLoRAConv2d": "layer",
    "MoSLoRALinear": "layer",
    "fold_mixer_into_lora_b": "layer",
    "moslora_layers": "layer",
    "load_moslora_weights": "loaders",
    "save_moslora_weights": "loaders",
    "PRESET_NAMES": "targets",
    "PRESETS": "targets",
}

__all__ = sorted([*_EXPORTS, "__version__"])


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from .choices import MIXER_INITS
    from .config import MoSLoRAConfig
    from .formats import detect_format, read_adapter_file, resize_adapter, validate_adapter_state_dict
    from .inject import adapter_parameters, add_moslora
    from .layer import MoSLoRAConv2d, MoSLoRALinear, fold_mixer_into_lora_b, moslora_layers
    from .loaders import load_moslora_weights, save_moslora_weights
    from .targets import PRESET_NAMES, PRESETS
