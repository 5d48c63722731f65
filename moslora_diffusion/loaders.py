"""Pipeline-level save and load of MoSLoRA adapters, named and shaped like diffusers' LoRA API.

save_moslora_weights(pipe, "out/")          # native + folded diffusers + kohya files, atomically
pipe.load_lora_weights("out/")              # stock diffusers: the folded file, no code of ours
load_moslora_weights(pipe, "out/")          # any layout we read, folded, through diffusers' loader
load_moslora_weights(pipe, "out/", trainable=True)   # MoSLoRA layers with a trainable mixer
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import tempfile
from dataclasses import replace
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from torch import nn

from .clip_names import with_clip_root, without_clip_root
from .config import MOSLORA_ONLY_FIELDS, MoSLoRAConfig
from .families import Family, family_of_model_dir, family_of_pipeline
from .fileio import save_safetensors
from .formats.diffusers import diffusers_state_dict
from .formats.files import DIFFUSERS_WEIGHT_NAME, read_adapter_file, write_adapter_files
from .formats.names import FACTOR_SUFFIXES
from .formats.sgm_names import sgm_module_names
from .formats.state import (
    AdapterState,
    ComponentAdapter,
    LayerFactors,
    as_moslora_state,
    component_config_from_peft,
    infer_component_config,
)
from .inject import add_moslora

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------
# Module names: checkpoint names in files, a live model's own names in memory


def _is_flattened_clip(model: nn.Module) -> bool:
    return type(model).__name__.startswith("CLIPText") and not hasattr(model, "text_model")


def canonical_module_path(model: nn.Module, path: str) -> str:
    """The name of ``model``'s module ``path`` in files (CLIP keeps its "text_model." root)."""
    return with_clip_root(path) if _is_flattened_clip(model) else path


def model_module_path(model: nn.Module, path: str) -> str:
    """Inverse of :func:`canonical_module_path`: the name ``model`` itself uses."""
    return without_clip_root(path) if _is_flattened_clip(model) else path


def resolve_kohya_names(state: AdapterState, models: dict[str, nn.Module]) -> AdapterState:
    """Match kohya stems (dots lost) to the module paths of ``models`` (component -> model)."""
    components = {}
    for component, adapter in state.components.items():
        if adapter.resolved:
            components[component] = adapter
            continue
        model = models.get(component)
        if model is None:
            first = min(layer.source_key for layer in adapter.layers.values())
            raise ValueError(f"{state.source_path}: {first!r} adapts {component}, which this pipeline does not have")
        by_stem = _module_stems(model)
        layers = {}
        for stem in sorted(adapter.layers, key=lambda s: adapter.layers[s].source_key):
            layer = adapter.layers[stem]
            if stem not in by_stem:
                raise ValueError(
                    f"{state.source_path}: {layer.source_key!r} names no module of this pipeline's {component}; "
                    "the file was made for another model"
                )
            layers[by_stem[stem]] = layer
        components[component] = ComponentAdapter(infer_component_config(layers), layers, resolved=True)
    return replace(state, components=components)


def _module_stems(model: nn.Module) -> dict[str, str]:
    """kohya stem (dots as _) -> module path in files, for every module of ``model``; a UNet's modules
    also under their original SGM names (SDXL files of sd-scripts: input_blocks_4_1_...)."""
    paths = [canonical_module_path(model, name) for name, _ in model.named_modules()]
    stems = {path.replace(".", "_"): path for path in paths}
    if type(model).__name__ == "UNet2DConditionModel":
        for sgm, path in sgm_module_names(model.config, paths).items():
            stems.setdefault(sgm.replace(".", "_"), path)
    return stems


# ------------------------------------------------------------------------------------------------
# Saving


def save_moslora_weights(
    pipe,
    save_directory: str | os.PathLike,
    adapter_name: str = "default",
    *,
    base_model: str | None = None,
    title: str | None = None,
) -> dict[str, Path]:
    """Write ``adapter_name`` of every adapted component of ``pipe`` to ``save_directory`` as
    ``moslora_weights.safetensors`` (native), ``pytorch_lora_weights.safetensors`` (folded, for stock
    ``pipe.load_lora_weights(save_directory)`` and ComfyUI: kohya keys for SD1/SD2/SDXL, PEFT keys with the
    scale folded for SD3/Flux) and ``pytorch_lora_weights_kohya.safetensors`` (folded, for A1111, Forge,
    ComfyUI and sd-scripts: kohya keys, Flux/SD3 in sd-scripts' names). Returns layout -> path.
    """
    state = adapter_state_from_pipeline(pipe, adapter_name, base_model=base_model)
    family = family_of_pipeline(pipe)
    ignored = [c for c in state.components if c not in _stock_loadable_components(pipe)]
    if ignored:
        logger.warning(
            "Stock diffusers' %s.load_lora_weights ignores LoRA on %s; load_moslora_weights and ComfyUI load it",
            type(pipe).__name__, ", ".join(ignored),
        )  # fmt: skip
    # Places SD3/Flux modules in sd-scripts' layout; inferred from the adapter where the model has none.
    config = getattr(getattr(pipe, family.denoiser, None), "config", None)
    denoiser_config = dict(config) if config is not None else None
    paths = write_adapter_files(state, save_directory, title=title, denoiser_config=denoiser_config)
    logger.info(
        "Saved %s adapter %r (%s) to %s",
        family.name,
        adapter_name,
        ", ".join(f"{c}: {len(a.layers)} modules" for c, a in state.components.items()),
        save_directory,
    )  # fmt: skip
    return paths


