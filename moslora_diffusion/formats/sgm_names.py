"""The original (SGM / LDM) module names of a diffusers UNet, as other trainers' kohya files use them.

sd-scripts trains SDXL on Stability's own UNet (``sdxl_original_unet.py``), so its SDXL files say
``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`` where ours say
``lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q``. Block by block, with
L = layers_per_block and n levels:

    down_blocks.i.{resnets,attentions}.j     input_blocks.{1 + i (L+1) + j}.{0,1}
    down_blocks.i.downsamplers.0.conv        input_blocks.{(i+1)(L+1)}.0.op
    mid_block.resnets.0 / attentions.0 / resnets.1     middle_block.0 / .1 / .2
    up_blocks.i.{resnets,attentions}.j       output_blocks.{i (L+1) + j}.{0,1}   (L+1 layers per up level)
    up_blocks.i.upsamplers.0.conv            output_blocks.{i (L+1) + L}.{1, or 2 after an attention}.conv

Inside a transformer block the names are the same; inside a resnet, conv1 is in_layers.2, conv2
out_layers.3, time_emb_proj emb_layers.1, conv_shortcut skip_connection (and the norms in/out_layers.0).
This matches ComfyUI's ``comfy.utils.unet_to_diffusers`` (checked in tests/test_formats_sgm_names.py).

Our SDXL kohya file is written in these names (``Family.kohya_file_layout = "kohya_sgm"``):
:func:`with_sgm_unet_names`. Only L matters for the module inside a block (and which up levels hold an
attention, for the upsampler's slot), so without the UNet's config L is read from the adapter itself:
an up level has L + 1 resnets / attentions.
"""

from __future__ import annotations

import re
from dataclasses import replace

from .state import AdapterState, ComponentAdapter

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}  # fmt: skip
_TOP = {
    "conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0", "conv_out": "out.2",
}  # fmt: skip


# A diffusers block (resnet, attention, down/upsampler conv), then the module inside it.
_BLOCK = re.compile(
    r"((?:down_blocks|up_blocks)\.\d+\.(?:resnets|attentions)\.\d+|mid_block\.(?:resnets|attentions)\.\d+"
    r"|(?:down_blocks|up_blocks)\.\d+\.(?:down|up)samplers\.0\.conv)(\.(.*))?$"
)


def _block_prefixes(config) -> dict[str, tuple[str, bool]]:
    """diffusers block prefix -> (SGM prefix, is a resnet) for a UNet2DConditionModel config."""
    levels = len(config["block_out_channels"])
    per_level = config["layers_per_block"]
    per_level = [per_level] * levels if isinstance(per_level, int) else list(per_level)
    table: dict[str, tuple[str, bool]] = {}
    index = 1
    for i in range(levels):
        for j in range(per_level[i]):
            table[f"down_blocks.{i}.resnets.{j}"] = (f"input_blocks.{index}.0", True)
            table[f"down_blocks.{i}.attentions.{j}"] = (f"input_blocks.{index}.1", False)
            index += 1
        if i < levels - 1:
            table[f"down_blocks.{i}.downsamplers.0.conv"] = (f"input_blocks.{index}.0.op", False)
            index += 1
    table["mid_block.resnets.0"] = ("middle_block.0", True)
    table["mid_block.attentions.0"] = ("middle_block.1", False)
    table["mid_block.resnets.1"] = ("middle_block.2", True)
    index = 0
    up_per_level = list(reversed(per_level))
    up_types = config.get("up_block_types") or ()
    for i in range(levels):
        has_attention = i < len(up_types) and "CrossAttn" in up_types[i]
        for j in range(up_per_level[i] + 1):
            table[f"up_blocks.{i}.resnets.{j}"] = (f"output_blocks.{index}.0", True)
            table[f"up_blocks.{i}.attentions.{j}"] = (f"output_blocks.{index}.1", False)
            if j == up_per_level[i] and i < levels - 1:
                after = 2 if has_attention else 1  # the upsampler follows the resnet (and the attention)
                table[f"up_blocks.{i}.upsamplers.0.conv"] = (f"output_blocks.{index}.{after}.conv", False)
            index += 1
    return table


