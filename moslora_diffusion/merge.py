"""Bake adapters into a base model: in place in a loaded pipeline, or streamed into a new checkpoint.

    W = W0 + sum_i w_i * s_i * B_i M_i A_i        (fp32 maths, then cast to the output dtype)

Adapters are read the way the tools people use read them: each one is loaded into a *hollow* copy of the
pipeline (every base weight a zero-stride view with no storage) through :func:`load_moslora_weights` for
our native, folded and kohya files, and through diffusers' own ``load_lora_weights`` for any other LoRA
file diffusers reads. diffusers' key conversion, ranks and alphas therefore decide every layer's delta,
and the deltas are read back from the PEFT layers (``get_delta_weight``), one base tensor at a time.

:func:`merge_checkpoint` then streams the base checkpoint tensor by tensor (plain file reads, no mmap):
each tensor is read, gets its delta, is cast and written before the next is read, so memory holds the
adapters and a few tensors, never the model. The output is a diffusers folder (``save_pretrained``
layout) or a single file in the family's original layout (:mod:`moslora_diffusion.single_file`), and it
appears complete or not at all. :func:`merge_adapters` fuses into a loaded pipeline's own weights.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import importlib
import inspect
import json
import logging
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import nn

from .clip_names import other_clip_name
from .families import Family, family_of_model_dir, family_of_pipeline
from .fileio import SafetensorsReader, TensorInfo, atomic_directory, atomic_path, load_safetensors, write_safetensors_streaming
from .single_file import original_layout, single_file_components

logger = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}

# Weight files of a component folder that a merge never carries over unmerged (pickles, other frameworks).
_FOREIGN_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5", ".onnx", ".pb", ".gguf")
_WEIGHT_FILE = re.compile(r"(diffusion_pytorch_model|model)(?:\.(\w+))?\.safetensors")
_WEIGHT_INDEX = re.compile(r"(diffusion_pytorch_model|model)\.safetensors\.index(?:\.(\w+))?\.json")


# ---------------------------------------------------------------------------------------------------
# Adapters on the command line and in Python


@dataclasses.dataclass(frozen=True)
class AdapterSpec:
    """An adapter to merge: a file or folder, and the weight w its delta is scaled by."""

    path: Path
    weight: float = 1.0


def parse_adapter_spec(text: str) -> AdapterSpec:
    """``PATH[:WEIGHT]``. The part after the last ':' is a weight only if it parses as a float and the
    whole string is not an existing path, so paths that contain ':' still work. The weight defaults to 1.

    Never a guess: if both ``PATH:WEIGHT`` and ``PATH`` exist, or nothing follows a final ':' of a path that
    does not exist, it is a ValueError saying how to write it.
    """
    head, sep, tail = text.rpartition(":")
    if sep and head and not tail and not os.path.exists(text):
        raise ValueError(f"--adapter {text!r}: nothing after the last ':'; write PATH:WEIGHT (e.g. {head}:0.8) or just PATH")
    try:
        weight = float(tail) if sep and head else None
    except ValueError:
        weight = None
    if weight is None:
        return AdapterSpec(Path(text), 1.0)
    if os.path.exists(text):
        if os.path.exists(head):
            raise ValueError(
                f"--adapter {text!r} is ambiguous: both {text!r} and {head!r} exist; write {text}:1 for the first, "
                "or rename one of them"
            )
        return AdapterSpec(Path(text), 1.0)
    if not math.isfinite(weight):
        raise ValueError(f"--adapter {text!r}: the weight must be a finite number, got {tail!r}")
    return AdapterSpec(Path(head), weight)


def _as_specs(adapters: Iterable) -> list[AdapterSpec]:
    specs = []
    for item in adapters:
        if isinstance(item, AdapterSpec):
            specs.append(item)
        elif isinstance(item, (str, os.PathLike)):
            specs.append(AdapterSpec(Path(item)))
        else:
            path, weight = item
            specs.append(AdapterSpec(Path(path), float(weight)))
    if not specs:
        raise ValueError("no adapters given: pass at least one --adapter PATH[:WEIGHT]")
    return specs


# ---------------------------------------------------------------------------------------------------
# A hollow pipeline: real module structure, no weight storage


def _hollow(model: nn.Module) -> nn.Module:
    """Replace every meta parameter and buffer by a zero-stride CPU view: shapes and dtypes, no storage.

    Unlike meta tensors, these let diffusers and PEFT create and load adapter weights on the CPU.
    """
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None and param.is_meta:
                view = torch.zeros((), dtype=param.dtype).expand(param.shape)
                module._parameters[name] = nn.Parameter(view, requires_grad=False)
        for name, buffer in list(module._buffers.items()):
            if buffer is not None and buffer.is_meta:
                module._buffers[name] = torch.zeros((), dtype=buffer.dtype).expand(buffer.shape)
    return model.eval()


def _hollow_model(cls: type, config) -> nn.Module:
    import diffusers
    from accelerate import init_empty_weights

    with init_empty_weights():
        # A copy: building a model may write into its config (attention implementation and the like).
        model = cls.from_config(config) if issubclass(cls, diffusers.ModelMixin) else cls(copy.deepcopy(config))
    return _hollow(model)


def _construct_pipeline(pipeline_cls: type, components: dict):
    """The pipeline from hollow models; tokenizers and other processors are left out (None)."""
    parameters = inspect.signature(pipeline_cls.__init__).parameters
    kwargs = {
        name: components.get(name)
        for name, parameter in parameters.items()
        if name != "self"
        and parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY)
        and (name in components or parameter.default is parameter.empty)
    }
    if "requires_safety_checker" in parameters:
        kwargs["requires_safety_checker"] = False
    return pipeline_cls(**kwargs)


def _hollow_pipeline_from_folder(base: Path):
    import diffusers
    import transformers

    index = json.loads((base / "model_index.json").read_text())
    components = {}
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, list) or len(spec) != 2 or None in spec:
            continue
        library, class_name = spec
        if library not in ("diffusers", "transformers"):
            continue
        cls = getattr(importlib.import_module(library), class_name)
        if issubclass(cls, diffusers.ModelMixin):
            components[name] = _hollow_model(cls, cls.load_config(base / name))
        elif issubclass(cls, transformers.PreTrainedModel):
            components[name] = _hollow_model(cls, cls.config_class.from_pretrained(base / name))
        elif issubclass(cls, diffusers.SchedulerMixin):
            components[name] = cls.from_config(cls.load_config(base / name))
    return _construct_pipeline(getattr(diffusers, index["_class_name"]), components)


def _hollow_pipeline_like(pipe):
    import diffusers
    import transformers

    components = {}
    for name, component in pipe.components.items():
        if isinstance(component, diffusers.ModelMixin):
            components[name] = _hollow_model(type(component), component.config)
        elif isinstance(component, transformers.PreTrainedModel):
            components[name] = _hollow_model(type(component), component.config)
        elif isinstance(component, diffusers.SchedulerMixin):
            components[name] = component
    return _construct_pipeline(type(pipe), components)


# ---------------------------------------------------------------------------------------------------
# Loading adapters and reading their deltas


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _adapter_file(spec: AdapterSpec) -> tuple[Path, dict[str, torch.Tensor], dict[str, str]]:
    """The adapter's weight file, as load_moslora_weights picks it, with its tensors and metadata
    (safetensors only; a corrupt file is one ValueError naming it)."""
    from .formats import find_adapter_file

    if not spec.path.exists():
        raise ValueError(f"adapter {spec.path}: no such file or folder")
    try:
        path = find_adapter_file(spec.path)
    except FileNotFoundError as err:
        raise ValueError(f"adapter {_first_line(err)}") from None
    tensors, metadata = load_safetensors(path)
    return path, tensors, metadata


@contextlib.contextmanager
def _quiet_loading():
    """Load adapters into the hollow pipeline silently, collecting "unexpected keys" warnings.

    The loaders' progress bars, load reports and warnings describe the hollow copy (adapter "merge_0" on
    weights without storage), which would only confuse; the one warning that matters, weights no layer
    takes, is collected and yielded so the caller can turn it into an error.
    """
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging
    import warnings

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
    formats. A native file never does: stock loaders would drop its mixer.
    """
    from .formats import detect_format, has_only_adapter_keys, parse_adapter_state_dict, validate_adapter_state_dict
    from .loaders import load_moslora_weights

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
        attempts.append(lambda: pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=adapter_name, use_safetensors=True))
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
    message = _first_line(first_error)
    if str(path) not in message:
        message = f"{path}: {message}"
    raise ValueError(f"adapter {message} (is it for another model family? the base is {family.name})")


