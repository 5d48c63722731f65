"""Checks of adapter files: every tensor, every module's factors, every config field, and the layout.

Each check raises one ValueError naming the file and the first offending key or field, so a broken
file is refused before any loader guesses around the damage.
"""

from __future__ import annotations

import json
import math
import os
import re

import torch

from ..config import MIXER_INITS
from ..families import FAMILIES
from .names import COMFYUI_DENOISER_PREFIX, FACTOR_SUFFIXES, NATIVE_HEADER_KEY, split_factor
from .state import LayerFactors, config_rank

LORA_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_adapter_tensor(key: str, tensor: torch.Tensor, path: str | os.PathLike) -> None:
    """One ValueError naming ``path`` and ``key`` unless ``tensor`` is a finite fp16/bf16/fp32/fp64 tensor.

    Applies to any LoRA file, whatever its key layout (merge checks other trainers' files with it too).
    """
    if tensor.dtype not in LORA_DTYPES:
        # float8/float4 pass is_floating_point() but torch cannot even check them for NaN.
        raise ValueError(
            f"{path}: {key!r} has dtype {tensor.dtype}; LoRA weights are float16, bfloat16, float32 or float64"
        )
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{path}: {key!r} holds NaN or infinite values; the adapter is broken (diverged training?)")


def validate_adapter_state_dict(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike, allow_unknown_keys: bool = False
) -> None:
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
        factor, module, suffix = split_factor(key)
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
    for needed, name in (("A", "down (A)"), ("B", "up (B)")):
        if needed not in factors:
            have = ", ".join(sorted(key for key, _, _ in factors.values()))
            raise ValueError(f"{path}: {first_key!r}: module {module!r} has no {name} weight (found only {have})")
    key_a, _, a = factors["A"]
    key_b, _, b = factors["B"]
    if a.dim() not in (2, 4) or b.dim() != a.dim():
        raise ValueError(
            f"{path}: {key_a!r} has shape {tuple(a.shape)} and {key_b!r} {tuple(b.shape)}; "
            "expected 2-D (linear) or 4-D (conv) factors"
        )
    r = a.shape[0]
    if r == 0:
        raise ValueError(f"{path}: {key_a!r} has rank 0")
    if b.shape[1] != r or (b.dim() == 4 and tuple(b.shape[2:]) != (1, 1)):
        raise ValueError(
            f"{path}: {key_b!r} has shape {tuple(b.shape)} but {key_a!r} has rank {r}: "
            "A (r x in), M (r x r) and B (out x r) must share r"
        )
    if "M" in factors:
        key_m, _, m = factors["M"]
        if tuple(m.shape) != (r, r):
            raise ValueError(
                f"{path}: {key_m!r} has shape {tuple(m.shape)} but {key_a!r} has rank {r}: the mixer must be {r} x {r}"
            )
    if "alpha" in factors:
        key_alpha, _, alpha = factors["alpha"]
        if alpha.numel() != 1:
            raise ValueError(f"{path}: {key_alpha!r} has shape {tuple(alpha.shape)}; an alpha is one number")


def has_only_adapter_keys(tensors: dict[str, torch.Tensor]) -> bool:
    """True if every key is a LoRA factor of one of our three layouts (no other trainer's keys)."""
    return all(split_factor(key)[0] is not None for key in tensors)


def detect_format(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: str | os.PathLike | None = None
) -> str:
    """ "native", "diffusers", "kohya", "sd_scripts" (Flux/SD3 original names) or "comfyui" (ComfyUI's
    ``diffusion_model.<original name>`` keys), from the keys and metadata."""
    where = f"{path}: " if path is not None else ""
    if NATIVE_HEADER_KEY in (metadata or {}) or any(k.endswith(FACTOR_SUFFIXES["native"]["M"]) for k in tensors):
        return "native"
    if any(k.startswith(COMFYUI_DENOISER_PREFIX) for k in tensors):
        return "comfyui"
    # ".alpha" is both layouts' suffix: the A and B keys tell them apart.
    kohya = [k for k in tensors if k.endswith((FACTOR_SUFFIXES["kohya"]["A"], FACTOR_SUFFIXES["kohya"]["B"]))]
    peft = [k for k in tensors if k.endswith((FACTOR_SUFFIXES["diffusers"]["A"], FACTOR_SUFFIXES["diffusers"]["B"]))]
    if kohya and peft:
        raise ValueError(f"{where}mixes kohya keys ({kohya[0]!r}) and diffusers keys ({peft[0]!r})")
    if kohya:
        # sd-scripts' Flux / SD3 files name the original model's (fused) modules: lora_unet_double_blocks_0_...
        blocks = [
            f"{f.sd_scripts_prefixes[f.denoiser]}_{block}_"
            for f in FAMILIES.values()
            if f.sd_scripts_prefixes
            for block in f.sd_scripts_blocks
        ]
        return "sd_scripts" if any(k.startswith(tuple(blocks)) for k in kohya) else "kohya"
    if peft:
        return "diffusers"
    first = next(iter(sorted(tensors)), None)
    raise ValueError(f"{where}no LoRA weights found (first key: {first!r})")


