"""Adapter files: the native MoSLoRA layout, the folded diffusers and kohya layouts, and their checks.

One adapted module holds delta W = s * B M A. Its three file layouts:

    native     <component>.<module>.lora_A.weight (r x in), .lora_mixer.weight (r x r), .lora_B.weight (out x r)
               metadata "moslora": versioned JSON header (family, base model, per-component config)
    diffusers  <component>.<module>.lora_A.weight = A, .lora_B.weight = B M   (the mixer folded: exact)
               metadata "lora_adapter_metadata": plain LoraConfig fields per component, as diffusers writes it
    kohya      <prefix>_<module, dots as _>.lora_down.weight = A, .lora_up.weight = B M, .alpha = s * r
               metadata: the ss_* / modelspec.* fields webui shows on a LoRA card

Module paths in files are checkpoint names: a CLIP text model keeps its ``text_model.`` root even where
transformers 5 flattens it away (every LoRA tool expects it). This module works on tensors and metadata
only; :mod:`moslora_diffusion.loaders` applies adapters to pipelines.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from peft import LoraConfig
from peft.utils.other import get_pattern_key
from torch import nn

from .config import MIXER_INITS, MOSLORA_ONLY_FIELDS
from .families import FAMILIES, Family, get_family
from .fileio import load_safetensors, save_safetensors
from .layer import fold_mixer_into_lora_b

FORMAT_VERSION = 1
FORMATS = ("native", "diffusers", "kohya")

NATIVE_WEIGHT_NAME = "moslora_weights.safetensors"
DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # what stock load_lora_weights(dir) picks
# Must not end in "pytorch_lora_weights.safetensors", or stock load_lora_weights(dir) could pick it.
KOHYA_WEIGHT_NAME = "pytorch_lora_weights_kohya.safetensors"
WEIGHT_NAMES = {"native": NATIVE_WEIGHT_NAME, "diffusers": DIFFUSERS_WEIGHT_NAME, "kohya": KOHYA_WEIGHT_NAME}

NATIVE_HEADER_KEY = "moslora"
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY

# The one key-renaming table: the suffix of each factor in each layout (A: down, B: up, M: mixer).
FACTOR_SUFFIXES: dict[str, dict[str, str]] = {
    "native": {"A": ".lora_A.weight", "M": ".lora_mixer.weight", "B": ".lora_B.weight"},
    "diffusers": {"A": ".lora_A.weight", "B": ".lora_B.weight"},
    "kohya": {"A": ".lora_down.weight", "B": ".lora_up.weight", "alpha": ".alpha"},
}
_ALL_SUFFIXES = sorted({(s, f) for table in FACTOR_SUFFIXES.values() for f, s in table.items()}, key=lambda sf: -len(sf[0]))

# Per-component settings the native header records (PEFT LoraConfig fields plus MoSLoRA's own).
CONFIG_FIELDS = (
    "use_moslora", "r", "lora_alpha", "use_rslora", "mixer_init", "train_mixer",
    "target_modules", "lora_dropout", "rank_pattern", "alpha_pattern",
)  # fmt: skip

LORA_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

KNOWN_COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")


# ------------------------------------------------------------------------------------------------
# The adapter in memory, independent of layout


@dataclass
class LayerFactors:
    """One adapted module: delta W = scale * B M A (``mixer`` None means M = I, a plain LoRA layer)."""

    lora_A: torch.Tensor  # (r, in) or (r, in, kh, kw)
    lora_B: torch.Tensor  # (out, r) or (out, r, 1, 1)
    mixer: torch.Tensor | None  # (r, r)
    scale: float
    source_key: str = ""  # the key of A in the file it came from, for error messages

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]

    def folded_lora_b(self) -> torch.Tensor:
        """B' = B M, computed in at least fp32 and returned in B's dtype."""
        if self.mixer is None:
            return self.lora_B
        compute = torch.promote_types(self.lora_B.dtype, torch.float32)
        return fold_mixer_into_lora_b(self.lora_B.to(compute), self.mixer.to(compute)).to(self.lora_B.dtype)

    def delta_weight(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """scale * B M A shaped like the base weight: (out, in) or (out, in, kh, kw)."""
        b = self.lora_B.to(dtype).flatten(1)
        if self.mixer is not None:
            b = b @ self.mixer.to(dtype)
        delta = b @ self.lora_A.to(dtype).flatten(1)
        return self.scale * delta.reshape(self.lora_B.shape[0], *self.lora_A.shape[1:])


@dataclass
class ComponentAdapter:
    """The adapter on one pipeline component (unet, transformer, text_encoder, ...)."""

    config: dict  # CONFIG_FIELDS
    layers: dict[str, LayerFactors]  # module path -> factors
    # False while the module names are kohya stems (dots lost) not yet matched against a model.
    resolved: bool = True


@dataclass
class AdapterState:
    """A whole adapter as read from a file or a pipeline, before it is written in some layout."""

    components: dict[str, ComponentAdapter]
    family: str | None = None
    base_model: str | None = None
    adapter_name: str = "default"
    source_format: str = "native"  # the layout it was read from ("live": a pipeline)
    source_path: Path | None = None

    @property
    def has_mixer(self) -> bool:
        return any(layer.mixer is not None for c in self.components.values() for layer in c.layers.values())

    def layer_items(self):
        """(component, path, LayerFactors) over the whole adapter."""
        for component, adapter in self.components.items():
            for path, layer in adapter.layers.items():
                yield component, path, layer


def config_rank(config: dict, path: str) -> int:
    """r for module ``path`` under ``config``, rank_pattern applied."""
    r = config["r"]
    if config.get("rank_pattern"):
        r = config["rank_pattern"].get(get_pattern_key(list(config["rank_pattern"]), path), r)
    return r


def config_scale(config: dict, path: str) -> float:
    """s for module ``path`` under ``config``: alpha / r (alpha / sqrt(r) with rsLoRA), patterns applied."""
    r, alpha = config_rank(config, path), config["lora_alpha"]
    if config.get("alpha_pattern"):
        alpha = config["alpha_pattern"].get(get_pattern_key(list(config["alpha_pattern"]), path), alpha)
    return alpha / (math.sqrt(r) if config.get("use_rslora") else r)


def component_config_from_peft(config) -> dict:
    """The native header's record of a MoSLoRAConfig or a plain peft LoraConfig."""
    targets = config.target_modules
    return {
        "use_moslora": bool(getattr(config, "use_moslora", False)),
        "r": config.r,
        "lora_alpha": config.lora_alpha,
        "use_rslora": bool(config.use_rslora),
        "mixer_init": getattr(config, "mixer_init", None),
        "train_mixer": getattr(config, "train_mixer", None),
        "target_modules": sorted(targets) if isinstance(targets, (set, list, tuple)) else targets,
        "lora_dropout": float(config.lora_dropout),
        "rank_pattern": dict(config.rank_pattern or {}),
        "alpha_pattern": dict(config.alpha_pattern or {}),
    }


