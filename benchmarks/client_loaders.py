"""Our LoRA files read by kohya sd-scripts' own loaders: modules matched, keys left over, deltas equal.

    python benchmarks/client_loaders.py --sd_scripts /path/to/sd-scripts [--families sd15 sdxl flux sd3]

For each family this builds the denoiser twice on the meta device (no weights, no download): diffusers'
class with the reference repository's config, and sd-scripts' own class (original_unet.py,
sdxl_original_unet.py, flux_models.Flux "dev", sd3_models MMDiT "medium"); SD 1.x and SDXL at full size,
Flux and SD3 with fewer blocks (FLUX_BLOCKS, SD3_DEPTH). A random MoSLoRA adapter
(attention+ff preset, r=4, alpha=8, a mixer far from I) on the diffusers denoiser, and on tiny CLIP / T5
text encoders of the same classes sd-scripts uses, is written by our writer (write_adapter_files). Then
sd-scripts' ``create_network_from_weights`` (networks/lora.py, lora_flux.py, lora_sd3.py) builds its network
over its own model from each file, and each of its modules merges its weights with its own ``merge_to``
into a zero weight of the module's shape, which is compared with our delta s B M A of that module.

Where the module of sd-scripts lies in ours comes from sd-scripts' own tables, not ours: SD 1.x's UNet
uses diffusers' names; SDXL's SAI names come from ``networks.lora.convert_diffusers_to_sai_if_needed``
(sdxl_model_util's conversion map); Flux's fused modules from ``library.flux_utils``'s BFL-to-diffusers map
(q, k, v and the MLP input stacked in its order). SD3's MMDiT has no such table in sd-scripts, so there
the parts come from ours (``formats.sd_scripts.sd3_modules``).

sd-scripts is run from a checkout and never installed; its imports of cv2 and torchvision (for image
utilities its loaders do not call) are satisfied by empty modules when those are not installed. Text
encoders of transformers 5 lose CLIP's ``text_model.`` root; sd-scripts pins transformers 4, where it is
there, so they are given it back.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import json
import logging
import sys
import tempfile
import time
import types
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import init_empty_weights
from peft.tuners.lora import LoraLayer
from torch import nn

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from moslora_diffusion import MoSLoRAConfig, add_moslora  # noqa: E402
from moslora_diffusion.families import get_family  # noqa: E402
from moslora_diffusion.formats import (  # noqa: E402
    AdapterState,
    ComponentAdapter,
    LayerFactors,
    infer_component_config,
    kohya_stem,
    write_adapter_files,
)
from moslora_diffusion.loaders import component_adapter_from_model  # noqa: E402
from moslora_diffusion.testing import make_tiny_pipeline  # noqa: E402

RANK, ALPHA = 4, 8.0
# Fewer blocks than the real models (19 + 38 in Flux, 24 in SD3 medium), the same module kinds: Flux's at its
# real width; MMDiT ties width to depth (64 per block), so SD3's is 4 blocks of width 256. Every block is
# alike, and merging the whole models takes tens of minutes on a shared CPU.
FLUX_BLOCKS, SD3_DEPTH = 2, 4
RESULTS = REPO / "benchmarks" / "results" / "client_loaders.md"

# The reference repositories' denoiser configs (the parts that shape the module tree).
DIFFUSERS_DENOISERS = {
    "sd15": ("UNet2DConditionModel", dict(cross_attention_dim=768, attention_head_dim=8)),
    "sdxl": (
        "UNet2DConditionModel",
        dict(
            block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20),
            cross_attention_dim=2048,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
            use_linear_projection=True,
        ),
    ),
    "flux": (
        "FluxTransformer2DModel",
        dict(
            in_channels=64,
            num_layers=FLUX_BLOCKS,
            num_single_layers=FLUX_BLOCKS,
            attention_head_dim=128,
            num_attention_heads=24,
            joint_attention_dim=4096,
            pooled_projection_dim=768,
            guidance_embeds=True,
            axes_dims_rope=(16, 56, 56),
        ),
    ),
    "sd3": (
        "SD3Transformer2DModel",
        dict(
            sample_size=128,
            num_layers=SD3_DEPTH,
            attention_head_dim=64,
            num_attention_heads=SD3_DEPTH,
            joint_attention_dim=4096,
            caption_projection_dim=64 * SD3_DEPTH,
            pooled_projection_dim=2048,
            out_channels=16,
            pos_embed_max_size=192,
        ),
    ),
}


# ------------------------------------------------------------------------------------------------
# sd-scripts, imported from a checkout


def import_sd_scripts(path: Path) -> types.SimpleNamespace:
    """sd-scripts' loader modules from the checkout at ``path``."""
    if not (path / "networks" / "lora.py").is_file():
        raise SystemExit(f"--sd_scripts {path}: no networks/lora.py there; give a kohya-ss/sd-scripts checkout")
    import diffusers
    import transformers

    # What sd-scripts imports from these two, loaded before cv2 / torchvision may be stand-ins.
    _ = diffusers.AutoencoderKL, diffusers.EulerAncestralDiscreteScheduler, transformers.CLIPTextModel
    missing = [name for name in ("cv2", "torchvision") if importlib.util.find_spec(name) is None]
    missing += ["torchvision.transforms"] if "torchvision" in missing else []
    stand_ins = {name: types.ModuleType(name) for name in missing}  # library/utils.py's image helpers only
    sys.modules.update(stand_ins)
    if "torchvision" in stand_ins:
        stand_ins["torchvision"].transforms = stand_ins["torchvision.transforms"]
    sys.path.insert(0, str(path))
    names = ("networks.lora", "networks.lora_flux", "networks.lora_sd3", "library.original_unet",
             "library.sdxl_original_unet", "library.flux_models", "library.flux_utils", "library.sd3_models")  # fmt: skip
    try:
        modules = {name.split(".")[-1]: importlib.import_module(name) for name in names}
    finally:
        for name in stand_ins:
            del sys.modules[name]  # nothing else may take them for the real packages
    logging.getLogger().setLevel(logging.WARNING)  # sd-scripts logs every module it creates
    return types.SimpleNamespace(**modules)