def _has_adapter(pipe, family: type[Family], adapter_name: str) -> bool:
    return any(adapter_name in (getattr(getattr(pipe, c, None), "peft_config", None) or {}) for c in family.adapter_components())


def _adapter_names(layer) -> set[str]:
    return set(getattr(layer, "lora_A", {})) | set(getattr(layer, "lora_embedding_A", {}))


class _AdapterDeltas:
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
                            raise ValueError(f"adapter {spec.path}: {type(layer).__name__} layers cannot be merged (LoRA and MoSLoRA only)")
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
                        raise ValueError(f"adapter {spec.path}: holds no weights for some factors of {component}.{module_name}; the file is incomplete")
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
                raise ValueError(f"adapter {spec.path}: no layer of the {family.name} base model takes its weights; was it made for another model family?")
        if not self.targets:
            changed = sorted({c for touched in self.touched.values() for c in touched})
            raise ValueError(f"--components {','.join(components)}: the adapters change none of these (they change {', '.join(changed)})")

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


def _select_components(family: type[Family], requested: Sequence[str] | None, present: Sequence[str]) -> list[str]:
    allowed = family.adapter_components()
    if requested is None:
        return [c for c in allowed if c in present]
    chosen = []
    for name in requested:
        if name not in allowed:
            raise ValueError(f"--components: {name!r} is not an adaptable component of {family.name} models (choose from {', '.join(allowed)})")
        if name not in present:
            raise ValueError(f"--components: the base model has no {name!r}")
        chosen.append(name)
    return chosen


