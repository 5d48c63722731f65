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
:func:`split_fused` undoes it
when ``up`` is block-diagonal; a fused adapter trained as one (a shared down) is no per-projection
adapter, and is refused unless the caller accepts each projection getting the whole rank-R down.

Text encoders keep their own names: CLIP-L ``lora_te1_``, SD3's CLIP-G ``lora_te2_``, T5 ``lora_te3_``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

from .client_layouts import module_scales, peft_modules
from .formats import kohya_stem

# The kohya prefix of each component in sd-scripts' files (lora_flux.py / lora_sd3.py LORA_PREFIX_*).
SD_SCRIPTS_PREFIXES = {
    "flux": {"transformer": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te3"},
    "sd3": {
        "transformer": "lora_unet",
        "text_encoder": "lora_te1",
        "text_encoder_2": "lora_te2",
        "text_encoder_3": "lora_te3",
    },
}


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


def _one(name: str, part: str) -> FusedModule:
    return FusedModule(name, (part,))


def flux_modules(config: dict) -> list[FusedModule]:
    """BFL's Flux Linears (double_blocks, single_blocks, embedders, final layer) for a FluxTransformer2DModel config."""
    hidden = config["num_attention_heads"] * config["attention_head_dim"]
    mlp_hidden = int(hidden * config.get("mlp_ratio", 4.0))
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


MODULE_TABLES = {"flux": flux_modules, "sd3": sd3_modules}


def _times(tensor: torch.Tensor, factor: float) -> torch.Tensor:
    """factor * tensor computed in at least fp32, in the tensor's dtype; refuses an overflow."""
    if factor == 1.0:
        return tensor
    out = (tensor.to(torch.promote_types(tensor.dtype, torch.float32)) * factor).to(tensor.dtype)
    if not bool(torch.isfinite(out).all()):
        raise ValueError(f"scaling lora_up by {factor} overflows {tensor.dtype}; write the adapter in float32")
    return out


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
            up[row : row + rows, column : column + ranks[part]] = _times(b, layers[part].scale / scale)
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


def sd_scripts_state_dict(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str], family: str, denoiser_config: dict
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Our folded diffusers state dict (``formats.diffusers_state_dict``) in sd-scripts' layout:
    fused denoiser modules under ``lora_unet_`` + original names, text encoders under ``lora_te{1,2,3}_``,
    every module with ``lora_down``, ``lora_up`` = s x the up of :func:`join_fused`, and ``alpha`` = its
    rank (alpha / rank = 1). ``lora_adapter_metadata`` is dropped."""
    prefixes = SD_SCRIPTS_PREFIXES[family]
    scales = module_scales(tensors, metadata)
    by_component: dict[str, dict[str, Factors]] = {}
    for (component, path), (a, b) in peft_modules(tensors).items():
        by_component.setdefault(component, {})[path] = Factors(a, b, scales[(component, path)])
    out: dict[str, torch.Tensor] = {}

    def put(stem: str, down: torch.Tensor, up: torch.Tensor, alpha: float) -> None:
        # The scale goes into lora_up and alpha = rank: diffusers' sd-scripts Flux reader drops the
        # final layer's alpha (and a client that ignores alpha is then right too).
        rank = down.shape[0]
        out[f"{stem}.lora_down.weight"], out[f"{stem}.lora_up.weight"] = down, _times(up, alpha / rank)
        out[f"{stem}.alpha"] = torch.tensor(float(rank), dtype=torch.float32)

    denoiser_layers = by_component.pop("transformer", {})
    unplaced = set(denoiser_layers)
    for module in MODULE_TABLES[family](denoiser_config):
        if any(p in denoiser_layers for p in module.parts):
            if not module.sd_scripts_writes:
                raise ValueError(
                    f"the adapter on {module.parts[0]!r} ({family} {module.name}) has no place in sd-scripts' layout "
                    "(sd-scripts has no such module; diffusers drops it); "
                    "write the OneTrainer layout (lora_transformer_)"
                )
            put(kohya_stem(prefixes["transformer"], module.name), *join_fused(module, denoiser_layers))
            unplaced -= set(module.parts)
    if unplaced:
        raise ValueError(
            f"{len(unplaced)} adapted transformer modules have no {family} original-model name "
            f"(e.g. {min(unplaced)!r}); write the OneTrainer layout (lora_transformer_) instead"
        )
    for component, layers in by_component.items():
        if component not in prefixes:
            raise ValueError(f"{family} files of sd-scripts have no prefix for {component!r}")
        for path, layer in layers.items():
            put(kohya_stem(prefixes[component], path), layer.lora_A, layer.lora_B, layer.scale * layer.lora_A.shape[0])
    return out, {k: v for k, v in metadata.items() if k != "lora_adapter_metadata"}


def read_sd_scripts_state_dict(
    tensors: dict[str, torch.Tensor], family: str, denoiser_config: dict, allow_shared_down: bool = False
) -> dict[str, dict[str, Factors]]:
    """component -> {diffusers module path (text encoders: kohya stem after the prefix) -> Factors}.

    Denoiser modules are split back into diffusers' per-projection modules (:func:`split_fused`);
    text-encoder names keep their dots-as-underscores stem for the caller to match against a model.
    A missing alpha means alpha = rank (scale 1), as sd-scripts reads it.
    """
    components = {prefix: component for component, prefix in SD_SCRIPTS_PREFIXES[family].items()}
    fused = {kohya_stem("lora_unet", m.name): m for m in MODULE_TABLES[family](denoiser_config)}
    result: dict[str, dict[str, Factors]] = {}
    for key in sorted(k for k in tensors if k.endswith(".lora_down.weight")):
        stem = key.removesuffix(".lora_down.weight")
        down, up = tensors[key], tensors[f"{stem}.lora_up.weight"]
        alpha = float(tensors[f"{stem}.alpha"]) if f"{stem}.alpha" in tensors else float(down.shape[0])
        if stem in fused:
            result.setdefault("transformer", {}).update(split_fused(fused[stem], down, up, alpha, allow_shared_down))
            continue
        prefix = next((p for p in sorted(components, key=len, reverse=True) if stem.startswith(p + "_")), None)
        if prefix is None or prefix == "lora_unet":
            raise ValueError(f"{key!r} names no {family} module that sd-scripts writes")
        result.setdefault(components[prefix], {})[stem[len(prefix) + 1 :]] = Factors(down, up, alpha / down.shape[0])
    return result