def infer_component_config(layers: dict[str, LayerFactors], use_moslora: bool = False) -> dict:
    """A config for layers read without one (kohya files, headerless diffusers files).

    r is the most common rank, alpha gives the most common scale at that rank; other ranks go to
    rank_pattern. Scales that still differ are folded into B by the writers, so nothing is lost.
    """
    ranks = Counter(layer.rank for layer in layers.values())
    r = ranks.most_common(1)[0][0] if ranks else 1
    scales = Counter(layer.scale for layer in layers.values() if layer.rank == r)
    scale = scales.most_common(1)[0][0] if scales else 1.0
    alpha = scale * r
    return {
        "use_moslora": use_moslora,
        "r": r,
        "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "use_rslora": False,
        "mixer_init": "identity" if use_moslora else None,
        "train_mixer": True if use_moslora else None,
        # Exact module names, written so that they match with or without CLIP's "text_model." root.
        "target_modules": sorted(_pattern_name(p) for p in layers),
        "lora_dropout": 0.0,
        "rank_pattern": {_pattern_name(p): layer.rank for p, layer in layers.items() if layer.rank != r},
        "alpha_pattern": {},
    }


def _pattern_name(path: str) -> str:
    return path.removeprefix("text_model.")


# ------------------------------------------------------------------------------------------------
# Module names: checkpoint names in files, model names in memory, kohya stems


def _is_flattened_clip(model: nn.Module) -> bool:
    return type(model).__name__.startswith("CLIPText") and not hasattr(model, "text_model")


def canonical_module_path(model: nn.Module, path: str) -> str:
    """The name of ``model``'s module ``path`` in files (CLIP keeps its "text_model." root)."""
    if _is_flattened_clip(model) and not path.startswith("text_model."):
        return f"text_model.{path}"
    return path


def model_module_path(model: nn.Module, path: str) -> str:
    """Inverse of :func:`canonical_module_path`: the name ``model`` itself uses."""
    if _is_flattened_clip(model):
        return path.removeprefix("text_model.")
    return path


def kohya_prefix(family: type[Family], component: str) -> str:
    """The kohya/webui key prefix of ``component`` (lora_unet, lora_te, lora_te1, lora_transformer, ...)."""
    return family.kohya_prefixes[component]


def _kohya_component_of_prefix() -> dict[str, str]:
    table: dict[str, str] = {}
    for family in FAMILIES.values():
        for component in family.kohya_prefixes:
            table[kohya_prefix(family, component)] = component
    return table


def kohya_stem(prefix: str, path: str) -> str:
    return f"{prefix}_{path.replace('.', '_')}"


def _split_kohya_stem(stem: str) -> tuple[str, str] | None:
    """(component, rest) of a kohya module name, or None if no known prefix starts it."""
    table = _kohya_component_of_prefix()
    for prefix in sorted(table, key=len, reverse=True):
        if stem.startswith(prefix + "_"):
            return table[prefix], stem[len(prefix) + 1 :]
    return None


# ------------------------------------------------------------------------------------------------
# Checks and format detection


def _split_factor(key: str) -> tuple[str | None, str, str]:
    """(factor A/B/M/alpha, module name, suffix) of a file key; factor None if unrecognised."""
    for suffix, factor in _ALL_SUFFIXES:
        if key.endswith(suffix):
            return factor, key[: -len(suffix)], suffix
    return None, key, ""


def check_adapter_tensor(key: str, tensor: torch.Tensor, path: str | os.PathLike) -> None:
    """One ValueError naming ``path`` and ``key`` unless ``tensor`` is a finite fp16/bf16/fp32/fp64 tensor.

    Applies to any LoRA file, whatever its key layout (merge checks other trainers' files with it too).
    """
    if tensor.dtype not in LORA_DTYPES:
        # float8/float4 pass is_floating_point() but torch cannot even check them for NaN.
        raise ValueError(f"{path}: {key!r} has dtype {tensor.dtype}; LoRA weights are float16, bfloat16, float32 or float64")
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{path}: {key!r} holds NaN or infinite values; the adapter is broken (diverged training?)")