# ---------------------------------------------------------------------------------------------------
# In place


def merge_adapters(pipe, adapters: Iterable, components: Sequence[str] | None = None):
    """Fuse ``adapters`` ([(path, weight), ...], paths or :class:`AdapterSpec`) into ``pipe``'s weights.

    W += w * s * B M A for every adapted layer, computed in fp32 and cast to each weight's dtype; no adapter
    layer is ever added to ``pipe`` (the adapters live in a hollow copy). ``components`` limits the merge
    (default: every adaptable component). Returns ``pipe``.
    """
    family = family_of_pipeline(pipe)
    specs = _as_specs(adapters)
    present = [c for c in family.adapter_components() if getattr(pipe, c, None) is not None]
    components = _select_components(family, components, present)
    deltas = _AdapterDeltas(_hollow_pipeline_like(pipe), family, specs, components)
    with torch.no_grad():
        for component, targets in deltas.targets.items():
            params = dict(getattr(pipe, component).named_parameters())
            for key in targets:
                module, _, leaf = key.rpartition(".")
                param = params.get(key, params.get(f"{module}.base_layer.{leaf}"))
                if param is None:
                    raise ValueError(f"{component} has no parameter {key!r} to merge into")
                delta = deltas.delta(component, key).to(param.device)
                param.copy_((param.float() + delta).to(param.dtype))
    logger.info("Merged %d adapter(s) into %d tensors of %s", len(specs), deltas.count(), ", ".join(deltas.targets) or "nothing")
    return pipe


# ---------------------------------------------------------------------------------------------------
# The base checkpoint, read tensor by tensor


