"""Adapter files: the native MoSLoRA layout, the folded layouts each client reads, and their checks.

One adapted module holds delta W = s * B M A. Each layout is one module that knows its own format
(tensor keys, metadata, reader and writer):

    native          (native.py)          A, M, B unfolded; a versioned JSON header "moslora"
    diffusers/PEFT  (diffusers.py)       A and B' = B M (the mixer folded: exact); "lora_adapter_metadata"
    kohya           (kohya.py)           kohya key renaming: lora_down = A, lora_up = B M, one alpha per
                                         component; webui's ss_* card. OneTrainer's layout for SD3/Flux
    sd-scripts      (sd_scripts.py)      Flux / SD3 under the original model's names, q/k/v fused
    ComfyUI         (comfyui.py)         read only: diffusion_model.<original name>, text_encoders.<clip_l, ...>
    the diffusers file (diffusers_file.py)  what pytorch_lora_weights.safetensors holds per family

and around them: state.py (the adapter in memory), names.py (the one key-suffix table, metadata keys),
checks.py (validation, layout detection), files.py (file names, find / read / write), checkpoint.py
(a training checkpoint folder read as a native adapter), sgm_names.py (SDXL's original UNet block
names, as other trainers' kohya files use them), resize.py (rank reduction, mixer statistics).

Module paths in files are checkpoint names: a CLIP text model keeps its ``text_model.`` root even where
transformers 5 flattens it away (every LoRA tool expects it). This package works on tensors and metadata
only; :mod:`moslora_diffusion.loaders` matches adapters against live models and applies them to pipelines.
"""

from .checkpoint import CHECKPOINT_CONFIG_KEY, read_training_checkpoint, training_checkpoint_folder
from .checks import (
    LORA_DTYPES,
    check_adapter_tensor,
    check_component_config,
    detect_format,
    has_only_adapter_keys,
    validate_adapter_state_dict,
)
from .diffusers import diffusers_state_dict, folded_lora_b, plain_lora_config_kwargs
from .diffusers_file import diffusers_file_state_dict, fold_scale_into_lora_b
from .files import (
    DIFFUSERS_WEIGHT_NAME,
    KOHYA_WEIGHT_NAME,
    LAYOUT_WEIGHT_NAMES,
    NATIVE_WEIGHT_NAME,
    ONETRAINER_WEIGHT_NAME,
    WEIGHT_NAMES,
    find_adapter_file,
    kohya_file_state_dict,
    layout_state_dict,
    parse_adapter_state_dict,
    read_adapter_file,
    write_adapter_files,
)
from .kohya import kohya_metadata, kohya_prefix, kohya_state_dict, kohya_stem
from .names import COMFYUI_T5_PREFIX, DIFFUSERS_METADATA_KEY, FACTOR_SUFFIXES, FORMATS, LAYOUTS, NATIVE_HEADER_KEY
from .native import FORMAT_VERSION, native_state_dict
from .resize import ResizeReport, mixer_statistics, resize_adapter
from .sd_scripts import read_sd_scripts_state_dict, sd_scripts_state_dict
from .state import (
    CONFIG_FIELDS,
    AdapterState,
    ComponentAdapter,
    LayerFactors,
    as_moslora_state,
    component_config_from_peft,
    config_rank,
    config_scale,
    infer_component_config,
)

__all__ = [
    "CHECKPOINT_CONFIG_KEY",
    "COMFYUI_T5_PREFIX",
    "CONFIG_FIELDS",
    "DIFFUSERS_METADATA_KEY",
    "DIFFUSERS_WEIGHT_NAME",
    "FACTOR_SUFFIXES",
    "FORMATS",
    "FORMAT_VERSION",
    "KOHYA_WEIGHT_NAME",
    "LAYOUTS",
    "LAYOUT_WEIGHT_NAMES",
    "LORA_DTYPES",
    "NATIVE_HEADER_KEY",
    "NATIVE_WEIGHT_NAME",
    "ONETRAINER_WEIGHT_NAME",
    "WEIGHT_NAMES",
    "AdapterState",
    "ComponentAdapter",
    "LayerFactors",
    "ResizeReport",
    "as_moslora_state",
    "check_adapter_tensor",
    "check_component_config",
    "component_config_from_peft",
    "config_rank",
    "config_scale",
    "detect_format",
    "diffusers_file_state_dict",
    "diffusers_state_dict",
    "find_adapter_file",
    "fold_scale_into_lora_b",
    "folded_lora_b",
    "has_only_adapter_keys",
    "infer_component_config",
    "kohya_file_state_dict",
    "kohya_metadata",
    "kohya_prefix",
    "kohya_state_dict",
    "kohya_stem",
    "layout_state_dict",
    "mixer_statistics",
    "native_state_dict",
    "parse_adapter_state_dict",
    "plain_lora_config_kwargs",
    "read_adapter_file",
    "read_sd_scripts_state_dict",
    "read_training_checkpoint",
    "resize_adapter",
    "sd_scripts_state_dict",
    "training_checkpoint_folder",
    "validate_adapter_state_dict",
    "write_adapter_files",
]