def validate_adapter_state_dict(tensors: dict[str, torch.Tensor], path: str | os.PathLike, allow_unknown_keys: bool = False) -> None:
    """Raise one ValueError naming ``path`` and the first offending key, or return if the file is sound.

    Checks: every key is a LoRA factor of a known layout, every tensor is floating point and finite, each
    module has both A and B, and A (r x in), M (r x r) and B (out x r) agree on r. ``allow_unknown_keys``
    skips the first check only (for files of other trainers that diffusers' loader may still read).
    """
    if not tensors:
        raise ValueError(f"{path}: holds no tensors; expected LoRA weights")
    modules: dict[str, dict[str, tuple[str, str, torch.Tensor]]] = {}
    for key in sorted(tensors):
        tensor = tensors[key]
        factor, module, suffix = _split_factor(key)
        if factor is None and allow_unknown_keys:
            check_adapter_tensor(key, tensor, path)
            continue
        if factor is None:
            raise ValueError(
                f"{path}: unexpected key {key!r}; adapter keys end in .lora_A.weight / .lora_B.weight / "
                ".lora_mixer.weight (native, diffusers) or .lora_down.weight / .lora_up.weight / .alpha (kohya)"
            )
        check_adapter_tensor(key, tensor, path)
        modules.setdefault(module, {})[factor] = (key, suffix, tensor)
    for module in sorted(modules):
        _check_module_factors(modules[module], module, path)


def _check_module_factors(factors: dict[str, tuple[str, str, torch.Tensor]], module: str, path) -> None:
    first_key = min(key for key, _, _ in factors.values())
    suffixes = {suffix for _, suffix, _ in factors.values()}
    if not any(suffixes <= set(table.values()) for table in FACTOR_SUFFIXES.values()):
        raise ValueError(f"{path}: {first_key!r}: module {module!r} mixes kohya and diffusers key names")
    for needed in ("A", "B"):
        if needed not in factors:
            have = ", ".join(sorted(key for key, _, _ in factors.values()))
            raise ValueError(f"{path}: {first_key!r}: module {module!r} has no {'down (A)' if needed == 'A' else 'up (B)'} weight (found only {have})")
    key_a, _, a = factors["A"]
    key_b, _, b = factors["B"]
    if a.dim() not in (2, 4) or b.dim() != a.dim():
        raise ValueError(f"{path}: {key_a!r} has shape {tuple(a.shape)} and {key_b!r} {tuple(b.shape)}; expected 2-D (linear) or 4-D (conv) factors")
    r = a.shape[0]
    if r == 0:
        raise ValueError(f"{path}: {key_a!r} has rank 0")
    if b.shape[1] != r or (b.dim() == 4 and tuple(b.shape[2:]) != (1, 1)):
        raise ValueError(
            f"{path}: {key_b!r} has shape {tuple(b.shape)} but {key_a!r} has rank {r}: A (r x in), M (r x r) and B (out x r) must share r"
        )
    if "M" in factors:
        key_m, _, m = factors["M"]
        if tuple(m.shape) != (r, r):
            raise ValueError(f"{path}: {key_m!r} has shape {tuple(m.shape)} but {key_a!r} has rank {r}: the mixer must be {r} x {r}")
    if "alpha" in factors:
        key_alpha, _, alpha = factors["alpha"]
        if alpha.numel() != 1:
            raise ValueError(f"{path}: {key_alpha!r} has shape {tuple(alpha.shape)}; an alpha is one number")


def has_only_adapter_keys(tensors: dict[str, torch.Tensor]) -> bool:
    """True if every key is a LoRA factor of one of our three layouts (no other trainer's keys)."""
    return all(_split_factor(key)[0] is not None for key in tensors)


def detect_format(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: str | os.PathLike | None = None) -> str:
    """"native", "diffusers" or "kohya", from the keys and the safetensors metadata."""
    where = f"{path}: " if path is not None else ""
    if NATIVE_HEADER_KEY in (metadata or {}) or any(k.endswith(FACTOR_SUFFIXES["native"]["M"]) for k in tensors):
        return "native"
    kohya = [k for k in tensors if k.endswith(tuple(FACTOR_SUFFIXES["kohya"].values()))]
    peft = [k for k in tensors if k.endswith(tuple(FACTOR_SUFFIXES["diffusers"].values()))]
    if kohya and peft:
        raise ValueError(f"{where}mixes kohya keys ({kohya[0]!r}) and diffusers keys ({peft[0]!r})")
    if kohya:
        return "kohya"
    if peft:
        return "diffusers"
    first = next(iter(sorted(tensors)), None)
    raise ValueError(f"{where}no LoRA weights found (first key: {first!r})")


# ------------------------------------------------------------------------------------------------
# Reading