@dataclasses.dataclass
class _ComponentWeights:
    """One component's safetensors weights: the files (shards) merged, and where each tensor lies."""

    name: str
    folder: Path
    files: list[Path]
    index: Path | None
    dropped: list[Path]  # other weight files of the folder, not carried over (stale once merged)
    tensors: dict[str, tuple[Path, TensorInfo]]
    config: dict

    @classmethod
    def find(cls, base: Path, name: str) -> _ComponentWeights:
        folder = base / name
        sets: dict[str | None, tuple[Path | None, list[Path]]] = {}
        for path in sorted(folder.iterdir()) if folder.is_dir() else []:
            if match := _WEIGHT_INDEX.fullmatch(path.name):
                try:
                    weight_map = json.loads(path.read_text())["weight_map"]
                except (OSError, ValueError, KeyError, TypeError) as err:
                    raise ValueError(f"{path}: unreadable shard index ({err})") from None
                sets[match.group(2)] = (path, [folder / f for f in dict.fromkeys(weight_map.values())])
        for path in sorted(folder.iterdir()) if folder.is_dir() else []:
            match = _WEIGHT_FILE.fullmatch(path.name)
            if match and match.group(2) not in sets:
                sets[match.group(2)] = (None, [path])
        if None in sets:
            variant = None
        elif len(sets) == 1:
            variant = next(iter(sets))
        elif sets:
            raise ValueError(f"{folder}: several weight variants ({', '.join(sorted(map(str, sets)))}) and no main weights; keep one")
        else:
            pickles = sorted(p.name for p in folder.glob("*") if p.suffix in _FOREIGN_WEIGHT_SUFFIXES)
            found = f"only {', '.join(pickles)}, which are not safetensors (pickles are never loaded)" if pickles else "no weights"
            raise ValueError(f"{folder}: {found}; save the base model with safe_serialization=True")
        index, files = sets[variant]
        chosen = set(files) | ({index} if index else set())
        dropped = [
            p
            for p in sorted(folder.iterdir())
            if p not in chosen and (p.suffix in (".safetensors", *_FOREIGN_WEIGHT_SUFFIXES) or _WEIGHT_INDEX.fullmatch(p.name))
        ]
        tensors = {}
        for file in files:
            with SafetensorsReader(file) as reader:
                for key, info in reader.tensors.items():
                    tensors[key] = (file, info)
        config_path = folder / "config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        return cls(name, folder, files, index, dropped, tensors, config)

    def locate(self, model_key: str) -> str | None:
        """The file's name for a model tensor name (transformers 5 drops CLIP's ``text_model.`` level)."""
        if model_key in self.tensors:
            return model_key
        other = other_clip_name(model_key)
        return other if other in self.tensors else None


class _MergedTensors:
    """Base tensors with their deltas added, read one at a time; each returned in its output dtype."""

    def __init__(self, weights: dict[str, _ComponentWeights], deltas: _AdapterDeltas, dtype: torch.dtype | None):
        self.weights = weights
        self.deltas = deltas
        self.dtype = dtype
        self.model_key: dict[tuple[str, str], str] = {}  # (component, file key) -> model key of a delta
        self._readers: dict[Path, SafetensorsReader] = {}
        self.merged = 0

    def out_dtype(self, info: TensorInfo) -> torch.dtype:
        return self.dtype if self.dtype is not None and info.dtype.is_floating_point else info.dtype

    def read(self, component: str, key: str) -> torch.Tensor:
        file, info = self.weights[component].tensors[key]
        if file not in self._readers:
            self._readers[file] = SafetensorsReader(file)
        tensor = self._readers[file].read(key)
        model_key = self.model_key.get((component, key))
        if model_key is not None:
            tensor = tensor.float() + self.deltas.delta(component, model_key)
            self.merged += 1
        return tensor.to(self.out_dtype(info))

    def close(self) -> None:
        for reader in self._readers.values():
            reader.close()
        self._readers.clear()


# ---------------------------------------------------------------------------------------------------
# Merging into a new checkpoint


@dataclasses.dataclass
class MergeResult:
    """What :func:`merge_checkpoint` wrote."""

    output: Path
    family: str
    adapters: list[AdapterSpec]
    components: list[str]
    tensors_merged: int
    bytes_written: int
    seconds: float

    def summary(self) -> str:
        return (
            f"merged {len(self.adapters)} adapter(s) into {self.tensors_merged} tensors of {', '.join(self.components) or 'nothing'}; "
            f"wrote {self.output} ({self.bytes_written / 2**20:.1f} MiB) in {self.seconds:.1f} s"
        )


