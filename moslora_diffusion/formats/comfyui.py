"""ComfyUI's dotted keys: ``diffusion_model.<the original model's module>``, as ComfyUI's own LoRA saver and
some SDXL / Flux trainers write them.

    diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.lora_up.weight   (SGM / LDM UNet: SD1.x, SDXL)
    diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight                        (BFL Flux; SD3's joint_blocks)
    text_encoders.clip_l.transformer.text_model.encoder.layers.0.mlp.fc1.lora_up.weight  (clip_g, t5xxl alike)

Each module has kohya factors (lora_down, lora_up, alpha) or PEFT ones (lora_A, lora_B, optional alpha);
a missing alpha means alpha = r (scale 1), as ComfyUI reads it. The module name is the one our kohya
readers already know under ``lora_unet_`` with dots as underscores: UNet names are matched against the
model's SGM table (:mod:`.sgm_names`) when a pipeline is at hand, Flux / SD3 names are split into
diffusers' per-projection modules by :mod:`.sd_scripts`; text encoders take sd-scripts' prefixes (CLIP-L
lora_te1, CLIP-G lora_te2, T5 lora_te3). So this reader renames the keys and hands them on; every layer
keeps the file's own key for messages.
"""

from __future__ import annotations

import torch

from .kohya import parse_kohya
from .names import COMFYUI_DENOISER_PREFIX, FACTOR_SUFFIXES, split_factor
from .sd_scripts import denoiser_config_from_file, parse_sd_scripts, sd_scripts_family
from .state import AdapterState

# The kohya stem prefix of a denoiser in the original model's names (sd-scripts' SD1/SDXL and Flux/SD3 files).
ORIGINAL_NAMES_PREFIX = "lora_unet"
# ComfyUI's text-encoder keys ("text_encoders." + its CLIP / T5 state-dict name) -> the kohya prefix that names the
# same encoder in sd-scripts' files (CLIP-L / CLIP-H lora_te1, CLIP-G lora_te2, T5 lora_te3).
COMFYUI_TEXT_ENCODER_PREFIXES = {
    "text_encoders.clip_l.transformer.": "lora_te1",
    "text_encoders.clip_h.transformer.": "lora_te1",
    "text_encoders.clip_g.transformer.": "lora_te2",
    "text_encoders.t5xxl.transformer.": "lora_te3",
}
# The top-level modules of Stability's original (SGM / LDM) UNet.
SGM_UNET_TOP = ("input_blocks", "middle_block", "output_blocks", "time_embed", "label_emb", "out")


def kohya_keys_of_comfyui(tensors: dict[str, torch.Tensor], path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors under kohya keys ``<prefix>_<module, dots as _>.<kohya suffix>``, kohya key -> the file's key):
    the denoiser under ``lora_unet_``, text encoders under :data:`COMFYUI_TEXT_ENCODER_PREFIXES`.

    One ValueError naming the first key that is not ``diffusion_model.<module>`` or a known
    ``text_encoders.<encoder>.transformer.<module>`` with a LoRA factor suffix.
    """
    kohya_suffix = FACTOR_SUFFIXES["kohya"]
    prefixes = {COMFYUI_DENOISER_PREFIX: ORIGINAL_NAMES_PREFIX, **COMFYUI_TEXT_ENCODER_PREFIXES}
    renamed, original = {}, {}
    for key in sorted(tensors):
        factor, module, _ = split_factor(key)
        comfyui_prefix = next((p for p in prefixes if key.startswith(p)), None)
        if comfyui_prefix is None or factor not in kohya_suffix:
            raise ValueError(
                f"{path}: {key!r} is not a ComfyUI LoRA key (diffusion_model.<module> or "
                "text_encoders.{clip_l,clip_g,clip_h,t5xxl}.transformer.<module>, then .lora_up.weight / "
                ".lora_down.weight / .lora_A.weight / .lora_B.weight / .alpha)"
            )
        stem = f"{prefixes[comfyui_prefix]}_{module.removeprefix(comfyui_prefix).replace('.', '_')}"
        new_key = stem + kohya_suffix[factor]
        if new_key in renamed:
            raise ValueError(f"{path}: {key!r} and {original[new_key]!r} are the same factor of one module")
        renamed[new_key], original[new_key] = tensors[key], key
    return renamed, original


def _check_original_names(renamed: dict[str, torch.Tensor], original: dict[str, str], path) -> None:
    """One ValueError naming the first file key whose module is in no table we read: the Flux / SD3 module
    table of the family its block names show, else Stability's UNet (whose names the model checks)."""
    family = sd_scripts_family(renamed)
    if family is not None:
        table = family.sd_scripts_modules(denoiser_config_from_file(renamed, family))
        known = {f"{ORIGINAL_NAMES_PREFIX}_{m.name.replace('.', '_')}" for m in table}
        what = f"{family.name} module ({family.name} files are in Black Forest Labs' / Stability's module names)"
    else:
        known = None
        what = "module of Stability's UNet (input_blocks, middle_block, output_blocks), Flux or SD3"
    for key in sorted(renamed, key=original.get):
        stem = split_factor(key)[1]
        if not stem.startswith(ORIGINAL_NAMES_PREFIX + "_"):
            continue  # a text encoder's: matched against the model, which names the file's key if it has no such module
        if known is not None and stem in known:
            continue
        if known is None and stem.removeprefix(ORIGINAL_NAMES_PREFIX + "_").startswith(SGM_UNET_TOP):
            continue
        raise ValueError(f"{path}: {original[key]!r} names no {what}")


def parse_comfyui(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path) -> AdapterState:
    """The AdapterState of a ComfyUI-keyed file: Flux / SD3 modules split into diffusers' (resolved),
    UNet modules under their SGM stems (``resolved`` False until matched against a model)."""
    renamed, original = kohya_keys_of_comfyui(tensors, path)
    _check_original_names(renamed, original, path)
    parse = parse_sd_scripts if sd_scripts_family(renamed) is not None else parse_kohya
    state = parse(renamed, metadata, path)
    for _, _, layer in state.layer_items():
        layer.source_key = original.get(layer.source_key, layer.source_key)
    return state
