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


# PEFT's own save of a model it wraps: "base_model.model.<module path>", the component left unnamed.
PEFT_MODEL_PREFIX = "base_model.model."
# A UNet2DConditionModel's top-level modules; any other denoiser of ours is a "transformer".
_UNET_TOP_MODULES = (
    "down_blocks.",
    "mid_block.",
    "up_blocks.",
    "conv_in",
    "conv_out",
    "time_embedding.",
    "add_embedding.",
)


def with_component_named(module: str, key: str, path) -> str:
    """``module`` of a PEFT model's own save (``base_model.model.<path>``) under its denoiser's component
    name (unet or transformer: a text encoder's cannot be told apart); other modules unchanged."""
    if not module.startswith(PEFT_MODEL_PREFIX):
        return module
    rest = module.removeprefix(PEFT_MODEL_PREFIX)
    if rest.startswith(("text_model.", "encoder.", "shared.")):
        raise ValueError(
            f"{path}: {key!r} is a text encoder's module under PEFT's {PEFT_MODEL_PREFIX!r}, which does not say "
            "which text encoder; rename its keys to text_encoder.<module> (or text_encoder_2, ...)"
        )
    return ("unet." if rest.startswith(_UNET_TOP_MODULES) else "transformer.") + rest


def per_module_alphas(modules: dict[str, dict], path) -> dict[str, float]:
    """module -> alpha of the modules that carry a ``.alpha`` tensor: all of them, or none.

    A module with no alpha beside others that have one is refused: diffusers then gives it the most
    common alpha, ComfyUI alpha = r, so no one reading is right.
    """
    alphas = {m: float(f["alpha"][1].item()) for m, f in modules.items() if "alpha" in f}
    if alphas and len(alphas) != len(modules):
        first = next(f["A"][0] for m, f in sorted(modules.items()) if m not in alphas)
        raise ValueError(
            f"{path}: {first!r} has no .alpha beside it, but {len(alphas)} other modules have one; clients "
            "disagree on the scale of such a module (diffusers: the most common alpha, ComfyUI: alpha = r)"
        )
    return alphas


def parse_diffusers(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path) -> AdapterState:
    """The AdapterState of a folded file; without metadata, alpha = r (diffusers' own convention).
    T5 under ComfyUI's key (our SD3/Flux diffusers file) is read with scale 1, as ComfyUI reads it.

    Per-module ``<module>.alpha`` tensors (other trainers' PEFT-keyed files) give each module its own
    scale alpha / r, as diffusers and ComfyUI read them; a file that also has metadata must agree with them.
    """
    family = checked_family(metadata.get("moslora.family"), path)
    tensors = t5_keys_from_comfyui(tensors, family, path)
    lora_metadata = {}
    if DIFFUSERS_METADATA_KEY in metadata:
        lora_metadata = json_metadata(metadata, DIFFUSERS_METADATA_KEY, path)
    modules = group_modules(tensors, "diffusers", path)
    alphas = per_module_alphas(modules, path)
    layers_by_component: dict[str, dict[str, LayerFactors]] = {}
    for module, factors in modules.items():
        key_a = factors["A"][0]
        named = with_component_named(module, key_a, path)
        component, module_path = split_component(named, key_a, path, ADAPTER_COMPONENTS)
        # Without alphas: scale 1 until the config is known (diffusers' convention without metadata: alpha = r).
        rank = factors["A"][1].shape[0]
        scale = alphas[module] / rank if alphas else 1.0
        layer = LayerFactors(factors["A"][1], factors["B"][1], None, scale, key_a)
        if module_path in layers_by_component.get(component, {}):
            raise ValueError(f"{path}: {key_a!r} names the same module as another key ({component}.{module_path})")
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
        elif not alphas:
            config["lora_alpha"] = config["r"]
            config["alpha_pattern"] = {
                without_clip_root(p): layer.rank for p, layer in layers.items() if layer.rank != config["r"]
            }
        for module_path, layer in layers.items():
            scale = config_scale(config, module_path)
            if alphas and fields and not math.isclose(scale, layer.scale, rel_tol=1e-6):
                raise ValueError(
                    f"{path}: {layer.source_key!r}: its .alpha gives scale {layer.scale:g}, the file's metadata "
                    f"{DIFFUSERS_METADATA_KEY!r} {scale:g}; clients read one or the other"
                )
            if not alphas:
                layer.scale = scale
        components[component] = ComponentAdapter(config, layers)
    return AdapterState(components, family, metadata.get("moslora.base_model"))