def sd_scripts_denoiser(sd, family: str) -> nn.Module:
    """sd-scripts' own denoiser class for ``family``, real size, on the meta device."""
    with torch.device("meta"):
        if family == "sd15":
            return sd.original_unet.UNet2DConditionModel(sample_size=64, attention_head_dim=8, cross_attention_dim=768)
        if family == "sdxl":
            return sd.sdxl_original_unet.SdxlUNet2DConditionModel()
        if family == "flux":
            params = dataclasses.replace(
                sd.flux_models.configs["dev"].params, depth=FLUX_BLOCKS, depth_single_blocks=FLUX_BLOCKS
            )
            return sd.flux_models.Flux(params)
        params = sd.sd3_models.SD3Params(
            patch_size=2,
            depth=SD3_DEPTH,
            num_patches=36864,
            pos_embed_max_size=192,
            adm_in_channels=2048,
            qk_norm=None,
            x_block_self_attn_layers=[],
            context_embedder_in_features=4096,
            context_embedder_out_features=64 * SD3_DEPTH,
            model_type="sd3m",
        )
        return sd.sd3_models.create_sd3_mmdit(params)


def sd_scripts_network(sd, family: str, file: Path, text_encoders: list[nn.Module], denoiser: nn.Module):
    """(network, weights) from sd-scripts' create_network_from_weights for ``family``."""
    loader = {"sd15": sd.lora, "sdxl": sd.lora, "flux": sd.lora_flux, "sd3": sd.lora_sd3}[family]
    encoders = text_encoders if len(text_encoders) > 1 else text_encoders[0]
    return loader.create_network_from_weights(1.0, str(file), None, encoders, denoiser, for_inference=True)


