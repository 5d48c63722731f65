"""Adapter files on disk: their standard names, finding one in a folder, reading any layout, writing several.

    moslora_weights.safetensors                   native (:mod:`.native`)
    pytorch_lora_weights.safetensors              the diffusers file (:mod:`.diffusers_file`: kohya keys for
                                                  SD1/SD2/SDXL, folded PEFT keys for SD3/Flux)
    pytorch_lora_weights_kohya.safetensors        kohya (:mod:`.kohya`; SDXL: SGM UNet names, :mod:`.sgm_names`;
                                                  SD3/Flux: sd-scripts' names, :mod:`.sd_scripts`)
    pytorch_lora_weights_onetrainer.safetensors   OneTrainer's (``moslora export --layout onetrainer`` only)

Reading takes any of these, and other trainers' files in the same layouts (diffusers/PEFT keys as
ai-toolkit writes them, with or without per-module ``.alpha``; kohya keys with SGM block names; sd-scripts'
Flux and SD3 files; ComfyUI's ``diffusion_model.`` keys, :mod:`.comfyui`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from ..families import get_family
from ..fileio import load_safetensors, save_safetensors
from .checkpoint import read_training_checkpoint, training_checkpoint_folder
from .checks import detect_format, validate_adapter_state_dict
from .comfyui import parse_comfyui
from .diffusers import parse_diffusers
from .diffusers_file import diffusers_file_state_dict
from .kohya import kohya_state_dict, parse_kohya
from .names import FORMATS, LAYOUTS
from .native import native_state_dict, parse_native
from .sd_scripts import NoSdScriptsName, parse_sd_scripts, sd_scripts_state_dict
from .sgm_names import NoSgmName, with_sgm_unet_names
from .state import AdapterState

logger = logging.getLogger(__name__)

NATIVE_WEIGHT_NAME = "moslora_weights.safetensors"
DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # what stock load_lora_weights(dir) picks
# Must not end in "pytorch_lora_weights.safetensors", or stock load_lora_weights(dir) could pick it.
KOHYA_WEIGHT_NAME = "pytorch_lora_weights_kohya.safetensors"
ONETRAINER_WEIGHT_NAME = "pytorch_lora_weights_onetrainer.safetensors"
# The files save_moslora_weights writes, and with export's OneTrainer file, every layout's file name.
WEIGHT_NAMES = {"native": NATIVE_WEIGHT_NAME, "diffusers": DIFFUSERS_WEIGHT_NAME, "kohya": KOHYA_WEIGHT_NAME}
LAYOUT_WEIGHT_NAMES = {**WEIGHT_NAMES, "onetrainer": ONETRAINER_WEIGHT_NAME}

_PARSERS = {
    "native": parse_native,
    "diffusers": parse_diffusers,
    "kohya": parse_kohya,
    "sd_scripts": parse_sd_scripts,
    "comfyui": parse_comfyui,
}


def find_adapter_file(path_or_dir: str | os.PathLike, weight_name: str | None = None, prefer: str = "native") -> Path:
    """The adapter file ``path_or_dir`` names: the file itself, or in a folder ``weight_name``, else the
    ``prefer``red layout's file, else any other of ours, else the folder's only .safetensors file."""
    path = Path(path_or_dir)
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if weight_name is not None:
        file = path / weight_name
        if not file.is_file():
            raise FileNotFoundError(f"{file}: no such file (weight_name={weight_name!r})")
        return file
    order = [prefer] + [f for f in LAYOUTS if f != prefer]
    for fmt in order:
        if (path / LAYOUT_WEIGHT_NAMES[fmt]).is_file():
            return path / LAYOUT_WEIGHT_NAMES[fmt]
    candidates = sorted(p.name for p in path.glob("*.safetensors"))
    if len(candidates) == 1:
        return path / candidates[0]
    raise FileNotFoundError(
        f"{path}: no adapter file found (looked for {', '.join(WEIGHT_NAMES.values())}; "
        f"found {', '.join(candidates) or 'no .safetensors files'}); pass weight_name"
    )


def read_adapter_file(path_or_dir: str | os.PathLike, weight_name: str | None = None) -> AdapterState:
    """Read, validate and parse an adapter file of any layout we read, or a training checkpoint
    (a ``checkpoint-N`` folder or one of its ``adapter_<component>.safetensors``)."""
    if weight_name is None and training_checkpoint_folder(path_or_dir) is not None:
        return read_training_checkpoint(path_or_dir)
    path = find_adapter_file(path_or_dir, weight_name)
    tensors, metadata = load_safetensors(path)
    return parse_adapter_state_dict(tensors, metadata, path)


def parse_adapter_state_dict(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path) -> AdapterState:
    """Validate ``tensors``, detect their layout and parse them with that layout's reader."""
    validate_adapter_state_dict(tensors, path)
    fmt = detect_format(tensors, metadata, path)
    state = _PARSERS[fmt](tensors, metadata or {}, path)
    state.source_format, state.source_path = fmt, Path(path)
    return state


