"""Flux and SD3 adapters under the original model's module names, as kohya sd-scripts writes them.

sd-scripts (networks/lora_flux.py, networks/lora_sd3.py), Forge and ComfyUI name Flux modules as Black
Forest Labs' model does (``lora_unet_double_blocks_0_img_attn_qkv``) and SD3 modules as Stability's MMDiT
does (``lora_unet_joint_blocks_0_x_block_attn_qkv``). There q, k and v are one fused Linear, and in
Flux's single blocks q, k, v and the MLP input are one (``linear1``). A per-projection adapter joins
exactly into a fused module:

    down  = [A_1; A_2; ...]                     (R x in, R = r_1 + r_2 + ...)
    up    = blockdiag(c_1 B_1, c_2 B_2, ...)    (D x R; rows of a part with no adapter stay zero)
    alpha = s R, so alpha / R = s and (alpha / R) up down = [s_1 B_1 A_1; s_2 B_2 A_2; ...]

with B_i already B_i M_i and c_i = s_i / s, s the most common part scale. The files we write fold s
into up as well (alpha = R): diffusers 0.42's reader of these files ignores the final layer's alpha.
:func:`split_fused` undoes it when ``up`` is block-diagonal; a fused adapter trained as one (a shared
down) is no per-projection adapter, and is refused unless the caller accepts each projection getting
the whole rank-R down.

Text encoders keep their own names under ``Family.sd_scripts_prefixes``: CLIP-L ``lora_te1_``, SD3's
CLIP-G ``lora_te2_``, T5 ``lora_te3_``. Which family a file is for shows in its block names
(``Family.sd_scripts_blocks``); the module table of each family is ``Family.sd_scripts_modules``.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

import torch

from ..families import FAMILIES, Family, get_family
from .checks import checked_family, require_finite
from .kohya import kohya_metadata, kohya_stem
from .state import AdapterState, ComponentAdapter, LayerFactors, infer_component_config, scaled

# Flux's MLP is 4x the hidden size (linear1 stacks q, k, v and the MLP input: 3 + 4 hidden sizes of rows).
FLUX_MLP_RATIO = 4.0


class NoSdScriptsName(ValueError):
    """An adapted module that sd-scripts' layout has no name for (Flux's final layer, say)."""


@dataclass(frozen=True)
class FusedModule:
    """One Linear of the original model: its name there, the diffusers modules whose output rows it
    stacks (in order), and how many rows each has (None for a one-part module)."""

    name: str
    parts: tuple[str, ...]
    dims: tuple[int, ...] | None = None
    # False where sd-scripts' network has no such module and diffusers' reader of its files drops it.
    sd_scripts_writes: bool = True


@dataclass
class Factors:
    """One adapted module: delta W = scale * B A (B already B M)."""

    lora_A: torch.Tensor
    lora_B: torch.Tensor
    scale: float
    source_key: str = ""  # the file key it was read from, for error messages


def _one(name: str, part: str) -> FusedModule:
    return FusedModule(name, (part,))


def flux_modules(config: dict) -> list[FusedModule]:
    """BFL's Flux Linears (double_blocks, single_blocks, embedders, final layer) for a FluxTransformer2DModel config."""
    hidden = config["num_attention_heads"] * config["attention_head_dim"]
    mlp_hidden = int(hidden * config.get("mlp_ratio", FLUX_MLP_RATIO))
    modules = []
    for i in range(config["num_layers"]):
        d, b = f"double_blocks.{i}", f"transformer_blocks.{i}"
        modules += [
            FusedModule(f"{d}.img_attn.qkv", tuple(f"{b}.attn.to_{x}" for x in "qkv"), (hidden,) * 3),
            FusedModule(f"{d}.txt_attn.qkv", tuple(f"{b}.attn.add_{x}_proj" for x in "qkv"), (hidden,) * 3),
            _one(f"{d}.img_attn.proj", f"{b}.attn.to_out.0"),
            _one(f"{d}.txt_attn.proj", f"{b}.attn.to_add_out"),
            _one(f"{d}.img_mlp.0", f"{b}.ff.net.0.proj"),
            _one(f"{d}.img_mlp.2", f"{b}.ff.net.2"),
            _one(f"{d}.txt_mlp.0", f"{b}.ff_context.net.0.proj"),
            _one(f"{d}.txt_mlp.2", f"{b}.ff_context.net.2"),
            _one(f"{d}.img_mod.lin", f"{b}.norm1.linear"),
            _one(f"{d}.txt_mod.lin", f"{b}.norm1_context.linear"),
        ]
    for i in range(config["num_single_layers"]):
        s, b = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        qkv_mlp = (*(f"{b}.attn.to_{x}" for x in "qkv"), f"{b}.proj_mlp")
        modules += [
            FusedModule(f"{s}.linear1", qkv_mlp, (hidden, hidden, hidden, mlp_hidden)),
            _one(f"{s}.linear2", f"{b}.proj_out"),
            _one(f"{s}.modulation.lin", f"{b}.norm.linear"),
        ]
    modules += [
        # ComfyUI maps it; sd-scripts never trains it and diffusers 0.42 drops its keys without a word.
        FusedModule("final_layer.linear", ("proj_out",), sd_scripts_writes=False),
        _one("img_in", "x_embedder"),
        _one("txt_in", "context_embedder"),
        _one("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1"),
        _one("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2"),
        _one("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
        _one("vector_in.out_layer", "time_text_embed.text_embedder.linear_2"),
    ]
    if config.get("guidance_embeds"):
        modules += [
            _one("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1"),
            _one("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2"),
        ]
    return modules


def sd3_modules(config: dict) -> list[FusedModule]:
    """Stability's MMDiT Linears (joint_blocks.N.{x,context}_block) for an SD3Transformer2DModel config.

    The last block's context stream is "pre only": q, k, v and nothing after them. Its adaLN has its
    scale and shift halves swapped against diffusers' norm1_context, so it is left out (no preset adapts it).
    """
    hidden = config["num_attention_heads"] * config["attention_head_dim"]
    dual = set(config.get("dual_attention_layers") or ())
    last = config["num_layers"] - 1
    modules = []
    for i in range(config["num_layers"]):
        j, b = f"joint_blocks.{i}", f"transformer_blocks.{i}"
        modules += [
            FusedModule(f"{j}.x_block.attn.qkv", tuple(f"{b}.attn.to_{x}" for x in "qkv"), (hidden,) * 3),
            _one(f"{j}.x_block.attn.proj", f"{b}.attn.to_out.0"),
            _one(f"{j}.x_block.mlp.fc1", f"{b}.ff.net.0.proj"),
            _one(f"{j}.x_block.mlp.fc2", f"{b}.ff.net.2"),
            _one(f"{j}.x_block.adaLN_modulation.1", f"{b}.norm1.linear"),
            FusedModule(f"{j}.context_block.attn.qkv", tuple(f"{b}.attn.add_{x}_proj" for x in "qkv"), (hidden,) * 3),
        ]
        if i != last:
            modules += [
                _one(f"{j}.context_block.attn.proj", f"{b}.attn.to_add_out"),
                _one(f"{j}.context_block.mlp.fc1", f"{b}.ff_context.net.0.proj"),
                _one(f"{j}.context_block.mlp.fc2", f"{b}.ff_context.net.2"),
                _one(f"{j}.context_block.adaLN_modulation.1", f"{b}.norm1_context.linear"),
            ]
        if i in dual:
            modules += [
                FusedModule(f"{j}.x_block.attn2.qkv", tuple(f"{b}.attn2.to_{x}" for x in "qkv"), (hidden,) * 3),
                _one(f"{j}.x_block.attn2.proj", f"{b}.attn2.to_out.0"),
            ]
    modules += [_one("final_layer.linear", "proj_out"), _one("context_embedder", "context_embedder")]
    return modules


def join_fused(module: FusedModule, layers: dict[str, Factors]) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(down, up, alpha) of ``module`` from the adapters on its parts (some may be missing: zero rows).

    (alpha / R) up @ down equals the parts' s_i B_i A_i stacked by rows, exactly up to one rounding of
    c_i B_i where a part's scale differs from the most common one.
    """
    present = [p for p in module.parts if p in layers]
    if not present:
        raise ValueError(f"{module.name}: none of {', '.join(module.parts)} is adapted")
    if len(module.parts) > 1 and module.dims is None:
        raise ValueError(f"{module.name}: a fused module needs the rows of each part")
    scale = Counter(layers[p].scale for p in present).most_common(1)[0][0]
    ranks = {p: layers[p].lora_A.shape[0] for p in present}
    total_rank = sum(ranks.values())
    first = layers[present[0]]
    dims = module.dims or (first.lora_B.shape[0],)
    down = torch.cat([layers[p].lora_A for p in present], dim=0)
    up = first.lora_B.new_zeros(sum(dims), total_rank)
    row, column = 0, 0
    for part, rows in zip(module.parts, dims):
        if part in layers:
            b = layers[part].lora_B
            if b.shape[0] != rows:
                raise ValueError(f"{module.name}: {part} has {b.shape[0]} output rows, the model's module {rows}")
            up[row : row + rows, column : column + ranks[part]] = scaled(b, layers[part].scale / scale, "lora_up")
            column += ranks[part]
        row += rows
    return down, up, scale * total_rank


def split_fused(
    module: FusedModule, down: torch.Tensor, up: torch.Tensor, alpha: float, allow_shared_down: bool = False
) -> dict[str, Factors]:
    """The per-projection adapters inside a fused one: exact when ``up`` is block-diagonal (each rank
    column feeds one part). Parts whose rows are all zero are left out. A shared down is refused
    unless ``allow_shared_down``: then each part gets the whole down (rank R) and its rows of up."""
    dims = module.dims or (up.shape[0],)
    if sum(dims) != up.shape[0]:
        raise ValueError(f"{module.name}: lora_up has {up.shape[0]} rows, the model's module {sum(dims)}")
    scale = alpha / down.shape[0]
    starts = [sum(dims[:i]) for i in range(len(dims))]
    blocks = {p: up[start : start + rows] for p, start, rows in zip(module.parts, starts, dims)}
    used = {p: (block != 0).any(dim=0) for p, block in blocks.items()}
    shared = sum(u.int() for u in used.values()) > 1
    if bool(shared.any()) and not allow_shared_down:
        raise ValueError(
            f"{module.name}: lora_up is not block-diagonal (rank columns feed several of {', '.join(module.parts)}), "
            "so it is not a per-projection adapter"
        )
    layers = {}
    for part, block in blocks.items():
        if not bool(used[part].any()):
            continue
        whole = allow_shared_down and bool(shared.any())
        columns = torch.arange(down.shape[0]) if whole else used[part].nonzero()[:, 0]
        layers[part] = Factors(down[columns], block[:, columns], scale)
    return layers


def sd_scripts_tensors(
    layers_by_component: dict[str, dict[str, Factors]], family: type[Family], denoiser_config: dict
) -> dict[str, torch.Tensor]:
    """Per-projection adapters (component -> diffusers module path -> Factors) in sd-scripts' layout:
    fused denoiser modules under ``lora_unet_`` + original names, text encoders under their
    ``sd_scripts_prefixes``, every module with ``lora_down``, ``lora_up`` = s x the up of :func:`join_fused`,
    and ``alpha`` = its rank (alpha / rank = 1). :class:`NoSdScriptsName` if a module has no such name."""
    prefixes = family.sd_scripts_prefixes
    out: dict[str, torch.Tensor] = {}

    def put(stem: str, down: torch.Tensor, up: torch.Tensor, alpha: float) -> None:
        # The scale goes into lora_up and alpha = rank: diffusers' sd-scripts Flux reader drops the
        # final layer's alpha (and a client that ignores alpha is then right too).
        rank = down.shape[0]
        out[f"{stem}.lora_down.weight"], out[f"{stem}.lora_up.weight"] = down, scaled(up, alpha / rank, "lora_up")
        out[f"{stem}.alpha"] = torch.tensor(float(rank), dtype=torch.float32)

    layers_by_component = dict(layers_by_component)
    denoiser_layers = layers_by_component.pop(family.denoiser, {})
    unplaced = set(denoiser_layers)
    for module in family.sd_scripts_modules(denoiser_config):
        if any(p in denoiser_layers for p in module.parts):
            if not module.sd_scripts_writes:
                raise NoSdScriptsName(
                    f"the adapter on {module.parts[0]!r} ({family.name} {module.name}) has no place in sd-scripts' "
                    "layout (sd-scripts has no such module; diffusers drops it); write the OneTrainer layout "
                    "(lora_transformer_)"
                )
            put(kohya_stem(prefixes[family.denoiser], module.name), *join_fused(module, denoiser_layers))
            unplaced -= set(module.parts)
    if unplaced:
        raise NoSdScriptsName(
            f"{len(unplaced)} adapted transformer modules have no {family.name} original-model name "
            f"(e.g. {min(unplaced)!r}); write the OneTrainer layout (lora_transformer_) instead"
        )
    for component, layers in layers_by_component.items():
        if component not in prefixes:
            raise ValueError(f"{family.name} files of sd-scripts have no prefix for {component!r}")
        for path, layer in layers.items():
            put(kohya_stem(prefixes[component], path), layer.lora_A, layer.lora_B, layer.scale * layer.lora_A.shape[0])
    return out


def sd_scripts_state_dict(
    state: AdapterState, title: str | None = None, denoiser_config: dict | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata (the kohya LoRA card) of ``state`` in sd-scripts' layout. ``denoiser_config``
    (the transformer's config) is inferred from the adapter's own module names and shapes if not given."""
    family = get_family(state.family) if state.family else None
    if family is None or not family.sd_scripts_prefixes:
        where = state.source_path or "adapter"
        raise ValueError(f"{where}: sd-scripts' original-model layout is for SD3 and Flux only")
    layers = {
        component: {p: Factors(layer.lora_A, layer.folded_lora_b(), layer.scale) for p, layer in adapter.layers.items()}
        for component, adapter in state.components.items()
    }
    if denoiser_config is None:
        rows = {path: f.lora_B.shape[0] for path, f in layers.get(family.denoiser, {}).items()}
        denoiser_config = denoiser_config_from_rows(rows)
    tensors = sd_scripts_tensors(layers, family, denoiser_config)
    require_finite(tensors, state.source_path)
    return tensors, kohya_metadata(state, family, title)


def _config(hidden: int | None, blocks: list[int], singles: list[int]) -> dict:
    num_layers = max(blocks) + 1 if blocks else 0
    return {
        "num_attention_heads": 1,
        "attention_head_dim": hidden or 0,
        "num_layers": num_layers,
        "num_single_layers": max(singles) + 1 if singles else 0,
        "mlp_ratio": FLUX_MLP_RATIO,
        "guidance_embeds": True,  # names that match nothing are never used
        "dual_attention_layers": tuple(range(num_layers)),
    }


def denoiser_config_from_rows(rows: dict[str, int]) -> dict:
    """A denoiser config for the module tables from adapted diffusers module paths and their output rows:
    the hidden size from a q/k/v projection (or a Flux proj_mlp, 4x wide), block counts from the paths."""
    blocks = [int(m.group(1)) for p in rows if (m := re.match(r"transformer_blocks\.(\d+)\.", p))]
    singles = [int(m.group(1)) for p in rows if (m := re.match(r"single_transformer_blocks\.(\d+)\.", p))]
    hidden = None
    for path, out_rows in sorted(rows.items()):
        if re.search(r"\.attn2?\.(to_[qkv]|add_[qkv]_proj)$", path):
            hidden = out_rows
        elif path.endswith(".proj_mlp"):
            hidden = round(out_rows / FLUX_MLP_RATIO)
    return _config(hidden, blocks, singles)


# Original-name endings whose lora_up rows are a known multiple of the hidden size.
_HIDDEN_MULTIPLES = {
    "attn_qkv": 3, "attn2_qkv": 3, "attn_proj": 1, "attn2_proj": 1, "linear1": 3 + FLUX_MLP_RATIO, "linear2": 1,
}  # fmt: skip


def denoiser_config_from_file(tensors: dict[str, torch.Tensor], family: type[Family]) -> dict:
    """A denoiser config for ``family``'s module table from a file's own stems and lora_up shapes."""
    prefix = family.sd_scripts_prefixes[family.denoiser]
    counts: dict[str, list[int]] = {block: [] for block in family.sd_scripts_blocks}
    hidden = None
    for key in tensors:
        if not (key.startswith(prefix + "_") and key.endswith(".lora_up.weight")):
            continue
        stem = key.removesuffix(".lora_up.weight")
        for block in family.sd_scripts_blocks:
            if m := re.match(rf"{prefix}_{block}_(\d+)_", stem):
                counts[block].append(int(m.group(1)))
        for ending, multiple in _HIDDEN_MULTIPLES.items():
            if stem.endswith("_" + ending):
                hidden = round(tensors[key].shape[0] / multiple)
    first, *rest = family.sd_scripts_blocks
    return _config(hidden, counts[first], counts[rest[0]] if rest else [])


def read_sd_scripts_state_dict(
    tensors: dict[str, torch.Tensor],
    family: str | type[Family],
    denoiser_config: dict | None = None,
    allow_shared_down: bool = False,
    where="adapter",
) -> dict[str, dict[str, Factors]]:
    """component -> {diffusers module path (text encoders: kohya stem after the prefix) -> Factors}.

    Denoiser modules are split back into diffusers' per-projection modules (:func:`split_fused`);
    text-encoder names keep their dots-as-underscores stem for the caller to match against a model.
    A missing alpha means alpha = rank (scale 1), as sd-scripts reads it.
    """
    family = get_family(family) if isinstance(family, str) else family
    denoiser_config = denoiser_config or denoiser_config_from_file(tensors, family)
    prefixes = family.sd_scripts_prefixes
    components = {prefix: component for component, prefix in prefixes.items()}
    denoiser_prefix = prefixes[family.denoiser]
    fused = {kohya_stem(denoiser_prefix, m.name): m for m in family.sd_scripts_modules(denoiser_config)}
    result: dict[str, dict[str, Factors]] = {}
    for key in sorted(k for k in tensors if k.endswith(".lora_down.weight")):
        stem = key.removesuffix(".lora_down.weight")
        down, up = tensors[key], tensors[f"{stem}.lora_up.weight"]
        alpha = float(tensors[f"{stem}.alpha"]) if f"{stem}.alpha" in tensors else float(down.shape[0])
        if stem in fused:
            try:
                parts = split_fused(fused[stem], down, up, alpha, allow_shared_down)
            except ValueError as err:
                raise ValueError(f"{where}: {key!r}: {err}") from None
            for factors in parts.values():
                factors.source_key = key
            result.setdefault(family.denoiser, {}).update(parts)
            continue
        prefix = next((p for p in sorted(components, key=len, reverse=True) if stem.startswith(p + "_")), None)
        if prefix is None or prefix == denoiser_prefix:
            raise ValueError(f"{where}: {key!r} names no {family.name} module that sd-scripts writes")
        factors = Factors(down, up, alpha / down.shape[0], key)
        result.setdefault(components[prefix], {})[stem[len(prefix) + 1 :]] = factors
    return result


def sd_scripts_family(tensors: dict[str, torch.Tensor]) -> type[Family] | None:
    """The family whose sd-scripts block names (lora_unet_double_blocks_N_..., ...) the file's keys use."""
    for family in FAMILIES.values():
        prefix = family.sd_scripts_prefixes.get(family.denoiser)
        if prefix and any(k.startswith(tuple(f"{prefix}_{b}_" for b in family.sd_scripts_blocks)) for k in tensors):
            return family
    return None


def parse_sd_scripts(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path) -> AdapterState:
    """The AdapterState of an sd-scripts Flux or SD3 file: denoiser modules split back into diffusers'
    (resolved), text-encoder names still kohya stems (``resolved`` False) until matched against a model."""
    family = sd_scripts_family(tensors)
    named = checked_family(metadata.get("moslora.family"), path)
    if family is None or (named is not None and named != family.name):
        raise ValueError(f"{path}: its metadata says {named}, but its keys are sd-scripts' names of another family")
    components = {}
    for component, factors in read_sd_scripts_state_dict(tensors, family, where=path).items():
        layers = {p: LayerFactors(f.lora_A, f.lora_B, None, f.scale, f.source_key) for p, f in factors.items()}
        resolved = component == family.denoiser
        components[component] = ComponentAdapter(infer_component_config(layers), layers, resolved=resolved)
    base_model = metadata.get("moslora.base_model") or metadata.get("ss_sd_model_name") or None
    return AdapterState(components, family.name, base_model)


__all__ = [
    "FLUX_MLP_RATIO",
    "Factors",
    "FusedModule",
    "NoSdScriptsName",
    "denoiser_config_from_file",
    "denoiser_config_from_rows",
    "flux_modules",
    "join_fused",
    "parse_sd_scripts",
    "read_sd_scripts_state_dict",
    "sd3_modules",
    "sd_scripts_family",
    "sd_scripts_state_dict",
    "sd_scripts_tensors",
    "split_fused",
]
