"""Start training from an existing LoRA (``--init_lora FILE_OR_DIR``): step 0 is that LoRA, exactly.

A MoSLoRA component has one rank r and one scale s (its r x r mixer is shared in form by every layer), so
each component of the file becomes: r = its largest rank, s = its most common scale, and every module

    A' = [A; 0]        B' = (s_i / s) * [B M, 0]        M' = I          (M = I for a plain LoRA)
    s * B' M' A' = s_i * B M A                              the file's own delta at step 0

Layers of a smaller rank are padded with zeros, which stay zero (their gradients are zero while the
pad's rows of A, columns of B and entries of M are), so they train at their own rank; differing alphas
are folded into B. The file is read by :func:`moslora_diffusion.formats.read_adapter_file` (native,
diffusers/PEFT, kohya and the other trainers' layouts it knows) and placed by
:func:`moslora_diffusion.loaders.fit_adapter_to_models` (kohya names resolved, family, modules and shapes
checked), as ``load_moslora_weights`` does.

Text-encoder layers of the file are always loaded (the model at step 0 is the file's); they train with
``--train_text_encoder`` and otherwise stay as in the file, and are saved with the result either way.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from ..config import MoSLoRAConfig
from ..families import Family
from ..formats.state import AdapterState, ComponentAdapter, LayerFactors
from ..inject import add_moslora
from ..targets import resolve_target_modules

_FLAG = "--init_lora"


@dataclass(frozen=True)
class InitLoRA:
    """An --init_lora file as read, before any model is loaded."""

    source: str  # as given
    state: AdapterState  # kohya names still unresolved: they are matched against the loaded base
    rank: int  # the denoiser's largest rank
    lora_alpha: float  # alpha / rank is the denoiser's most common scale


def read_init_lora(source: str, family: type[Family]) -> InitLoRA:
    """Read ``source`` and check it is a LoRA of ``family`` with denoiser layers; ValueError with one line."""
    from ..formats import read_adapter_file

    try:
        state = read_adapter_file(source)
    except (OSError, ValueError) as err:
        raise ValueError(f"{_FLAG}: {_first_line(err)}") from None
    if state.family is not None and state.family != family.name:
        raise ValueError(f"{_FLAG} {source}: a LoRA for {state.family}, but the base is {family.name}")
    if family.denoiser not in state.components:
        found = ", ".join(state.components) or "no layers"
        raise ValueError(
            f"{_FLAG} {source}: no {family.denoiser} layers (found {found}); "
            f"a {family.name} LoRA adapts the {family.denoiser}"
        )
    rank, scale = _rank_and_scale(state.components[family.denoiser].layers.values())
    return InitLoRA(source, state, rank, _alpha(scale, rank))


def add_init_lora(
    components: dict[str, Any],
    family: type[Family],
    init: InitLoRA,
    *,
    target_modules: str | tuple[str, ...] | None,
    train_text_encoder: bool,
    text_encoder_config: MoSLoRAConfig | None,
    train_mixer: bool,
    lora_dropout: float,
    adapter_name: str,
) -> dict[str, nn.Module]:
    """Add ``init``'s layers as the MoSLoRA adapter ``adapter_name`` (M = I); returns the trained models, denoiser
    first, as :func:`.adapters.add_adapters` does.

    ``target_modules`` (None: the file's) must name exactly the file's denoiser modules. With
    ``train_text_encoder`` the trainable text encoders train: the file's layers where it has them, else a
    fresh adapter of ``text_encoder_config``. The file's other layers are loaded frozen.
    """
    from ..loaders import copy_adapter_factors, fit_adapter_to_models, model_module_path

    models = {name: components[name] for name in family.adapter_components() if components.get(name) is not None}
    try:
        state = fit_adapter_to_models(init.state, models, family)
    except ValueError as err:
        raise ValueError(f"{_FLAG}: {_first_line(err)}") from None
    denoiser = models[family.denoiser]
    if target_modules is not None:
        _check_same_modules(denoiser, target_modules, state.components[family.denoiser], init.source, family)

    trained = {family.denoiser: denoiser}
    if train_text_encoder:
        trained.update({name: models[name] for name in family.trainable_text_encoders if name in models})
    for component, adapter in state.components.items():
        model = models[component]
        rank, scale = _rank_and_scale(adapter.layers.values())
        layers = {path: _padded_and_rescaled(layer, rank, scale) for path, layer in adapter.layers.items()}
        config = MoSLoRAConfig(
            r=rank,
            lora_alpha=_alpha(scale, rank),
            target_modules=sorted(model_module_path(model, path) for path in layers),
            mixer_init="identity",
            train_mixer=train_mixer,
            lora_dropout=lora_dropout,
        )
        add_moslora(model, config, adapter_name)
        copy_adapter_factors(model, ComponentAdapter(adapter.config, layers), adapter_name, init.source)
        if component not in trained:
            model.requires_grad_(False)  # kept as in the file, and saved with the result
    for name, model in trained.items():
        if name not in state.components:  # --train_text_encoder on a file without layers there: a fresh adapter
            add_moslora(model, text_encoder_config, adapter_name)
    return trained


def _padded_and_rescaled(layer: LayerFactors, rank: int, scale: float) -> LayerFactors:
    """The layer as rank ``rank`` and scale ``scale`` with no mixer (M stays I): the same delta (module docstring)."""
    lora_b = layer.folded_lora_b().double() * (layer.scale / scale)
    lora_a, pad = layer.lora_A, rank - layer.rank
    if pad:
        lora_a = torch.cat([lora_a, lora_a.new_zeros(pad, *lora_a.shape[1:])])
        lora_b = torch.cat([lora_b, lora_b.new_zeros(lora_b.shape[0], pad, *lora_b.shape[2:])], dim=1)
    return replace(layer, lora_A=lora_a, lora_B=lora_b.to(layer.lora_B.dtype), mixer=None, scale=scale)


def _rank_and_scale(layers) -> tuple[int, float]:
    """(largest rank, most common scale) of a component's layers."""
    layers = list(layers)
    return max(layer.rank for layer in layers), Counter(layer.scale for layer in layers).most_common(1)[0][0]


def _alpha(scale: float, rank: int) -> float:
    alpha = scale * rank
    return int(alpha) if float(alpha).is_integer() else alpha


def _check_same_modules(
    model: nn.Module, target_modules, adapter: ComponentAdapter, source: str, family: type[Family]
) -> None:
    """--target_modules given with --init_lora must adapt exactly the file's denoiser modules."""
    from ..loaders import model_module_path

    targets = resolve_target_modules(model, target_modules if isinstance(target_modules, str) else list(target_modules))
    targets = [targets] if isinstance(targets, str) else targets
    named = {
        name
        for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, nn.Conv2d)) and any(name == t or name.endswith(f".{t}") for t in targets)
    }
    in_file = {model_module_path(model, path) for path in adapter.layers}
    if named != in_file:
        first = sorted(named ^ in_file)[0]
        shown = target_modules if isinstance(target_modules, str) else ",".join(target_modules)
        raise ValueError(
            f"--target_modules {shown} adapts {len(named)} {family.denoiser} modules, but {_FLAG} {source} adapts "
            f"{len(in_file)} (first difference: {first!r}); leave --target_modules out to train the file's modules"
        )


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__