def layout_state_dict(state: AdapterState, layout: str, title: str | None = None, denoiser_config: dict | None = None):
    """Tensors and metadata of ``state`` in ``layout`` (one of :data:`LAYOUTS`); ``denoiser_config``, the
    transformer's config, places SD3/Flux modules in sd-scripts' layout (inferred from the adapter if None)."""
    if layout == "native":
        return native_state_dict(state)
    if layout == "diffusers":
        return diffusers_file_state_dict(state, title)
    if layout == "onetrainer":
        return kohya_state_dict(state, title)
    if layout == "kohya":
        return kohya_file_state_dict(state, title, denoiser_config)
    raise ValueError(f"unknown adapter layout {layout!r}; expected one of {', '.join(LAYOUTS)}")


def kohya_file_state_dict(state: AdapterState, title: str | None = None, denoiser_config: dict | None = None):
    """The kohya file (``Family.kohya_file_layout``): kohya keys (SD1/SD2), kohya keys with the UNet under
    its SGM names (SDXL, :mod:`.sgm_names`) or sd-scripts' original names (SD3/Flux). An adapter on a
    module that layout has no name for (Flux's final layer) is written with diffusers module names
    instead (OneTrainer's layout for SD3/Flux), with a warning that says so."""
    layout = "kohya" if state.family is None else get_family(state.family).kohya_file_layout
    if layout == "kohya":
        return kohya_state_dict(state, title)
    if layout == "kohya_sgm":
        try:
            renamed = with_sgm_unet_names(state, get_family(state.family).denoiser, denoiser_config)
        except NoSgmName as err:
            logger.warning("%s has diffusers' UNet names (lora_unet_down_blocks_...): %s", KOHYA_WEIGHT_NAME, err)
            return kohya_state_dict(state, title)
        return kohya_state_dict(renamed, title)
    try:
        return sd_scripts_state_dict(state, title, denoiser_config)
    except NoSdScriptsName as err:
        logger.warning("%s is in OneTrainer's layout (lora_transformer_ keys): %s", KOHYA_WEIGHT_NAME, err)
        return kohya_state_dict(state, title)


def write_adapter_files(
    state: AdapterState,
    directory: str | os.PathLike,
    layouts: tuple[str, ...] = FORMATS,
    title: str | None = None,
    overwrite: bool = True,
    denoiser_config: dict | None = None,
) -> dict[str, Path]:
    """Write ``state`` in each of ``layouts`` under its standard name in ``directory``; layout -> path.

    Every state dict is built (and checked) before the first byte is written; each file is written
    atomically (a temporary name, then a rename).
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise FileExistsError(f"{directory} exists and is not a folder")
    title = title or directory.resolve().name
    built = {layout: layout_state_dict(state, layout, title, denoiser_config) for layout in layouts}
    targets = {layout: directory / LAYOUT_WEIGHT_NAMES[layout] for layout in layouts}
    if not overwrite:
        existing = [str(p) for p in targets.values() if p.exists()]
        if existing:
            raise FileExistsError(f"{existing[0]} already exists; pass --overwrite to replace it")
    for layout, (tensors, metadata) in built.items():
        save_safetensors(tensors, targets[layout], metadata)
    return targets