def adapter_state_from_pipeline(pipe, adapter_name: str = "default", base_model: str | None = None) -> AdapterState:
    """The live adapter ``adapter_name`` of ``pipe`` (all its adapted components) as an AdapterState."""
    family = family_of_pipeline(pipe)
    components = {}
    present = set()
    for name in family.adapter_components():
        model = getattr(pipe, name, None)
        configs = getattr(model, "peft_config", None) or {}
        present.update(configs)
        if adapter_name in configs:
            components[name] = component_adapter_from_model(model, adapter_name, name)
    if not components:
        raise ValueError(
            f"{type(pipe).__name__} has no adapter named {adapter_name!r} "
            f"(adapters present: {', '.join(sorted(present)) or 'none'})"
        )
    base_model = base_model or getattr(pipe, "name_or_path", None) or None
    return AdapterState(components, family.name, base_model, adapter_name, source_format="live")


def component_adapter_from_model(
    model: nn.Module, adapter_name: str, component: str = "model", state_dict: dict[str, torch.Tensor] | None = None
) -> ComponentAdapter:
    """One component's adapter: PEFT's own state dict of it, plus each layer's scale.

    ``state_dict``: the model's tensors as gathered elsewhere (a sharded model's, whole; see
    :mod:`moslora_diffusion.training.sharding`) instead of the live ones; ``model`` then gives names and settings only.
    """
    config = model.peft_config[adapter_name]
    tensors = get_peft_model_state_dict(model, state_dict=state_dict, adapter_name=adapter_name)
    suffixes = FACTOR_SUFFIXES["native"]
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        for factor, suffix in suffixes.items():
            if key.endswith(suffix):
                modules.setdefault(key[: -len(suffix)], {})[factor] = tensor.detach()
                break
        else:
            # DoRA magnitudes, LoRA biases, modules_to_save, trainable tokens: no plain-LoRA file holds them.
            raise ValueError(
                f"{component} adapter {adapter_name!r} has {key!r}, which LoRA files cannot hold; "
                "only A, M and B are saved"
            )
    layers = {}
    for path, factors in sorted(modules.items()):
        module = model.get_submodule(path)
        r, alpha = module.r[adapter_name], module.lora_alpha[adapter_name]
        scale = alpha / (r**0.5 if config.use_rslora else r)
        layers[canonical_module_path(model, path)] = LayerFactors(
            factors["A"], factors["B"], factors.get("M"), scale, f"{component}.{path}"
        )
    return ComponentAdapter(component_config_from_peft(config), layers)


# ------------------------------------------------------------------------------------------------
# Loading


def load_moslora_weights(
    pipe,
    path_or_dir: str | os.PathLike,
    adapter_name: str | None = None,
    weight_name: str | None = None,
    trainable: bool = False,
) -> str:
    """Load an adapter file into ``pipe``; returns the layout found (native, diffusers, kohya, sd_scripts).

    Reads ours and other trainers' files in those layouts: PEFT keys (ai-toolkit), kohya keys with
    diffusers or SGM (sd-scripts SDXL) block names, OneTrainer's lora_transformer_, sd-scripts' Flux/SD3.

    By default the mixer is folded (B' = B M, exact) and the adapter goes through diffusers' own
    ``load_lora_weights``, so it composes with other LoRAs under ``set_adapters``. ``trainable=True``
    rebuilds MoSLoRA layers with a trainable mixer instead (from a native file exactly; from a folded or
    kohya file with M = I), for resuming and further training. A folder is searched for the native
    file first, then the folded and kohya files; ``weight_name`` picks one. A training ``checkpoint-N``
    folder loads as the native adapter it holds.
    """
    state = read_adapter_file(path_or_dir, weight_name)
    path = state.source_path
    family = family_of_pipeline(pipe)
    models = {
        name: getattr(pipe, name) for name in family.adapter_components() if getattr(pipe, name, None) is not None
    }
    state = fit_adapter_to_models(state, models, family)
    logger.info("%s: found a %s adapter file (%s)", path, state.source_format, ", ".join(state.components))
    if trainable:
        _load_trainable(state, models, adapter_name or "default")
    else:
        _load_folded(pipe, state, models, adapter_name)
    return state.source_format


