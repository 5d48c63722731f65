"""MoSLoRA (mixture-of-subspaces LoRA) adapters for Stable Diffusion-family models.

Train with the mixer, ship as plain LoRA: delta W = s * B M A folds exactly into B' = B M.
"""

from .config import MIXER_INITS, MoSLoRAConfig
from .inject import adapter_parameters, add_moslora
from .formats import detect_format, read_adapter_file, resize_adapter, validate_adapter_state_dict
from .layer import MoSLoRAConv2d, MoSLoRALinear, fold_mixer_into_lora_b, moslora_layers
from .loaders import load_moslora_weights, save_moslora_weights
from .targets import PRESET_NAMES, PRESETS

__version__ = "0.1.0"

__all__ = [
    "MIXER_INITS",
    "MoSLoRAConfig",
    "MoSLoRAConv2d",
    "MoSLoRALinear",
    "PRESETS",
    "PRESET_NAMES",
    "__version__",
    "adapter_parameters",
    "add_moslora",
    "detect_format",
    "load_moslora_weights",
    "read_adapter_file",
    "resize_adapter",
    "save_moslora_weights",
    "validate_adapter_state_dict",
    "fold_mixer_into_lora_b",
    "moslora_layers",
]