def merge_checkpoint(
    base: str | os.PathLike,
    adapters: Iterable,
    output: str | os.PathLike,
    *,
    dtype: str | torch.dtype | None = None,
    components: Sequence[str] | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> MergeResult:
    """Bake ``adapters`` into the pipeline folder ``base`` and write ``output``, streaming.

    ``output`` ending in ``.safetensors`` is a single file in the family's original layout (loadable by
    ``from_single_file`` with ``config=`` a diffusers folder of the same model, and by A1111 / ComfyUI);
    anything else is a diffusers folder (``DiffusionPipeline.from_pretrained``) with a README.md naming
    the base and each adapter with its weight and sha256. ``dtype`` ("fp32", "fp16", "bf16") casts the
    floating-point tensors (default: each keeps the base's dtype); the maths is fp32 either way.
    Every input is checked before anything is written; the output appears complete or not at all.
    """
    start = time.perf_counter()
    plan = _MergePlan(base, adapters, output, dtype=dtype, components=components, overwrite=overwrite, progress=progress)
    written = plan.write()
    result = MergeResult(plan.output, plan.family.name, plan.specs, list(plan.deltas.targets), plan.merged.merged, written, time.perf_counter() - start)
    logger.info(result.summary())
    return result


class _MergePlan:
    """Everything a merge needs, checked up front: nothing is written until :meth:`write`."""

    def __init__(self, base, adapters, output, *, dtype, components, overwrite, progress=False):
        self.base = _resolve_base(base)
        self.family = family_of_model_dir(self.base)
        self.specs = _as_specs(adapters)
        self.output = Path(output)
        self.single_file = self.output.suffix == ".safetensors"
        self.overwrite = overwrite
        self.progress = progress
        self.dtype = _parse_dtype(dtype)
        _check_output(self.output, self.base, overwrite)

        index = json.loads((self.base / "model_index.json").read_text())
        model_components = [
            name for name, spec in index.items()
            if not name.startswith("_") and isinstance(spec, list) and len(spec) == 2 and spec[0] in ("diffusers", "transformers")
            and (self.base / name / "config.json").is_file()
        ]  # fmt: skip
        self.components = _select_components(self.family, components, model_components)
        if self.single_file:
            wanted = single_file_components(self.family.name)
            missing = [c for c in wanted if c not in model_components]
            if missing:
                raise ValueError(f"a {self.family.name} single file needs {', '.join(missing)}, which the base model lacks")
        self.weights = {name: _ComponentWeights.find(self.base, name) for name in model_components if not self.single_file or name in single_file_components(self.family.name)}

        self.deltas = _AdapterDeltas(_hollow_pipeline_from_folder(self.base), self.family, self.specs, self.components)
        self.merged = _MergedTensors(self.weights, self.deltas, self.dtype)
        for component, targets in self.deltas.targets.items():
            if component not in self.weights:
                kept = ", ".join(single_file_components(self.family.name))
                raise ValueError(
                    f"the adapters change {component}, but a {self.family.name} single file holds only {kept}: "
                    f"write a diffusers folder (--output DIR), or leave {component} out with --components"
                )
            weights = self.weights[component]
            for key in targets:
                file_key = weights.locate(key)
                if file_key is None:
                    raise ValueError(f"{weights.folder}: the adapters change {key!r}, which the base weights lack")
                shape = weights.tensors[file_key][1].shape
                if tuple(shape) != self.deltas.shapes[component][key]:
                    raise ValueError(
                        f"{weights.folder}: {file_key!r} is {tuple(shape)} in the weights but {self.deltas.shapes[component][key]} "
                        "in the config; the base model folder is inconsistent"
                    )
                self.merged.model_key[(component, file_key)] = key
        if self.single_file:
            self.layout = original_layout(
                self.family.name,
                {c: list(w.tensors) for c, w in self.weights.items()},
                {c: w.config for c, w in self.weights.items()},
            )

    # -- writing ------------------------------------------------------------------------------------

    def write(self) -> int:
        # One tensor at a time is memory- and I/O-bound work on small matmuls: a thread pool only adds
        # synchronisation, which on a busy machine made the merge 2-3x slower (benchmarks/bench_merge.py).
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            if self.single_file:
                with atomic_path(self.output) as tmp:
                    return self._write_single_file(tmp)
            with atomic_directory(self.output, overwrite=self.overwrite) as tmp:
                return self._write_folder(tmp)
        finally:
            torch.set_num_threads(threads)
            self.merged.close()

    def _progress(self, total: int, desc: str):
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit="tensor", disable=not self.progress)

    def _write_folder(self, out: Path) -> int:
        written = 0
        handled = {p for w in self.weights.values() for p in [*w.files, *([w.index] if w.index else []), *w.dropped]}
        total = sum(len(w.tensors) for w in self.weights.values())
        with self._progress(total, "merging") as bar:
            for source in sorted(self.base.rglob("*")):
                relative = source.relative_to(self.base)
                if source.is_dir() or source in handled or relative.parts[0].startswith("."):
                    continue
                target = out / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                if relative == Path("README.md"):
                    continue  # written below, with the base's own card kept after the merge record
                if self.dtype is not None and source.name == "config.json" and relative.parts[0] in self.weights:
                    target.write_text(_with_config_dtype(source.read_text(), self.dtype))
                else:
                    shutil.copy2(source, target)
            for component, weights in self.weights.items():
                for file in weights.files:
                    written += self._write_component_file(component, file, out / component / file.name, bar)
                if weights.index is not None:
                    _write_index(weights, out / component / weights.index.name, self.merged)
        (out / "README.md").write_text(self._readme())
        return written

    def _write_component_file(self, component: str, file: Path, target: Path, bar) -> int:
        weights = self.weights[component]
        with SafetensorsReader(file) as reader:
            names, metadata = list(reader.tensors), reader.metadata
        entries = [(key, self.merged.out_dtype(weights.tensors[key][1]), weights.tensors[key][1].shape) for key in names]

        def tensor_for(key):
            bar.update(1)
            return self.merged.read(component, key)

        return write_safetensors_streaming(target, entries, tensor_for, metadata or {"format": "pt"})

    def _write_single_file(self, tmp: Path) -> int:
        entries = []
        for original in self.layout:
            parts = []
            for component, key in original.sources:
                info = self.weights[component].tensors[key][1]
                parts.append(torch.empty(info.shape, dtype=self.merged.out_dtype(info), device="meta"))
            built = original.build(parts)
            entries.append((original.name, built.dtype, tuple(built.shape)))
        layout = {t.name: t for t in self.layout}
        extra = {}
        scheduler = self.base / "scheduler" / "scheduler_config.json"
        if scheduler.is_file() and json.loads(scheduler.read_text()).get("prediction_type") == "v_prediction":
            # ComfyUI's marker for v-prediction checkpoints (A1111 and diffusers ignore it).
            extra["v_pred"] = torch.zeros(0)
            entries.append(("v_pred", torch.float32, (0,)))
        with self._progress(len(entries), "merging") as bar:

            def tensor_for(name):
                bar.update(1)
                if name in extra:
                    return extra[name]
                original = layout[name]
                return original.build([self.merged.read(c, k) for c, k in original.sources])

            metadata = {"format": "pt", "moslora_merge": json.dumps(self._record(), sort_keys=True)}
            return write_safetensors_streaming(tmp, entries, tensor_for, metadata)

    # -- the record of what was merged --------------------------------------------------------------

    def _record(self) -> dict:
        from .version import __version__

        return {
            "tool": f"moslora-diffusion {__version__}",
            "base": str(self.base),
            "family": self.family.name,
            "adapters": [{"path": str(s.path), "weight": s.weight, "files": _sha256_of_adapter(s.path)} for s in self.specs],
            "components": list(self.deltas.targets),
            "dtype": _DTYPE_NAMES.get(self.dtype, "as the base"),
            "not_carried_over": [str(p.relative_to(self.base)) for w in self.weights.values() for p in w.dropped],
        }

    def _readme(self) -> str:
        record = self._record()
        rows = []
        for adapter in record["adapters"]:
            hashes = "<br>".join(f"`{name}`: `{digest}`" for name, digest in adapter["files"].items())
            rows.append(f"| `{adapter['path']}` | {adapter['weight']:g} | {hashes} |")
        text = "\n".join(
            [
                "# Merged model",
                "",
                f"The {record['family']} base model `{record['base']}` with these adapters baked into its weights",
                "(W = W0 + sum of weight x delta W, in fp32), by `moslora merge` "
                f"({record['tool']}):",
                "",
                "| adapter | weight | sha256 |",
                "|---|---|---|",
                *rows,
                "",
                f"Components changed: {', '.join(record['components']) or 'none'}. Weights dtype: {record['dtype']}.",
                *(
                    [f"Not carried over (unmerged copies of the weights): {', '.join(f'`{p}`' for p in record['not_carried_over'])}."]
                    if record["not_carried_over"]
                    else []
                ),
                "Load it with `DiffusionPipeline.from_pretrained(\"<this folder>\")`; no adapter loader is needed.",
                "",
            ]
        )
        base_card = self.base / "README.md"
        if not base_card.is_file():
            return text
        card = base_card.read_text()
        front_matter = ""
        if card.startswith("---\n") and "\n---\n" in card[4:]:
            end = card.index("\n---\n", 4) + len("\n---\n")
            front_matter, card = card[:end] + "\n", card[end:]
        return f"{front_matter}{text}\n## The base model's card\n\n{card}"