def fit_adapter_to_models(state: AdapterState, models: dict[str, nn.Module], family: type[Family]) -> AdapterState:
    """Check ``state`` against a pipeline's components (family, module names, shapes); resolve kohya names.

    Raises one ValueError naming the file and the first offending key.
    """
    where = state.source_path
    if state.family is not None and state.family != family.name:
        raise ValueError(f"{where}: this adapter was made for {state.family}, but the pipeline is {family.name}")
    state = resolve_kohya_names(state, models)
    for component, path, layer in sorted(state.layer_items(), key=lambda item: item[2].source_key):
        model = models.get(component)
        if model is None:
            raise ValueError(f"{where}: {layer.source_key!r} adapts {component}, which this pipeline does not have")
        try:
            module = model.get_submodule(model_module_path(model, path))
        except AttributeError:
            raise ValueError(
                f"{where}: {layer.source_key!r} names no module of this pipeline's {component}; "
                "the file was made for another model"
            ) from None
        base = module.get_base_layer() if isinstance(module, LoraLayer) else module
        expected = _expected_factor_shapes(base, layer.rank)
        if expected is None:
            raise ValueError(
                f"{where}: {layer.source_key!r} adapts a {type(base).__name__}; "
                "LoRA files adapt Linear and Conv2d layers"
            )
        if (tuple(layer.lora_A.shape), tuple(layer.lora_B.shape)) != expected:
            raise ValueError(
                f"{where}: {layer.source_key!r} has A {tuple(layer.lora_A.shape)} "
                f"and B {tuple(layer.lora_B.shape)}, but "
                f"{component}.{path} needs A {expected[0]} and B {expected[1]}: the file does not fit this pipeline"
            )
    return state


def _expected_factor_shapes(base: nn.Module, r: int):
    if isinstance(base, nn.Linear):
        return (r, base.in_features), (base.out_features, r)
    if isinstance(base, nn.Conv2d):
        return (r, base.in_channels, *base.kernel_size), (base.out_channels, r, 1, 1)
    return None


def _stock_loadable_components(pipe) -> tuple[str, ...]:
    return tuple(getattr(type(pipe), "_lora_loadable_modules", ()))


def _load_folded(pipe, state: AdapterState, models: dict[str, nn.Module], adapter_name: str | None) -> None:
    from diffusers.utils.peft_utils import get_adapter_name

    family = family_of_pipeline(pipe)
    # One name for every component (diffusers would pick one per component).
    adapter_name = adapter_name or get_adapter_name(models[family.denoiser])
    # PEFT needs target_modules (None makes it look up a transformers model_type and fail) and warns when
    # they differ from the file's modules: give it exactly the file's.
    state = replace(state, components={c: _with_exact_targets(a) for c, a in state.components.items()})
    stock = [c for c in state.components if c in _stock_loadable_components(pipe)]
    extra = [c for c in state.components if c not in stock]
    if stock:
        part = AdapterState({c: state.components[c] for c in stock}, state.family, state.base_model)
        tensors, metadata = diffusers_state_dict(part)
        with tempfile.TemporaryDirectory(prefix="moslora-") as tmp:
            save_safetensors(tensors, Path(tmp) / DIFFUSERS_WEIGHT_NAME, metadata)
            pipe.load_lora_weights(tmp, weight_name=DIFFUSERS_WEIGHT_NAME, adapter_name=adapter_name)
    for component in extra:
        # Components the pipeline's loader skips (T5 in SD3/Flux) go through transformers' own PEFT
        # loader, as diffusers does for CLIP; pipe.set_adapters does not manage them.
        model = models[component]
        part = AdapterState({component: state.components[component]}, state.family, state.base_model)
        tensors, metadata = diffusers_state_dict(part)
        lora_metadata = json.loads(metadata["lora_adapter_metadata"])
        prefix = f"{component}."
        config = LoraConfig(**{k.removeprefix(prefix): v for k, v in lora_metadata.items()})
        state_dict = {model_module_path(model, k.removeprefix(prefix)): v for k, v in tensors.items()}
        model.load_adapter(adapter_name=adapter_name, adapter_state_dict=state_dict, peft_config=config)