def find_adapter_file(path_or_dir: str | os.PathLike, weight_name: str | None = None, prefer: str = "native") -> Path:
    """The adapter file ``path_or_dir`` names: the file itself, or in a folder ``weight_name``, else the
    ``prefer``red layout's file, else any other of our three, else the folder's only .safetensors file."""
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
    order = [prefer] + [f for f in FORMATS if f != prefer]
    for fmt in order:
        if (path / WEIGHT_NAMES[fmt]).is_file():
            return path / WEIGHT_NAMES[fmt]
    candidates = sorted(p.name for p in path.glob("*.safetensors"))
    if len(candidates) == 1:
        return path / candidates[0]
    raise FileNotFoundError(
        f"{path}: no adapter file found (looked for {', '.join(WEIGHT_NAMES.values())}; "
        f"found {', '.join(candidates) or 'no .safetensors files'}); pass weight_name"
    )


def read_adapter_file(path_or_dir: str | os.PathLike, weight_name: str | None = None) -> AdapterState:
    """Read, validate and parse an adapter file of any of the three layouts."""
    path = find_adapter_file(path_or_dir, weight_name)
    tensors, metadata = load_safetensors(path)
    return parse_adapter_state_dict(tensors, metadata, path)


def parse_adapter_state_dict(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path) -> AdapterState:
    validate_adapter_state_dict(tensors, path)
    fmt = detect_format(tensors, metadata, path)
    parser = {"native": _parse_native, "diffusers": _parse_diffusers, "kohya": _parse_kohya}[fmt]
    state = parser(tensors, metadata or {}, path)
    state.source_format, state.source_path = fmt, Path(path)
    return state


def _group_modules(tensors: dict[str, torch.Tensor], layout: str) -> dict[str, dict[str, tuple[str, torch.Tensor]]]:
    suffixes = FACTOR_SUFFIXES[layout]
    modules: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    for key in sorted(tensors):
        for factor, suffix in suffixes.items():
            if key.endswith(suffix):
                modules.setdefault(key[: -len(suffix)], {})[factor] = (key, tensors[key])
                break
        else:
            raise ValueError(f"{key!r} is not a {layout} adapter key")  # caller adds the file name
    return modules


def _split_component(module: str, key: str, path, components) -> tuple[str, str]:
    component, _, rest = module.partition(".")
    if component not in components or not rest:
        raise ValueError(
            f"{path}: {key!r} does not start with a component of this adapter "
            f"({', '.join(c + '.' for c in components)})"
        )
    return component, rest


def _json_metadata(metadata: dict[str, str], key: str, path) -> dict:
    try:
        value = json.loads(metadata[key])
    except (ValueError, TypeError) as err:
        raise ValueError(f"{path}: metadata {key!r} is not valid JSON ({err})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: metadata {key!r} should be a JSON object")
    return value


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_component_config(config, component: str, path) -> dict:
    """``config`` (one component's LoRA settings, from a file's metadata) once every field the readers
    and loaders use has a usable value; else one ValueError naming ``path``, the component and the field."""
    where = f"{path}: metadata for {component}"
    if not isinstance(config, dict):
        raise ValueError(f"{where} should be a JSON object of LoRA settings, got {type(config).__name__}")

    def refuse(name: str, expected: str):
        raise ValueError(f"{where}: {name} should be {expected}, got {config.get(name)!r}")

    if not _is_int(config.get("r")) or config["r"] < 1:
        refuse("r", "a positive integer")
    if not _is_number(config.get("lora_alpha")):
        refuse("lora_alpha", "a finite number")
    for name in ("use_moslora", "use_rslora", "train_mixer"):
        if config.get(name) is not None and not isinstance(config[name], bool):
            refuse(name, "true or false")
    targets = config.get("target_modules")
    if not (targets is None or isinstance(targets, str) or isinstance(targets, list) and all(isinstance(t, str) for t in targets)):
        refuse("target_modules", "a list of module names or one pattern")
    patterns = {name: config.get(name) for name in ("rank_pattern", "alpha_pattern")}
    if isinstance(targets, str):
        patterns["target_modules"] = {targets: 1}  # PEFT matches a string as one regular expression
    if config.get("lora_dropout") is not None and not (_is_number(config["lora_dropout"]) and 0 <= config["lora_dropout"] <= 1):
        refuse("lora_dropout", "a number from 0 to 1")
    for name, valid, expected in (("rank_pattern", lambda v: _is_int(v) and v >= 1, "positive integers"), ("alpha_pattern", _is_number, "finite numbers")):
        value = config.get(name)
        if value is not None and (not isinstance(value, dict) or not all(isinstance(k, str) and valid(v) for k, v in value.items())):
            refuse(name, f"an object mapping module patterns to {expected}")
    for name, value in patterns.items():
        for pattern in value or {}:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"{where}: {name} {pattern!r} is not a valid pattern ({err})") from None
    if config.get("use_moslora"):
        if config.get("mixer_init") not in MIXER_INITS:
            refuse("mixer_init", f"one of {', '.join(MIXER_INITS)}")
        if config.get("rank_pattern") or config.get("alpha_pattern"):
            raise ValueError(f"{where}: a MoSLoRA component has one r and lora_alpha, but rank_pattern / alpha_pattern are set")
    return config


def _check_ranks_match_config(layers: dict[str, LayerFactors], config: dict, path) -> None:
    """Each layer's rank must be the one its config gives it (PEFT builds layers of that rank)."""
    for module_path, layer in sorted(layers.items(), key=lambda item: item[1].source_key):
        expected = config_rank(config, module_path)
        if layer.rank != expected:
            raise ValueError(f"{path}: {layer.source_key!r} has rank {layer.rank}, but the file's metadata gives this module rank {expected} (r / rank_pattern)")