def sgm_module_names(config, module_paths) -> dict[str, str]:
    """SGM name -> diffusers module path, for each of ``module_paths`` of a UNet with ``config``
    (a UNet2DConditionModel config, as a mapping) that has one."""
    blocks = _block_prefixes(config)
    names = {}
    for path in module_paths:
        if path in _TOP:
            names[_TOP[path]] = path
            continue
        match = _BLOCK.match(path)
        if match is None or match.group(1) not in blocks:
            continue
        prefix, is_resnet = blocks[match.group(1)]
        rest = match.group(3)
        if rest is None:
            names[prefix] = path
        elif is_resnet:
            if rest in _RESNET:
                names[f"{prefix}.{_RESNET[rest]}"] = path
        else:
            names[f"{prefix}.{rest}"] = path
    return names


class NoSgmName(ValueError):
    """An adapted UNet module with no SGM name, or an adapter whose UNet layout cannot be read from it."""


_LEVEL = re.compile(r"(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)")


def unet_layout_of_paths(paths) -> dict:
    """The part of a UNet config :func:`sgm_module_names` reads, from adapted module paths alone.

    L = the highest resnet / attention index in an up level (L + 1 each); levels and the up levels with an
    attention are those the paths show. NoSgmName when no up-level block is adapted but a down level past
    the first is (its SGM index 1 + i (L+1) + j needs L).
    """
    seen: dict[str, dict[int, set]] = {"down_blocks": {}, "up_blocks": {}}
    indices = {"down_blocks": [], "up_blocks": []}
    for path in paths:
        match = _LEVEL.match(path)
        if match:
            where, level, kind, index = match.group(1), int(match.group(2)), match.group(3), int(match.group(4))
            seen[where].setdefault(level, set()).add(kind)
            if kind in ("resnets", "attentions"):
                indices[where].append((level, index))
    if indices["up_blocks"]:
        per_level = max(index for _, index in indices["up_blocks"])
    elif any(level > 0 for level, _ in indices["down_blocks"]):
        raise NoSgmName("the adapter touches no up block, so the UNet's layers_per_block cannot be read from it")
    else:
        per_level = max((index + 1 for _, index in indices["down_blocks"]), default=1)
    levels = 2 + max((level for where in seen.values() for level in where), default=0)
    up_types = [
        "CrossAttnUpBlock2D" if "attentions" in seen["up_blocks"].get(i, ()) else "UpBlock2D" for i in range(levels)
    ]
    return {"block_out_channels": [0] * levels, "layers_per_block": per_level, "up_block_types": up_types}


def with_sgm_unet_names(state: AdapterState, unet: str, unet_config=None) -> AdapterState:
    """``state`` with the resolved UNet component ``unet`` under SGM module paths (input_blocks.4.1....).

    ``unet_config``: the UNet's config (a mapping); None reads the layout from the adapter
    (:func:`unet_layout_of_paths`). NoSgmName if a module has no SGM name. A component whose names are
    still kohya stems (a file read without its model) is kept as it is.
    """
    adapter = state.components.get(unet)
    if adapter is None or not adapter.resolved:
        return state
    config = unet_config if unet_config is not None else unet_layout_of_paths(adapter.layers)
    sgm_of = {path: sgm for sgm, path in sgm_module_names(config, adapter.layers).items()}
    missing = sorted(set(adapter.layers) - set(sgm_of))
    if missing:
        raise NoSgmName(f"{unet} module {missing[0]!r} has no name in Stability's original UNet")
    layers = {sgm_of[path]: layer for path, layer in adapter.layers.items()}
    renamed = ComponentAdapter(adapter.config, layers, resolved=False)
    return replace(state, components={**state.components, unet: renamed})