class WithTextModel(nn.Module):
    """A transformers-5 CLIP text model (flattened) under the ``text_model.`` root transformers 4 has."""

    def __init__(self, text_encoder: nn.Module):
        super().__init__()
        self.text_model = text_encoder


# ------------------------------------------------------------------------------------------------
# Our adapter and files


@dataclass
class Adapter:
    family: str
    state: AdapterState
    denoiser: nn.Module  # ours, on the meta device
    text_encoders: list[nn.Module]  # sd-scripts' view of them (CLIP with its text_model. root)
    layers: dict[str, LayerFactors] = field(default_factory=dict)  # kohya stem (our names) -> factors
    tables: dict[str, dict] = field(default_factory=dict)  # sd-scripts lora name -> our modules, built once

    def table(self, name: str, build) -> dict:
        if name not in self.tables:
            self.tables[name] = build()
        return self.tables[name]

    def delta(self, stem: str) -> torch.Tensor | None:
        """s B M A of the module ``stem`` (computed when asked: Flux's would not fit in memory at once)."""
        layer = self.layers.get(stem)
        return None if layer is None else layer.delta_weight(torch.float32)


def build_adapter(family: str, seed: int = 0) -> Adapter:
    """A random MoSLoRA adapter on the real-size diffusers denoiser and on tiny text encoders."""
    import diffusers

    spec = get_family(family)
    gen = torch.Generator().manual_seed(seed)
    class_name, config = DIFFUSERS_DENOISERS[family]
    with init_empty_weights():
        denoiser = getattr(diffusers, class_name)(**config)
        add_moslora(denoiser, MoSLoRAConfig(r=RANK, lora_alpha=ALPHA, target_modules="attention+ff"))
    layers = {}
    for path, module in denoiser.named_modules():
        if isinstance(module, LoraLayer):
            base = module.get_base_layer()
            a = torch.randn(RANK, *base.weight.shape[1:], generator=gen) / base.weight.shape[1] ** 0.5
            b = torch.randn(base.weight.shape[0], RANK, *([1, 1] if base.weight.dim() == 4 else []), generator=gen)
            mixer = torch.eye(RANK) + torch.randn(RANK, RANK, generator=gen)
            layers[path] = LayerFactors(a, b * 0.05, mixer, ALPHA / RANK)
    config = dict(infer_component_config(layers), use_moslora=True, mixer_init="kaiming", train_mixer=True)
    components = {spec.denoiser: ComponentAdapter(config, layers)}
    pipe, plain = make_tiny_pipeline(family), make_tiny_pipeline(family)  # sd-scripts gets models without LoRA
    text_encoders = []
    for name in spec.text_encoders:
        model = getattr(pipe, name)
        add_moslora(model, MoSLoRAConfig(r=2, lora_alpha=3))
        with torch.no_grad():
            for param_name, param in model.named_parameters():
                if ".lora_" in param_name:
                    param.copy_(torch.randn(param.shape, generator=gen) * (0.05 if "lora_B" in param_name else 0.3))
        components[name] = component_adapter_from_model(model, "default", name)
        clean = getattr(plain, name)
        flattened = type(clean).__name__.startswith("CLIPText") and not hasattr(clean, "text_model")
        text_encoders.append(WithTextModel(clean) if flattened else clean)
    state = AdapterState(components, family, f"client_loaders/{family}")
    adapter = Adapter(family, state, denoiser, text_encoders)
    prefixes = spec.kohya_prefixes | {spec.denoiser: "lora_unet"}
    for component, path, layer in state.layer_items():
        adapter.layers[kohya_stem(prefixes[component], path)] = layer
    return adapter


# ------------------------------------------------------------------------------------------------
# Where each sd-scripts module lies in ours, from sd-scripts' tables