def _checked_family(value, path) -> str | None:
    if value is not None and (not isinstance(value, str) or value not in FAMILIES):
        raise ValueError(f"{path}: the file names model family {value!r}, which is not one of {', '.join(FAMILIES)}")
    return value


def _parse_native(tensors, metadata, path) -> AdapterState:
    if NATIVE_HEADER_KEY not in metadata:
        first = next(k for k in sorted(tensors) if k.endswith(FACTOR_SUFFIXES["native"]["M"]))
        raise ValueError(f"{path}: {first!r} is a mixer, but the file has no {NATIVE_HEADER_KEY!r} header (not written by moslora-diffusion, or its metadata was stripped)")
    header = _json_metadata(metadata, NATIVE_HEADER_KEY, path)
    version = header.get("format_version")
    if not _is_int(version) or version < 1 or version > FORMAT_VERSION:
        raise ValueError(f"{path}: native format version {version!r} is not supported (this library reads up to {FORMAT_VERSION}); upgrade moslora-diffusion")
    configs = header.get("components") or {}
    if not isinstance(configs, dict):
        raise ValueError(f"{path}: the {NATIVE_HEADER_KEY!r} header's components should be a JSON object, got {type(configs).__name__}")
    for name in configs:
        if name not in KNOWN_COMPONENTS:
            raise ValueError(f"{path}: the {NATIVE_HEADER_KEY!r} header names component {name!r}; expected one of {', '.join(KNOWN_COMPONENTS)}")
    # Only the fields this library knows (a later version may add some); PEFT configs get built from them.
    components = {
        name: ComponentAdapter(config={k: v for k, v in check_component_config(cfg, name, path).items() if k in CONFIG_FIELDS}, layers={})
        for name, cfg in configs.items()
    }
    for field_name in ("base_model", "adapter_name"):
        if header.get(field_name) is not None and not isinstance(header[field_name], str):
            raise ValueError(f"{path}: the {NATIVE_HEADER_KEY!r} header's {field_name} should be a string, got {header[field_name]!r}")
    for module, factors in _group_modules_or_fail(tensors, "native", path).items():
        key_a = factors["A"][0]
        component, module_path = _split_component(module, key_a, path, components)
        config = components[component].config
        mixer = factors.get("M", (None, None))[1]
        if config.get("use_moslora") and mixer is None:
            raise ValueError(f"{path}: {key_a!r}: component {component!r} is MoSLoRA but this module has no lora_mixer weight")
        if not config.get("use_moslora") and mixer is not None:
            raise ValueError(f"{path}: {factors['M'][0]!r}: component {component!r} is not MoSLoRA (use_moslora false), yet this module has a mixer")
        components[component].layers[module_path] = LayerFactors(
            factors["A"][1], factors["B"][1], mixer, config_scale(config, module_path), key_a
        )
    components = {name: c for name, c in components.items() if c.layers}
    for name, adapter in components.items():
        _check_ranks_match_config(adapter.layers, adapter.config, path)
    return AdapterState(
        components, _checked_family(header.get("family"), path), header.get("base_model"), header.get("adapter_name") or "default"
    )


def _group_modules_or_fail(tensors, layout, path):
    try:
        return _group_modules(tensors, layout)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


def _parse_diffusers(tensors, metadata, path) -> AdapterState:
    lora_metadata = _json_metadata(metadata, DIFFUSERS_METADATA_KEY, path) if DIFFUSERS_METADATA_KEY in metadata else {}
    layers_by_component: dict[str, dict[str, LayerFactors]] = {}
    for module, factors in _group_modules_or_fail(tensors, "diffusers", path).items():
        key_a = factors["A"][0]
        component, module_path = _split_component(module, key_a, path, KNOWN_COMPONENTS)
        # Scale 1 until the config is known (diffusers' convention when a file has no metadata: alpha = r).
        layers_by_component.setdefault(component, {})[module_path] = LayerFactors(factors["A"][1], factors["B"][1], None, 1.0, key_a)
    components = {}
    for component, layers in layers_by_component.items():
        fields = {k.removeprefix(component + "."): v for k, v in lora_metadata.items() if k.startswith(component + ".")}
        config = infer_component_config(layers)
        if fields:
            missing = [k for k in ("r", "lora_alpha") if k not in fields]
            if missing:
                # diffusers would fill in LoraConfig's defaults (r = alpha = 8): refuse rather than guess.
                raise ValueError(f"{path}: metadata {DIFFUSERS_METADATA_KEY!r} sets {component} fields but not {' or '.join(missing)}")
            config.update({k: fields[k] for k in CONFIG_FIELDS if k in fields})
            config["use_moslora"], config["mixer_init"], config["train_mixer"] = False, None, None
            check_component_config(config, component, path)
            _check_ranks_match_config(layers, config, path)
        else:
            config["lora_alpha"] = config["r"]
            config["alpha_pattern"] = {_pattern_name(p): layer.rank for p, layer in layers.items() if layer.rank != config["r"]}
        for module_path, layer in layers.items():
            layer.scale = config_scale(config, module_path)
        components[component] = ComponentAdapter(config, layers)
    return AdapterState(components, _checked_family(metadata.get("moslora.family"), path), metadata.get("moslora.base_model"))