def require_finite(tensors: dict[str, torch.Tensor], where) -> None:
    """Folding (B' = B M, alpha = s r) can overflow a half-precision B: refuse rather than write inf."""
    for key in sorted(tensors):
        if not bool(torch.isfinite(tensors[key]).all()):
            raise ValueError(
                f"{where or 'adapter'}: folding the mixer into {key!r} overflows {tensors[key].dtype}; "
                "the adapter's values are out of range (diverged training?)"
            )


def json_metadata(metadata: dict[str, str], key: str, path) -> dict:
    """The JSON object stored under metadata ``key``; one ValueError naming ``path`` otherwise."""
    try:
        value = json.loads(metadata[key])
    except (ValueError, TypeError) as err:
        raise ValueError(f"{path}: metadata {key!r} is not valid JSON ({err})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: metadata {key!r} should be a JSON object")
    return value


def is_int(value) -> bool:
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

    if not is_int(config.get("r")) or config["r"] < 1:
        refuse("r", "a positive integer")
    if not _is_number(config.get("lora_alpha")):
        refuse("lora_alpha", "a finite number")
    for name in ("use_moslora", "use_rslora", "train_mixer"):
        if config.get(name) is not None and not isinstance(config[name], bool):
            refuse(name, "true or false")
    targets = config.get("target_modules")
    is_name_list = isinstance(targets, list) and all(isinstance(t, str) for t in targets)
    if not (targets is None or isinstance(targets, str) or is_name_list):
        refuse("target_modules", "a list of module names or one pattern")
    patterns = {name: config.get(name) for name in ("rank_pattern", "alpha_pattern")}
    if isinstance(targets, str):
        patterns["target_modules"] = {targets: 1}  # PEFT matches a string as one regular expression
    dropout = config.get("lora_dropout")
    if dropout is not None and not (_is_number(dropout) and 0 <= dropout <= 1):
        refuse("lora_dropout", "a number from 0 to 1")
    pattern_values = (
        ("rank_pattern", lambda v: is_int(v) and v >= 1, "positive integers"),
        ("alpha_pattern", _is_number, "finite numbers"),
    )
    for name, valid, expected in pattern_values:
        value = config.get(name)
        if value is None:
            continue
        if not isinstance(value, dict) or not all(isinstance(k, str) and valid(v) for k, v in value.items()):
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
            raise ValueError(
                f"{where}: a MoSLoRA component has one r and lora_alpha, but rank_pattern / alpha_pattern are set"
            )
    return config


def check_ranks_match_config(layers: dict[str, LayerFactors], config: dict, path) -> None:
    """Each layer's rank must be the one its config gives it (PEFT builds layers of that rank)."""
    for module_path, layer in sorted(layers.items(), key=lambda item: item[1].source_key):
        expected = config_rank(config, module_path)
        if layer.rank != expected:
            raise ValueError(
                f"{path}: {layer.source_key!r} has rank {layer.rank}, but the file's metadata gives this module "
                f"rank {expected} (r / rank_pattern)"
            )


def checked_family(value, path) -> str | None:
    """A family name from a file's metadata, or None; one ValueError if it names no family we know."""
    if value is not None and (not isinstance(value, str) or value not in FAMILIES):
        raise ValueError(f"{path}: the file names model family {value!r}, which is not one of {', '.join(FAMILIES)}")
    return value