def expected_delta(sd, adapter: Adapter, lora_name: str, shape: torch.Size) -> torch.Tensor | None:
    """Our delta for the sd-scripts module ``lora_name`` (a weight of ``shape``); None if we have none."""
    family = adapter.family
    if not lora_name.startswith("lora_unet_") or family == "sd15":
        return adapter.delta(lora_name)
    if family == "sdxl":
        layer = adapter.table("sai", lambda: _sai_layers(sd, adapter)).get(lora_name)
        return None if layer is None else layer.delta_weight(torch.float32)
    if family == "flux":
        return _fused_delta(adapter, adapter.table("bfl", lambda: _bfl_parts(sd, adapter)).get(lora_name), shape)
    return _fused_delta(adapter, adapter.table("sd3", lambda: _sd3_parts(adapter)).get(lora_name), shape)


def _sai_layers(sd, adapter: Adapter) -> dict[str, LayerFactors]:
    """Our SDXL UNet layers renamed by sd-scripts' own diffusers -> SAI conversion."""
    renamed = {f"{stem}.weight": layer for stem, layer in adapter.layers.items() if stem.startswith("lora_unet_")}
    sd.lora.convert_diffusers_to_sai_if_needed(renamed)  # renames in place
    return {key.removesuffix(".weight"): layer for key, layer in renamed.items()}


def _bfl_parts(sd, adapter: Adapter) -> dict[str, list[tuple[str, int]]]:
    """BFL lora name -> [(diffusers module path, index)], from sd-scripts' flux_utils map."""
    config = adapter.denoiser.config
    table = sd.flux_utils.make_diffusers_to_bfl_map(config.num_layers, config.num_single_layers)
    parts: dict[str, list[tuple[str, int]]] = {}
    for diffusers_key, (index, bfl_key) in table.items():
        if bfl_key.endswith(".weight"):
            stem = kohya_stem("lora_unet", bfl_key.removesuffix(".weight"))
            parts.setdefault(stem, []).append((diffusers_key.removesuffix(".weight"), index))
    return {stem: sorted(p, key=lambda item: item[1]) for stem, p in parts.items()}


def _sd3_parts(adapter: Adapter) -> dict[str, list[tuple[str, int]]]:
    """MMDiT lora name -> [(diffusers module path, index)], from our table (sd-scripts has none for SD3)."""
    from moslora_diffusion.formats.sd_scripts import sd3_modules

    modules = sd3_modules(dict(adapter.denoiser.config))
    return {kohya_stem("lora_unet", m.name): [(path, i) for i, path in enumerate(m.parts)] for m in modules}


def _fused_delta(adapter: Adapter, parts, shape: torch.Size) -> torch.Tensor | None:
    """Our deltas of ``parts`` (diffusers module paths, in order) stacked by rows; zero rows for a part
    without an adapter. None if no part has one."""
    if not parts:
        return None
    blocks, found = [], False
    for path, _ in parts:
        delta = adapter.delta(kohya_stem("lora_unet", path))
        if delta is None:
            delta = torch.zeros(_base_layer(adapter.denoiser.get_submodule(path)).weight.shape[0], shape[1])
        else:
            found = True
        blocks.append(delta)
    return torch.cat(blocks) if found else None


def _base_layer(module: nn.Module) -> nn.Module:
    return module.get_base_layer() if isinstance(module, LoraLayer) else module


# ------------------------------------------------------------------------------------------------
# One file through sd-scripts


def zero_module_like(module: nn.Module) -> nn.Module:
    """A CPU module of ``module``'s class and shape with a zero weight (sd-scripts merges into it)."""
    with torch.device("meta"):  # no random initialisation of a 3072 x 21504 weight, only to zero it
        if isinstance(module, nn.Conv2d):
            args = module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding
            zero = nn.Conv2d(*args)
        else:
            zero = nn.Linear(module.in_features, module.out_features)
    zero = zero.to_empty(device="cpu")
    with torch.no_grad():
        zero.weight.zero_()
    return zero


def _module_of(key: str) -> str:
    """The module a file key belongs to: a kohya stem, or a diffusers key without its factor suffix."""
    for suffix in (".lora_A.weight", ".lora_B.weight"):
        if key.endswith(suffix):
            return key.removesuffix(suffix)
    return key.split(".")[0]