def _parse_kohya(tensors, metadata, path) -> AdapterState:
    layers_by_component: dict[str, dict[str, LayerFactors]] = {}
    for stem, factors in _group_modules_or_fail(tensors, "kohya", path).items():
        key_a = factors["A"][0]
        split = _split_kohya_stem(stem)
        if split is None:
            raise ValueError(f"{path}: {key_a!r} has no known kohya prefix (lora_unet_, lora_transformer_, lora_te_, lora_te1_, lora_te2_, lora_te3_)")
        component, rest = split
        down, up = factors["A"][1], factors["B"][1]
        # A missing alpha means alpha = rank (scale 1) in diffusers, ComfyUI and webui.
        alpha = float(factors["alpha"][1].item()) if "alpha" in factors else float(down.shape[0])
        layers_by_component.setdefault(component, {})[rest] = LayerFactors(down, up, None, alpha / down.shape[0], key_a)
    components = {c: ComponentAdapter(infer_component_config(layers), layers, resolved=False) for c, layers in layers_by_component.items()}
    family = _checked_family(metadata.get("moslora.family"), path)
    if family is None:
        by_version = {f.ss_base_model_version: name for name, f in FAMILIES.items()}
        family = by_version.get(metadata.get("ss_base_model_version", ""))
    return AdapterState(components, family, metadata.get("moslora.base_model") or metadata.get("ss_sd_model_name") or None)


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
        by_stem = {}
        for name, _ in model.named_modules():
            canonical = canonical_module_path(model, name)
            by_stem[canonical.replace(".", "_")] = canonical
        layers = {}
        for stem in sorted(adapter.layers, key=lambda s: adapter.layers[s].source_key):
            layer = adapter.layers[stem]
            if stem not in by_stem:
                raise ValueError(f"{state.source_path}: {layer.source_key!r} names no module of this pipeline's {component}; the file was made for another model")
            layers[by_stem[stem]] = layer
        config = infer_component_config(layers)
        components[component] = ComponentAdapter(config, layers, resolved=True)
    return replace(state, components=components)


# ------------------------------------------------------------------------------------------------
# Writing: state dicts and metadata of each layout


def _require_resolved(state: AdapterState, layout: str) -> None:
    for component, adapter in state.components.items():
        if not adapter.resolved:
            raise ValueError(
                f"{state.source_path or 'adapter'}: the {component} module names of a kohya file can only be "
                f"matched against a pipeline; load it with load_moslora_weights to write the {layout} layout"
            )


def _require_finite(tensors: dict[str, torch.Tensor], state: AdapterState) -> None:
    """Folding (B' = B M, alpha = s r) can overflow a half-precision B: refuse rather than write inf."""
    for key in sorted(tensors):
        if not bool(torch.isfinite(tensors[key]).all()):
            raise ValueError(
                f"{state.source_path or 'adapter'}: folding the mixer into {key!r} overflows {tensors[key].dtype}; "
                "the adapter's values are out of range (diverged training?)"
            )


def _info_metadata(state: AdapterState) -> dict[str, str]:
    from . import __version__

    info = {"moslora.version": __version__, "moslora.folded": "true" if state.has_mixer else "false"}
    if state.family:
        info["moslora.family"] = state.family
    if state.base_model:
        info["moslora.base_model"] = str(state.base_model)
    return info


def native_state_dict(state: AdapterState) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of the native layout (A, M, B unfolded; the versioned JSON header)."""
    from . import __version__

    _require_resolved(state, "native")
    tensors = {}
    for component, path, layer in state.layer_items():
        config = state.components[component].config
        expected = config_scale(config, path)
        if not math.isclose(layer.scale, expected, rel_tol=1e-6):
            raise ValueError(f"{component}.{path}: scale {layer.scale} differs from its config's {expected}; normalise the state first")
        suffix = FACTOR_SUFFIXES["native"]
        tensors[f"{component}.{path}{suffix['A']}"] = layer.lora_A
        if layer.mixer is not None:
            tensors[f"{component}.{path}{suffix['M']}"] = layer.mixer
        tensors[f"{component}.{path}{suffix['B']}"] = layer.lora_B
    header = {
        "format_version": FORMAT_VERSION,
        "library": "moslora-diffusion",
        "library_version": __version__,
        "family": state.family,
        "base_model": None if state.base_model is None else str(state.base_model),
        "adapter_name": state.adapter_name,
        "components": {c: a.config for c, a in state.components.items()},
    }
    return tensors, {"format": "pt", NATIVE_HEADER_KEY: json.dumps(header, sort_keys=True)}


def plain_lora_config_kwargs(config: dict) -> dict:
    """The folded file's lora_adapter_metadata for one component: plain LoraConfig fields only.

    Stock load_lora_weights builds ``LoraConfig(**metadata)`` and fails on any MoSLoRA field.
    """
    kwargs = {k: v for k, v in config.items() if k in CONFIG_FIELDS and k not in MOSLORA_ONLY_FIELDS}
    LoraConfig(**kwargs)  # fail here, not in the user's loader
    return kwargs


def folded_lora_b(state: AdapterState, component: str, path: str, layer: LayerFactors) -> torch.Tensor:
    """B' = B M, times any ratio between this layer's scale and its component config's (so one alpha fits all)."""
    folded = layer.folded_lora_b()
    ratio = layer.scale / config_scale(state.components[component].config, path)
    return folded if math.isclose(ratio, 1.0, rel_tol=1e-9) else (folded.double() * ratio).to(folded.dtype)