def _with_exact_targets(adapter: ComponentAdapter) -> ComponentAdapter:
    # Without CLIP's "text_model." root, the names match with or without it (as infer_component_config writes them).
    targets = sorted(without_clip_root(p) for p in adapter.layers)
    return replace(adapter, config=dict(adapter.config, target_modules=targets))


def _load_trainable(state: AdapterState, models: dict[str, nn.Module], adapter_name: str) -> None:
    if state.source_format != "native":
        state = as_moslora_state(state)
    for component, adapter in state.components.items():
        model = models[component]
        config = dict(adapter.config)
        # Target exactly the file's modules; the config keeps the targets it was trained with.
        exact_targets = sorted(model_module_path(model, p) for p in adapter.layers)
        if config.get("use_moslora"):
            kwargs = {k: v for k, v in config.items() if k not in ("use_moslora", "rank_pattern", "alpha_pattern")}
            peft_config = MoSLoRAConfig(**dict(kwargs, target_modules=exact_targets))
            add_moslora(model, peft_config, adapter_name)
        else:
            kwargs = {k: v for k, v in config.items() if k not in MOSLORA_ONLY_FIELDS}
            peft_config = LoraConfig(**dict(kwargs, target_modules=exact_targets))
            model.add_adapter(peft_config, adapter_name=adapter_name)
        model.peft_config[adapter_name].target_modules = config.get("target_modules") or exact_targets
        _copy_factors(model, adapter, adapter_name, state.source_path)


def copy_adapter_factors(model: nn.Module, adapter: ComponentAdapter, adapter_name: str, where) -> None:
    """Copy a file's A, B (and M where it has one) into ``model``'s adapter ``adapter_name``, whose layers must
    be exactly the file's modules (ValueError naming ``where`` otherwise)."""
    _copy_factors(model, adapter, adapter_name, where)


def _copy_factors(model: nn.Module, adapter: ComponentAdapter, adapter_name: str, where) -> None:
    """Copy every layer's A, M, B into ``model``'s adapter; fail if any module was left out or added."""
    expected = {model_module_path(model, p) for p in adapter.layers}
    adapted = {name for name, m in model.named_modules() if isinstance(m, LoraLayer) and adapter_name in m.lora_A}
    if adapted != expected:
        missing = sorted(expected - adapted) or sorted(adapted - expected)
        raise ValueError(f"{where}: adapter layers and file modules differ (first: {missing[0]!r})")
    with torch.no_grad():
        for path, layer in adapter.layers.items():
            module = model.get_submodule(model_module_path(model, path))
            module.lora_A[adapter_name].weight.copy_(layer.lora_A)
            module.lora_B[adapter_name].weight.copy_(layer.lora_B)
            if layer.mixer is not None:
                module.lora_mixer[adapter_name].weight.copy_(layer.mixer)


# ------------------------------------------------------------------------------------------------
# Checking a file against a pipeline folder without reading its weights


def pipeline_skeleton(pretrained_model_name_or_path: str | os.PathLike) -> tuple[type[Family], dict[str, nn.Module]]:
    """The family and adapter-carrying components of a local diffusers pipeline folder, built on the meta
    device from their configs (no weights are read, so this is quick even for SDXL or Flux)."""
    from accelerate import init_empty_weights

    path = Path(pretrained_model_name_or_path)
    family = family_of_model_dir(path)
    index = json.loads((path / "model_index.json").read_text())
    models = {}
    with init_empty_weights():
        for name in family.adapter_components():
            library, class_name = (index.get(name) or [None, None])[:2]
            if library is None or class_name is None:
                continue
            cls = getattr(importlib.import_module(library), class_name)
            if library == "diffusers":
                models[name] = cls.from_config(cls.load_config(path / name))
            else:
                models[name] = cls(cls.config_class.from_pretrained(path / name))
    return family, models


def check_adapter_file(
    path_or_dir: str | os.PathLike, pretrained_model_name_or_path: str | os.PathLike, weight_name: str | None = None
) -> AdapterState:
    """Read an adapter file and check that it fits the pipeline folder (family, modules, shapes)."""
    state = read_adapter_file(path_or_dir, weight_name)
    family, models = pipeline_skeleton(pretrained_model_name_or_path)
    return fit_adapter_to_models(state, models, family)


__all__ = [
    "adapter_state_from_pipeline",
    "canonical_module_path",
    "check_adapter_file",
    "copy_adapter_factors",
    "fit_adapter_to_models",
    "load_moslora_weights",
    "model_module_path",
    "pipeline_skeleton",
    "resolve_kohya_names",
    "save_moslora_weights",
]