def check_file(sd, adapter: Adapter, file: Path, denoiser: nn.Module) -> dict:
    """sd-scripts' network over its own ``denoiser`` from ``file``: counts and the largest delta error."""
    from safetensors.torch import load_file

    written = {_module_of(key) for key in load_file(file)}
    network, weights = sd_scripts_network(sd, adapter.family, file, adapter.text_encoders, denoiser)
    in_file = {_module_of(key) for key in weights}  # after sd-scripts' own renaming (SDXL diffusers -> SAI)
    loras = network.text_encoder_loras + network.unet_loras
    names = {lora.lora_name for lora in loras}
    unmatched = sorted(in_file - names)
    worst, compared, without_ours = 0.0, 0, []
    for lora in loras:
        if lora.lora_name not in in_file:
            continue
        lora.org_module = zero_module_like(lora.org_module)
        prefix = lora.lora_name + "."
        lora.merge_to({k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}, torch.float32, "cpu")
        theirs = lora.org_module.weight.detach()
        ours = expected_delta(sd, adapter, lora.lora_name, theirs.shape)
        lora.org_module = None
        if ours is None:
            without_ours.append(lora.lora_name)
            continue
        ours = ours.reshape(theirs.shape)
        worst = max(worst, float(torch.linalg.norm(theirs - ours) / torch.linalg.norm(ours)))
        compared += 1
    return {
        "modules_in_file": len(written),
        "renamed_by_sd_scripts": len(written - in_file),
        "matched": len(in_file & names),
        "unmatched": unmatched,
        "compared": compared,
        "without_ours": without_ours,
        "max_relative_error": worst,
    }


def run(sd_scripts: Path, families: list[str]) -> list[dict]:
    sd = import_sd_scripts(sd_scripts)
    rows = []
    for family in families:
        start = time.perf_counter()
        adapter = build_adapter(family)
        denoiser = sd_scripts_denoiser(sd, family)
        with tempfile.TemporaryDirectory() as folder:
            paths = write_adapter_files(
                adapter.state, folder, ("diffusers", "kohya"), denoiser_config=dict(adapter.denoiser.config)
            )
            for layout, path in paths.items():
                row = {"family": family, "file": path.name, **check_file(sd, adapter, path, denoiser)}
                row["seconds"] = round(time.perf_counter() - start, 1)
                rows.append(row)
                brief = {
                    k: v[:3] + [f"{len(v)} in all"] if isinstance(v, list) and len(v) > 3 else v for k, v in row.items()
                }
                print(json.dumps(brief), flush=True)
    return rows


def markdown(rows: list[dict], commit: str) -> str:
    lines = [
        f"sd-scripts {commit}: `create_network_from_weights` over its own real-size models (meta device), "
        "each module's `merge_to` compared with our s B M A.",
        "",
        "| family | file | modules in file | renamed by sd-scripts | matched | unmatched (first) | max relative error |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        first = f"`{row['unmatched'][0]}`" if row["unmatched"] else "-"
        error = f"{row['max_relative_error']:.1e}" if row["compared"] else "-"
        lines.append(
            f"| {row['family']} | `{row['file']}` | {row['modules_in_file']} | {row['renamed_by_sd_scripts']} | "
            f"{row['matched']} | "
            f"{len(row['unmatched'])} {first} | {error} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sd_scripts", type=Path, required=True, help="a kohya-ss/sd-scripts checkout")
    parser.add_argument("--families", nargs="+", default=["sd15", "sdxl", "flux", "sd3"])
    parser.add_argument("--commit", default="", help="the checkout's commit, for the report")
    parser.add_argument("--output", type=Path, help="also write the markdown table here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = run(args.sd_scripts, args.families)
    table = markdown(rows, args.commit or str(args.sd_scripts))
    print(table)
    if args.output:
        args.output.write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
