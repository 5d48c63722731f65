"""The native MoSLoRA layout: A, M and B unfolded, and a versioned JSON header.

    <component>.<module>.lora_A.weight (r x in), .lora_mixer.weight (r x r), .lora_B.weight (out x r)
    metadata "moslora": {"format_version", "library", "library_version", "family", "base_model",
                         "adapter_name", "components": {component: CONFIG_FIELDS}}

The only layout that keeps the mixer, so the only one training resumes from exactly.
"""

from __future__ import annotations

import json
import math

import torch

from ..families import ADAPTER_COMPONENTS
from ..version import __version__
from .checks import check_component_config, check_ranks_match_config, checked_family, is_int, json_metadata
from .names import FACTOR_SUFFIXES, NATIVE_HEADER_KEY, group_modules, split_component
from .state import CONFIG_FIELDS, AdapterState, ComponentAdapter, LayerFactors, config_scale

FORMAT_VERSION = 1


def native_state_dict(state: AdapterState) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of the native layout (A, M, B unfolded; the versioned JSON header)."""
    state.require_resolved("native")
    suffix = FACTOR_SUFFIXES["native"]
    tensors = {}
    for component, path, layer in state.layer_items():
        expected = config_scale(state.components[component].config, path)
        if not math.isclose(layer.scale, expected, rel_tol=1e-6):
            raise ValueError(
                f"{component}.{path}: scale {layer.scale} differs from its config's {expected}; "
                "normalise the state first"
            )
        tensors[f"{component}.{path}{suffix['A']}"] = layer.lora_A
        if layer.mixer is not None:
            tensors[f"{component}.{path}{suffix['M']}"] = layer.mixer
        tensors[f"{component}.{path}{suffix['B']}"] = layer.lora_B
    header = native_header(state)
    return tensors, {"format": "pt", NATIVE_HEADER_KEY: json.dumps(header, sort_keys=True)}


def native_header(state: AdapterState) -> dict:
    """The versioned JSON header of ``state``."""
    return {
        "format_version": FORMAT_VERSION,
        "library": "moslora-diffusion",
        "library_version": __version__,
        "family": state.family,
        "base_model": None if state.base_model is None else str(state.base_model),
        "adapter_name": state.adapter_name,
        "components": {c: a.config for c, a in state.components.items()},
    }


def parse_native(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path) -> AdapterState:
    """The AdapterState of a native file's tensors and header, every field checked."""
    if NATIVE_HEADER_KEY not in metadata:
        first = next(k for k in sorted(tensors) if k.endswith(FACTOR_SUFFIXES["native"]["M"]))
        raise ValueError(
            f"{path}: {first!r} is a mixer, but the file has no {NATIVE_HEADER_KEY!r} header "
            "(not written by moslora-diffusion, or its metadata was stripped)"
        )
    header = json_metadata(metadata, NATIVE_HEADER_KEY, path)
    version = header.get("format_version")
    if not is_int(version) or version < 1 or version > FORMAT_VERSION:
        raise ValueError(
            f"{path}: native format version {version!r} is not supported "
            f"(this library reads up to {FORMAT_VERSION}); upgrade moslora-diffusion"
        )
    configs = header.get("components") or {}
    if not isinstance(configs, dict):
        raise ValueError(
            f"{path}: the {NATIVE_HEADER_KEY!r} header's components should be a JSON object, "
            f"got {type(configs).__name__}"
        )
    for name in configs:
        if name not in ADAPTER_COMPONENTS:
            raise ValueError(
                f"{path}: the {NATIVE_HEADER_KEY!r} header names component {name!r}; "
                f"expected one of {', '.join(ADAPTER_COMPONENTS)}"
            )
    # Only the fields this library knows (a later version may add some); PEFT configs get built from them.
    components = {}
    for name, config in configs.items():
        checked = check_component_config(config, name, path)
        components[name] = ComponentAdapter({k: v for k, v in checked.items() if k in CONFIG_FIELDS}, {})
    for field_name in ("base_model", "adapter_name"):
        if header.get(field_name) is not None and not isinstance(header[field_name], str):
            raise ValueError(
                f"{path}: the {NATIVE_HEADER_KEY!r} header's {field_name} should be a string, "
                f"got {header[field_name]!r}"
            )
    _add_layers(components, tensors, path)
    components = {name: c for name, c in components.items() if c.layers}
    for adapter in components.values():
        check_ranks_match_config(adapter.layers, adapter.config, path)
    family = checked_family(header.get("family"), path)
    return AdapterState(components, family, header.get("base_model"), header.get("adapter_name") or "default")


def _add_layers(components: dict[str, ComponentAdapter], tensors: dict[str, torch.Tensor], path) -> None:
    for module, factors in group_modules(tensors, "native", path).items():
        key_a = factors["A"][0]
        component, module_path = split_component(module, key_a, path, components)
        config = components[component].config
        mixer = factors.get("M", (None, None))[1]
        if config.get("use_moslora") and mixer is None:
            raise ValueError(
                f"{path}: {key_a!r}: component {component!r} is MoSLoRA but this module has no lora_mixer weight"
            )
        if not config.get("use_moslora") and mixer is not None:
            raise ValueError(
                f"{path}: {factors['M'][0]!r}: component {component!r} is not MoSLoRA (use_moslora false), "
                "yet this module has a mixer"
            )
        scale = config_scale(config, module_path)
        components[component].layers[module_path] = LayerFactors(factors["A"][1], factors["B"][1], mixer, scale, key_a)