def _resolve_base(base: str | os.PathLike) -> Path:
    path = Path(base)
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ValueError(f"--base {path}: not a diffusers pipeline folder (no model_index.json)")
        return path
    if path.exists():
        raise ValueError(f"--base {path}: a file; give a diffusers pipeline folder (single-file bases are not supported)")
    if re.fullmatch(r"[\w.-]+/[\w.-]+", str(base)):
        try:
            from huggingface_hub import snapshot_download

            patterns = ["*.json", "*.txt", "*.model", "*.safetensors", "*.md", "*/*.json", "*/*.txt", "*/*.model", "*/*.safetensors"]
            return Path(snapshot_download(str(base), allow_patterns=patterns))
        except Exception as err:  # noqa: BLE001 - offline, missing repo, no auth: one line
            raise ValueError(f"--base {base}: not a local folder, and the Hub could not provide it ({_first_line(err)})") from None
    raise ValueError(f"--base {base}: no such folder")


def _parse_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _check_output(output: Path, base: Path, overwrite: bool) -> None:
    if output.suffix in (".ckpt", ".pt", ".pth", ".bin", ".sft"):
        raise ValueError(f"--output {output}: single files are written as .safetensors only (or give a folder)")
    parent = output.parent
    if not parent.is_dir():
        problem = "is not a folder" if parent.exists() else "does not exist"
        raise ValueError(f"--output {output}: {parent} {problem}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"--output {output}: cannot write in {parent} (permission denied)")
    resolved, base_resolved = output.resolve(), base.resolve()
    if resolved == base_resolved or base_resolved in resolved.parents or resolved in base_resolved.parents:
        raise ValueError(f"--output {output}: overlaps the base model folder {base}; write somewhere else")
    if output.exists() or output.is_symlink():
        if not overwrite:
            raise ValueError(f"--output {output}: already exists; pass --overwrite to replace it")
        single = output.suffix == ".safetensors"
        if single and not output.is_file() or not single and not output.is_dir():
            raise ValueError(f"--output {output}: exists and is not a {'file' if single else 'folder'}; remove it first")


def _with_config_dtype(text: str, dtype: torch.dtype) -> str:
    """A component config.json with its recorded dtype (transformers' ``dtype`` / ``torch_dtype``) updated."""
    config = json.loads(text)
    for field in ("dtype", "torch_dtype"):
        if field in config:
            config[field] = _DTYPE_NAMES[dtype]
    return json.dumps(config, indent=2, sort_keys=True) + "\n"


def _write_index(weights: _ComponentWeights, target: Path, merged: _MergedTensors) -> None:
    index = json.loads(weights.index.read_text())
    total = 0
    for file, info in weights.tensors.values():
        numel = math.prod(info.shape)
        total += numel * merged.out_dtype(info).itemsize
    index.setdefault("metadata", {})["total_size"] = total
    target.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _sha256_of_adapter(path: Path) -> dict[str, str]:
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
    digests = {}
    for file in files:
        digest = hashlib.sha256()
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        digests[file.name] = digest.hexdigest()
    return digests


# ---------------------------------------------------------------------------------------------------
# Command line


def run_merge(args) -> int:
    """``moslora merge`` on parsed arguments (see ``moslora_diffusion.cli``): merge, print a one-line summary.

    Bad input raises ValueError before anything is written; a failure while writing (disk full,
    permissions) also becomes one ValueError line, the output left as it was.
    """
    components = None
    if args.components is not None:
        components = [c.strip() for c in args.components.split(",") if c.strip()]
        if not components:
            raise ValueError("--components: give at least one component name")
    try:
        result = merge_checkpoint(
            args.base,
            [parse_adapter_spec(a) for a in args.adapter],
            args.output,
            dtype=args.dtype,
            components=components,
            overwrite=args.overwrite,
            progress=sys.stderr.isatty(),
        )
    except (OSError, MemoryError) as err:
        raise ValueError(f"merge into {args.output} failed, nothing was written: {_first_line(err) or type(err).__name__}") from None
    print(result.summary())
    return 0


__all__ = ["DTYPES", "AdapterSpec", "MergeResult", "merge_adapters", "merge_checkpoint", "parse_adapter_spec", "run_merge"]