def diffusers_state_dict(state: AdapterState) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata that stock ``pipe.load_lora_weights`` loads (mixer folded into lora_B)."""
    _require_resolved(state, "diffusers")
    tensors, lora_metadata = {}, {}
    for component, adapter in state.components.items():
        lora_metadata.update({f"{component}.{k}": v for k, v in plain_lora_config_kwargs(adapter.config).items()})
    for component, path, layer in state.layer_items():
        tensors[f"{component}.{path}.lora_A.weight"] = layer.lora_A
        tensors[f"{component}.{path}.lora_B.weight"] = folded_lora_b(state, component, path, layer)
    _require_finite(tensors, state)
    metadata = {"format": "pt", DIFFUSERS_METADATA_KEY: json.dumps(lora_metadata, indent=2, sort_keys=True)}
    metadata.update(_info_metadata(state))
    return tensors, metadata


def kohya_state_dict(state: AdapterState, title: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of the kohya/webui layout: lora_down = A, lora_up = B M, alpha = s * r per module."""
    if state.family is None:
        raise ValueError(f"{state.source_path or 'adapter'}: the model family is unknown, so the kohya key prefixes are too")
    family = get_family(state.family)
    tensors: dict[str, torch.Tensor] = {}
    for component, path, layer in state.layer_items():
        stem = kohya_stem(kohya_prefix(family, component), path)
        if f"{stem}.lora_down.weight" in tensors:
            raise ValueError(f"{component}.{path}: two modules share the kohya name {stem!r}")
        tensors[f"{stem}.lora_down.weight"] = layer.lora_A
        tensors[f"{stem}.lora_up.weight"] = layer.folded_lora_b()
        # Every module gets its own alpha: clients disagree on what a missing one means.
        tensors[f"{stem}.alpha"] = torch.tensor(layer.scale * layer.rank, dtype=torch.float32)
    _require_finite(tensors, state)
    return tensors, kohya_metadata(state, family, title)


def kohya_metadata(state: AdapterState, family: type[Family], title: str | None) -> dict[str, str]:
    """The LoRA-card fields webui (A1111/Forge) and ComfyUI show, plus where the adapter came from."""
    from . import __version__

    denoiser = state.components.get(family.denoiser) or next(iter(state.components.values()))
    some_layer = next(iter(denoiser.layers.values()))
    kind = "MoSLoRA (mixture-of-subspaces LoRA, Wu et al. 2024)" if state.has_mixer else "LoRA"
    metadata = {
        "format": "pt",
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(some_layer.rank),
        "ss_network_alpha": str(float(some_layer.scale * some_layer.rank)),
        "ss_base_model_version": family.ss_base_model_version,
        "ss_v2": str(family.name == "sd2"),
        "ss_sd_model_name": str(state.base_model or ""),
        "ss_output_name": title or "",
        "ss_training_comment": (
            f"Trained as {kind} with moslora-diffusion {__version__}; the r x r mixer is folded into lora_up "
            "(B' = B M), so this is an exact plain LoRA."
            if state.has_mixer
            else f"Plain LoRA written by moslora-diffusion {__version__}."
        ),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": family.modelspec_architecture,
        "modelspec.title": title or "",
    }
    metadata.update(_info_metadata(state))
    return metadata


def layout_state_dict(state: AdapterState, layout: str, title: str | None = None):
    if layout == "native":
        return native_state_dict(state)
    if layout == "diffusers":
        return diffusers_state_dict(state)
    if layout == "kohya":
        return kohya_state_dict(state, title)
    raise ValueError(f"unknown adapter layout {layout!r}; expected one of {', '.join(FORMATS)}")


