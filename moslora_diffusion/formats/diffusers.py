"""The folded diffusers (PEFT) layout: what stock ``pipe.load_lora_weights`` reads from memory.

The file ``pytorch_lora_weights.safetensors`` is this layout only for SD3 and Flux, with the scale folded
and T5 renamed for ComfyUI (:mod:`.diffusers_file`); this module reads that form and any PEFT-keyed file
(diffusers' own, ai-toolkit's ``transformer.<module>.lora_A.weight``).

    <component>.<module>.lora_A.weight = A, .lora_B.weight = B M   (the mixer folded: exact)
    metadata "lora_adapter_metadata": plain LoraConfig fields per component ("unet.r", ...), as diffusers
    writes it, plus the ``moslora.*`` provenance fields
"""

from __future__ import annotations

import json
import math

import torch
from peft import LoraConfig

from ..clip_names import without_clip_root
from ..config import MOSLORA_ONLY_FIELDS
from ..families import ADAPTER_COMPONENTS, get_family
from .checks import check_component_config, check_ranks_match_config, checked_family, json_metadata, require_finite
from .names import (
    COMFYUI_T5_PREFIX,
    DIFFUSERS_METADATA_KEY,
    FACTOR_SUFFIXES,
    group_modules,
    provenance_metadata,
    split_component,
)
from .state import CONFIG_FIELDS, AdapterState, ComponentAdapter, LayerFactors, config_scale, infer_component_config


def plain_lora_config_kwargs(config: dict) -> dict:
    """The folded file's lora_adapter_metadata for one component: plain LoraConfig fields only.

    Stock load_lora_weights builds ``LoraConfig(**metadata)`` and fails on any MoSLoRA field.
    """
    kwargs = {k: v for k, v in config.items() if k in CONFIG_FIELDS and k not in MOSLORA_ONLY_FIELDS}
    LoraConfig(**kwargs)  # fail here, not in the user's loader
    return kwargs


def folded_lora_b(state: AdapterState, component: str, path: str, layer: LayerFactors) -> torch.Tensor:
    """B' = B M, times any ratio between this layer's scale and its component config's (one alpha fits all)."""
    folded = layer.folded_lora_b()
    ratio = layer.scale / config_scale(state.components[component].config, path)
    return folded if math.isclose(ratio, 1.0, rel_tol=1e-9) else (folded.double() * ratio).to(folded.dtype)


def diffusers_state_dict(state: AdapterState) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata that stock ``pipe.load_lora_weights`` loads (mixer folded into lora_B)."""
    state.require_resolved("diffusers")
    suffix = FACTOR_SUFFIXES["diffusers"]
    tensors, lora_metadata = {}, {}
    for component, adapter in state.components.items():
        lora_metadata.update({f"{component}.{k}": v for k, v in plain_lora_config_kwargs(adapter.config).items()})
    for component, path, layer in state.layer_items():
        tensors[f"{component}.{path}{suffix['A']}"] = layer.lora_A
        tensors[f"{component}.{path}{suffix['B']}"] = folded_lora_b(state, component, path, layer)
    require_finite(tensors, state.source_path)
    metadata = {"format": "pt", DIFFUSERS_METADATA_KEY: json.dumps(lora_metadata, indent=2, sort_keys=True)}
    metadata.update(provenance_metadata(state.family, state.base_model, state.has_mixer))
    return tensors, metadata


def t5_keys_from_comfyui(tensors: dict[str, torch.Tensor], family: str | None, path) -> dict[str, torch.Tensor]:
    """``text_encoders.t5xxl.transformer.<path>`` keys (our Flux/SD3 diffusers file's T5) under the
    family's T5 component; other keys unchanged."""
    if not any(k.startswith(COMFYUI_T5_PREFIX) for k in tensors):
        return tensors
    t5 = get_family(family).t5_text_encoder if family else None
    if t5 is None:
        first = min(k for k in tensors if k.startswith(COMFYUI_T5_PREFIX))
        raise ValueError(
            f"{path}: {first!r} is a T5 key, but the file names no family with T5 (metadata moslora.family: "
            f"{family!r}), so its component (Flux: text_encoder_2, SD3: text_encoder_3) is unknown"
        )
    renamed = {k: t5 + "." + k.removeprefix(COMFYUI_T5_PREFIX) for k in tensors if k.startswith(COMFYUI_T5_PREFIX)}
    return {renamed.get(k, k): v for k, v in tensors.items()}


def parse_diffusers(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path) -> AdapterState:
    """The AdapterState of a folded file; without metadata, alpha = r (diffusers' own convention).
    T5 under ComfyUI's key (our SD3/Flux diffusers file) is read with scale 1, as ComfyUI reads it."""
    family = checked_family(metadata.get("moslora.family"), path)
    tensors = t5_keys_from_comfyui(tensors, family, path)
    lora_metadata = {}
    if DIFFUSERS_METADATA_KEY in metadata:
        lora_metadata = json_metadata(metadata, DIFFUSERS_METADATA_KEY, path)
    layers_by_component: dict[str, dict[str, LayerFactors]] = {}
    for module, factors in group_modules(tensors, "diffusers", path).items():
        key_a = factors["A"][0]
        component, module_path = split_component(module, key_a, path, ADAPTER_COMPONENTS)
        # Scale 1 until the config is known (diffusers' convention when a file has no metadata: alpha = r).
        layer = LayerFactors(factors["A"][1], factors["B"][1], None, 1.0, key_a)
        layers_by_component.setdefault(component, {})[module_path] = layer
    components = {}
    for component, layers in layers_by_component.items():
        prefix = component + "."
        fields = {k.removeprefix(prefix): v for k, v in lora_metadata.items() if k.startswith(prefix)}
        config = infer_component_config(layers)
        if fields:
            missing = [k for k in ("r", "lora_alpha") if k not in fields]
            if missing:
                # diffusers would fill in LoraConfig's defaults (r = alpha = 8): refuse rather than guess.
                raise ValueError(
                    f"{path}: metadata {DIFFUSERS_METADATA_KEY!r} sets {component} fields "
                    f"but not {' or '.join(missing)}"
                )
            config.update({k: fields[k] for k in CONFIG_FIELDS if k in fields})
            config["use_moslora"], config["mixer_init"], config["train_mixer"] = False, None, None
            check_component_config(config, component, path)
            check_ranks_match_config(layers, config, path)
        else:
            config["lora_alpha"] = config["r"]
            config["alpha_pattern"] = {
                without_clip_root(p): layer.rank for p, layer in layers.items() if layer.rank != config["r"]
            }
        for module_path, layer in layers.items():
            layer.scale = config_scale(config, module_path)
        components[component] = ComponentAdapter(config, layers)
    return AdapterState(components, family, metadata.get("moslora.base_model"))
