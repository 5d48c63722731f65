"""Adapters loaded into a hollow pipeline, and the weighted delta sum_i w_i * s_i * B_i M_i A_i of each base tensor.

Our layouts load through :func:`moslora_diffusion.loaders.load_moslora_weights`, any other LoRA file
through diffusers' own ``load_lora_weights``; the deltas are read back from the PEFT layers.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from ..families import Family
from ..fileio import load_safetensors
from .specs import AdapterSpec


def first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _adapter_file(spec: AdapterSpec) -> tuple[Path, dict[str, torch.Tensor], dict[str, str]]:
    """The adapter's weight file, as load_moslora_weights picks it, with its tensors and metadata
    (safetensors only; a corrupt file is one ValueError naming it)."""
    from ..formats.files import find_adapter_file

    if not spec.path.exists():
        raise ValueError(f"adapter {spec.path}: no such file or folder")
    try:
        path = find_adapter_file(spec.path)
    except FileNotFoundError as err:
        raise ValueError(f"adapter {first_line(err)}") from None
    tensors, metadata = load_safetensors(path)
    return path, tensors, metadata


@contextlib.contextmanager
def _quiet_loading():
    """Load adapters into the hollow pipeline silently, collecting "unexpected keys" warnings.

    The loaders' progress bars, load reports and warnings describe the hollow copy (adapter "merge_0" on
    weights without storage), which would only confuse; the one warning that matters, weights no layer
    takes, is collected and yielded so the caller can turn it into an error.
    """
    import warnings

    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    found: list[str] = []

    class _Collect(logging.Handler):
        def emit(self, record):
            message = record.getMessage()
            if "unexpected keys" in message:
                found.append(message)

    class _Drop(logging.Filter):
        def filter(self, record):
            return record.levelno >= logging.ERROR

    collect, drop = _Collect(logging.WARNING), _Drop()
    loggers = [logging.getLogger(name) for name in ("diffusers", "transformers", "peft")]
    silenced = [handler for log in loggers for handler in log.handlers]
    bars = [(m, m.is_progress_bar_enabled()) for m in (diffusers_logging, transformers_logging)]
    for log in loggers:
        log.addHandler(collect)
    for handler in silenced:
        handler.addFilter(drop)
    for module, _ in bars:
        module.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield found
    finally:
        for log in loggers:
            log.removeHandler(collect)
        for handler in silenced:
            handler.removeFilter(drop)
        for module, enabled in bars:
            if enabled:
                module.enable_progress_bar()


def _load_adapter(pipe, family: type[Family], spec: AdapterSpec, adapter_name: str) -> None:
    """Load ``spec`` into ``pipe`` as ``adapter_name``.

    Our layouts go through load_moslora_weights (which folds the mixer and checks family and shapes).
    A folded or kohya-style file it cannot place (say an SDXL LoRA with SGM-named kohya keys from another
    trainer), and any other file, then goes through diffusers' own load_lora_weights, which knows more
    formats. A native file never does: stock loaders would drop its mixer, nor does a training checkpoint
    (read as the native adapter it holds).
    """
    from ..formats.checkpoint import read_training_checkpoint, training_checkpoint_folder
    from ..formats.checks import detect_format, has_only_adapter_keys, validate_adapter_state_dict
    from ..formats.files import parse_adapter_state_dict
    from ..loaders import load_moslora_weights

    if training_checkpoint_folder(spec.path) is not None:
        read_training_checkpoint(spec.path)  # every tensor and config checked before the hollow pipeline sees it
        load = [lambda: load_moslora_weights(pipe, spec.path, adapter_name=adapter_name)]
        _load_with_fallbacks(pipe, family, spec.path, load, adapter_name)
        return
    path, tensors, metadata = _adapter_file(spec)
    # Before any loader, and final: diffusers' own would take NaN or float8 weights, or a module with B and
    # no A (leaving A at its random init), that ours refuse. Keys of other trainers' layouts may pass.
    validate_adapter_state_dict(tensors, path, allow_unknown_keys=True)
    try:
        layout = detect_format(tensors, metadata, path)
    except ValueError:
        layout = None
    if layout is not None and has_only_adapter_keys(tensors):
        # A file in our own layouts that our reader refuses (metadata not JSON, ranks unlike its config, ...)
        # is broken: diffusers' loader would guess around the damage. Only placing it may fall back.
        parse_adapter_state_dict(tensors, metadata, path)
    del tensors
    attempts = []
    if layout is not None:
        attempts.append(lambda: load_moslora_weights(pipe, path, adapter_name=adapter_name))
    if layout != "native":
        # use_safetensors=True: never fall back to unpickling a .bin beside it.
        attempts.append(
            lambda: pipe.load_lora_weights(
                str(path.parent), weight_name=path.name, adapter_name=adapter_name, use_safetensors=True
            )
        )
    _load_with_fallbacks(pipe, family, path, attempts, adapter_name)


def _load_with_fallbacks(pipe, family: type[Family], path: Path, attempts: list, adapter_name: str) -> None:
    """Try each loader in turn until one loads the adapter whole; one ValueError naming ``path`` if none does."""
    first_error = None
    for load in attempts:
        failed = None
        with _quiet_loading() as unexpected:
            try:
                load()
            except Exception as err:  # noqa: BLE001 - any loader failure becomes one line naming the file
                failed = err
        if unexpected:
            raise ValueError(
                f"adapter {path}: has weights that no layer of the {family.name} base model takes "
                f"({unexpected[0][:160]}...); was it made for another model family?"
            )
        if failed is None:
            return
        first_error = first_error or failed
        if _has_adapter(pipe, family, adapter_name):
            break  # partly loaded: no clean second try
    message = first_line(first_error)
    if str(path) not in message:
        message = f"{path}: {message}"
    raise ValueError(f"adapter {message} (is it for another model family? the base is {family.name})")


def _has_adapter(pipe, family: type[Family], adapter_name: str) -> bool:
    return any(
        adapter_name in (getattr(getattr(pipe, c, None), "peft_config", None) or {})
        for c in family.adapter_components()
    )


def _adapter_names(layer) -> set[str]:
    return set(getattr(layer, "lora_A", {})) | set(getattr(layer, "lora_embedding_A", {}))


class AdapterDeltas:
    """The adapters, loaded into a hollow pipeline, indexed by the base tensors they change.

    ``targets[component][tensor name]`` lists (layer, adapter name, weight, is_bias); :meth:`delta` sums
    the weighted deltas of one tensor in fp32 on demand, so only one delta exists at a time.
    """

    def __init__(self, hollow_pipe, family: type[Family], specs: Sequence[AdapterSpec], components: Sequence[str]):
        from peft.tuners.lora import LoraLayer
        from peft.tuners.tuners_utils import BaseTunerLayer

        self.targets: dict[str, dict[str, list[tuple[nn.Module, str, float, bool]]]] = {}
        self.shapes: dict[str, dict[str, tuple[int, ...]]] = {}
        self.touched: dict[int, set[str]] = {}  # every component each adapter changes (selected or not)
        for i, spec in enumerate(specs):
            adapter_name = f"merge_{i}"
            _load_adapter(hollow_pipe, family, spec, adapter_name)
            for component in family.adapter_components():
                model = getattr(hollow_pipe, component, None)
                if model is None:
                    continue
                for module_name, layer in model.named_modules():
                    if not isinstance(layer, BaseTunerLayer):
                        continue
                    if not isinstance(layer, LoraLayer):
                        if any(adapter_name in getattr(layer, n, {}) for n in layer.adapter_layer_names):
                            raise ValueError(
                                f"adapter {spec.path}: {type(layer).__name__} layers cannot be merged "
                                "(LoRA and MoSLoRA only)"
                            )
                        continue
                    if adapter_name not in _adapter_names(layer):
                        continue
                    self.touched.setdefault(i, set()).add(component)
                    if component not in components:
                        continue
                    if layer.use_dora.get(adapter_name):
                        raise ValueError(
                            f"adapter {spec.path}: DoRA layers ({component}.{module_name}) cannot be merged here: "
                            "their weight depends on the base weight's norm"
                        )
                    factors = [getattr(layer, name, {}) for name in ("lora_A", "lora_B", "lora_mixer")]
                    if any(adapter_name in f and f[adapter_name].weight.is_meta for f in factors):
                        # diffusers creates adapter weights on the meta device and fills in what the file holds.
                        raise ValueError(
                            f"adapter {spec.path}: holds no weights for some factors of {component}.{module_name}; "
                            "the file is incomplete"
                        )
                    base = layer.get_base_layer()
                    entries = self.targets.setdefault(component, {})
                    shapes = self.shapes.setdefault(component, {})
                    key = f"{module_name}.weight"
                    entries.setdefault(key, []).append((layer, adapter_name, spec.weight, False))
                    shapes[key] = tuple(base.weight.shape)
                    if getattr(layer, "lora_bias", {}).get(adapter_name):
                        entries.setdefault(f"{module_name}.bias", []).append((layer, adapter_name, spec.weight, True))
                        shapes[f"{module_name}.bias"] = tuple(base.bias.shape)
            if i not in self.touched:
                raise ValueError(
                    f"adapter {spec.path}: no layer of the {family.name} base model takes its weights; "
                    "was it made for another model family?"
                )
        if not self.targets:
            changed = sorted({c for touched in self.touched.values() for c in touched})
            raise ValueError(
                f"--components {','.join(components)}: the adapters change none of these "
                f"(they change {', '.join(changed)})"
            )

    def delta(self, component: str, key: str) -> torch.Tensor | None:
        """sum_i w_i * s_i * B_i A_i for base tensor ``key`` of ``component``, in fp32; None if untouched."""
        entries = self.targets.get(component, {}).get(key)
        if not entries:
            return None
        total = None
        with torch.no_grad():
            for layer, adapter_name, weight, is_bias in entries:
                if is_bias:
                    part = layer.lora_B[adapter_name].bias * layer.scaling[adapter_name]
                else:
                    part = layer.get_delta_weight(adapter_name)
                part = part.float() * weight
                total = part if total is None else total + part
        return total

    def count(self) -> int:
        return sum(len(keys) for keys in self.targets.values())


def select_components(family: type[Family], requested: Sequence[str] | None, present: Sequence[str]) -> list[str]:
    allowed = family.adapter_components()
    if requested is None:
        return [c for c in allowed if c in present]
    chosen = []
    for name in requested:
        if name not in allowed:
            raise ValueError(
                f"--components: {name!r} is not an adaptable component of {family.name} models "
                f"(choose from {', '.join(allowed)})"
            )
        if name not in present:
            raise ValueError(f"--components: the base model has no {name!r}")
        chosen.append(name)
    return chosen