def write_adapter_files(
    state: AdapterState,
    directory: str | os.PathLike,
    layouts: tuple[str, ...] = FORMATS,
    title: str | None = None,
    overwrite: bool = True,
) -> dict[str, Path]:
    """Write ``state`` in each of ``layouts`` under its standard name in ``directory``; layout -> path.

    Every state dict is built (and checked) before the first byte is written; each file is written
    atomically (a temporary name, then a rename).
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise FileExistsError(f"{directory} exists and is not a folder")
    title = title or directory.resolve().name
    built = {layout: layout_state_dict(state, layout, title) for layout in layouts}
    targets = {layout: directory / WEIGHT_NAMES[layout] for layout in layouts}
    if not overwrite:
        existing = [str(p) for p in targets.values() if p.exists()]
        if existing:
            raise FileExistsError(f"{existing[0]} already exists; pass --overwrite to replace it")
    for layout, (tensors, metadata) in built.items():
        save_safetensors(tensors, targets[layout], metadata)
    return targets


# ------------------------------------------------------------------------------------------------
# Conversions between states


def as_moslora_state(state: AdapterState) -> AdapterState:
    """Every component as a MoSLoRA adapter with one rank and one scale; per-layer scale differences
    (and missing mixers, M = I) go into the mixer, so delta W is unchanged. Used to resume training
    from a folded or kohya file."""
    _require_resolved(state, "native")
    components = {}
    for component, adapter in state.components.items():
        ranks = {layer.rank for layer in adapter.layers.values()}
        if len(ranks) != 1:
            raise ValueError(f"{state.source_path}: {component} has layers of ranks {sorted(ranks)}; a trainable MoSLoRA adapter needs one rank")
        config = adapter.config if adapter.config.get("use_moslora") else infer_component_config(adapter.layers, use_moslora=True)
        layers = {}
        for path, layer in adapter.layers.items():
            ratio = layer.scale / config_scale(config, path)
            mixer = layer.mixer if layer.mixer is not None else torch.eye(layer.rank, dtype=layer.lora_A.dtype)
            if not math.isclose(ratio, 1.0, rel_tol=1e-9):
                mixer = (mixer.double() * ratio).to(mixer.dtype)
            layers[path] = replace(layer, mixer=mixer, scale=config_scale(config, path))
        components[component] = ComponentAdapter(config, layers)
    return replace(state, components=components)


@dataclass
class ResizeReport:
    """Per layer ("component.module"): the retained energy ||W_k||^2 / ||W||^2 and the singular values."""

    rank: int
    energy: dict[str, float] = field(default_factory=dict)
    singular_values: dict[str, list[float]] = field(default_factory=dict)

    def summary(self) -> str:
        values = list(self.energy.values())
        if not values:
            return f"rank {self.rank}: no layers"
        return (
            f"rank {self.rank}: {len(values)} layers, retained energy min {min(values):.6f}, "
            f"mean {sum(values) / len(values):.6f}, max {max(values):.6f}"
        )


def resize_adapter(state: AdapterState, rank: int) -> tuple[AdapterState, ResizeReport]:
    """The best rank-``rank`` approximation of every layer's s B M A (Eckart-Young, exact).

    With B = Q_B R_B and A^T = Q_A R_A (thin QR), s B M A = Q_B (s R_B M R_A^T) Q_A^T, so the SVD of the
    small r x r core U S V^T gives the SVD of the whole delta. Keeping k singular values:
    B_k = Q_B U_k sqrt(S_k / s'), A_k = sqrt(S_k / s') V_k^T Q_A^T, M_k = I, where s' is the scale of
    the resized config (same alpha, r = k). Layers whose delta has rank below k are zero-padded.
    """
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"--rank must be a positive integer, got {rank!r}")
    report = ResizeReport(rank)
    components = {}
    for component, adapter in state.components.items():
        largest = max(layer.rank for layer in adapter.layers.values())
        if rank > largest:
            raise ValueError(f"cannot resize {component} to rank {rank}: its rank is {largest} (resizing only shrinks)")
        config = dict(adapter.config, r=rank, rank_pattern={})
        layers = {}
        for path, layer in adapter.layers.items():
            new_scale = config_scale(config, path)
            layers[path], energy, values = _resize_layer(layer, rank, new_scale, keep_mixer=bool(config.get("use_moslora")))
            report.energy[f"{component}.{path}"] = energy
            report.singular_values[f"{component}.{path}"] = values
        components[component] = ComponentAdapter(config, layers, adapter.resolved)
    return replace(state, components=components), report


def _resize_layer(layer: LayerFactors, k: int, new_scale: float, keep_mixer: bool) -> tuple[LayerFactors, float, list[float]]:
    a = layer.lora_A.double().flatten(1)  # (r, in)
    b = layer.lora_B.double().flatten(1)  # (out, r)
    m = layer.mixer.double() if layer.mixer is not None else torch.eye(layer.rank, dtype=torch.float64)
    q_b, r_b = torch.linalg.qr(b)
    q_a, r_a = torch.linalg.qr(a.T)
    core = layer.scale * (r_b @ m @ r_a.T)
    u, s, vh = torch.linalg.svd(core)
    total = float((s**2).sum())
    kept = min(k, s.shape[0])
    energy = float((s[:kept] ** 2).sum()) / total if total > 0 else 1.0
    root = (s[:kept] / abs(new_scale)).sqrt()
    new_b = (q_b @ u[:, :kept]) * root * math.copysign(1.0, new_scale)
    new_a = root[:, None] * (vh[:kept] @ q_a.T)
    if kept < k:
        new_b = torch.cat([new_b, new_b.new_zeros(new_b.shape[0], k - kept)], dim=1)
        new_a = torch.cat([new_a, new_a.new_zeros(k - kept, new_a.shape[1])], dim=0)
    new_a = new_a.reshape(k, *layer.lora_A.shape[1:]).to(layer.lora_A.dtype)
    new_b = new_b.reshape(layer.lora_B.shape[0], k, *layer.lora_B.shape[2:]).to(layer.lora_B.dtype)
    mixer = torch.eye(k, dtype=layer.lora_A.dtype) if keep_mixer else None
    return LayerFactors(new_a, new_b, mixer, new_scale, layer.source_key), energy, [float(v) for v in s]


# ------------------------------------------------------------------------------------------------
# Mixer statistics (for inspect)


def mixer_statistics(mixer: torch.Tensor) -> dict[str, float]:
    """Singular values of M and how far M is from the identity (plain LoRA): ||M - I||_F / ||I||_F."""
    m = mixer.double()
    values = torch.linalg.svdvals(m)
    eye = torch.eye(m.shape[0], dtype=torch.float64)
    return {
        "singular_values": [float(v) for v in values],
        "sv_max": float(values[0]),
        "sv_min": float(values[-1]),
        "condition": float(values[0] / values[-1]) if float(values[-1]) > 0 else math.inf,
        "distance_from_identity": float(torch.linalg.matrix_norm(m - eye) / math.sqrt(m.shape[0])),
    }
