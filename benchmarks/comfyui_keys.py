"""Our LoRA files read by ComfyUI's own key mapping: adapter modules in each file, modules ComfyUI picks up.

    python benchmarks/comfyui_keys.py --comfyui /path/to/ComfyUI [--families sd15 sdxl ...]

ComfyUI reads a LoRA file (comfy/sd.py, load_lora_for_models) as: ``comfy.lora_convert.convert_lora`` on the
file, a key map {file key stem -> model weight} from ``comfy.lora.model_lora_keys_unet(model)`` and
``model_lora_keys_clip(clip)``, then ``comfy.lora.load_lora(file, key_map)``, which returns one patch per
matched module and logs "lora key not loaded" for every file key it left over; a patch whose target weight the
model lacks is then dropped without a word (ModelPatcher.add_patches), so those are counted too, and
so are patches whose up @ down does not have the shape of the weight (or slice of a fused weight) they target. This runs those three
functions of a ComfyUI checkout (never installed, never copied here) on each file save_moslora_weights writes
for a tiny pipeline (random adapter, non-zero B, on the same components as tests/test_loaders.py).

What ``model_lora_keys_unet`` reads of a model is its ``state_dict()`` keys, ``model_config.unet_config`` and
its class (isinstance against comfy.model_base's classes). Importing comfy.model_base pulls every model of
ComfyUI, so the stand-in model is an instance of a class of the same name and the same bases as in
comfy/model_base.py (read from that file's syntax tree), with the denoiser's keys of the original (single
file) layout, as our single-file writer names them from the tiny pipeline's own tensors (block counts of
the tiny model), under ComfyUI's ``diffusion_model.`` root. The text encoders' keys are ComfyUI's
(``clip_l.transformer.text_model.…``, ``clip_g.…``) over the tiny encoders' HF names. comfy.model_management
and comfy.memory_management (device probing, offloading) are replaced by empty modules: the functions called here do not use it.
"""

from __future__ import annotations

import argparse
import ast
import logging
import math
import subprocess
import sys
import tempfile
import types
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from moslora_diffusion import MoSLoRAConfig, add_moslora  # noqa: E402
from moslora_diffusion.families import get_family  # noqa: E402
from moslora_diffusion.loaders import save_moslora_weights  # noqa: E402
from moslora_diffusion.single_file import original_layout  # noqa: E402
from moslora_diffusion.testing import make_tiny_pipeline  # noqa: E402

FILES = ("pytorch_lora_weights.safetensors", "pytorch_lora_weights_kohya.safetensors")
# The adapters of tests/test_loaders.py (components and targets); ranks do not change key names.
ADAPTERS = {
    "sd15": {"unet": "attention+ff", "text_encoder": None},
    "sdxl": {"unet": None, "text_encoder": None, "text_encoder_2": None},
    "sd3": {"transformer": None, "text_encoder": None, "text_encoder_2": None},
    "flux": {"transformer": None, "text_encoder": None},
    "chroma": {"transformer": "attention+ff"},
    "zimage": {"transformer": "attention+ff"},
    "qwenimage": {"transformer": None},
    "flux2_klein": {"transformer": "attention+ff"},
    "flux2": {"transformer": None},
}
# family -> the comfy.model_base class ComfyUI builds for it
COMFY_CLASS = {
    "sd15": "BaseModel",
    "sdxl": "SDXL",
    "sd3": "SD3",
    "flux": "Flux",
    "chroma": "Chroma",
    "zimage": "Lumina2",
    "qwenimage": "QwenImage",
    "flux2_klein": "Flux2",
    "flux2": "Flux2",
}
# family -> ComfyUI's prefix for each text encoder component
CLIP_PREFIX = {
    "sd15": {"text_encoder": "clip_l"},
    "sdxl": {"text_encoder": "clip_l", "text_encoder_2": "clip_g"},
    "sd3": {"text_encoder": "clip_l", "text_encoder_2": "clip_g"},
    "flux": {"text_encoder": "clip_l"},
}


def import_comfy(root: Path):
    """comfy.utils, comfy.lora and comfy.lora_convert of the checkout, with stand-ins for model_management and
    model_base (classes named and derived as in model_base.py, bodies empty)."""
    sys.path.insert(0, str(root))
    argv, sys.argv = sys.argv, [sys.argv[0]]  # comfy.cli_args parses the command line on import
    try:
        for name in ("comfy.model_management", "comfy.memory_management"):
            sys.modules[name] = types.ModuleType(name)
        base = types.ModuleType("comfy.model_base")
        tree = ast.parse((root / "comfy" / "model_base.py").read_text())
        for node in tree.body:
            if isinstance(node, ast.ClassDef):
                bases = tuple(
                    getattr(base, b.id) for b in node.bases if isinstance(b, ast.Name) and hasattr(base, b.id)
                )
                setattr(base, node.name, type(node.name, bases or (object,), {}))
        sys.modules["comfy.model_base"] = base
        import comfy

        comfy.model_management = sys.modules["comfy.model_management"]
        comfy.memory_management = sys.modules["comfy.memory_management"]
        comfy.model_base = base
        import comfy.lora
        import comfy.lora_convert
        import comfy.utils
    finally:
        sys.argv = argv
    return comfy


def unet_config(family: str, pipe) -> dict:
    """ComfyUI's unet_config fields that its *_to_diffusers tables read, from the tiny denoiser's config."""
    if family in ("sd15", "sdxl"):
        c = pipe.unet.config
        n = len(c.block_out_channels)
        per = c.transformer_layers_per_block
        per = [per] * n if isinstance(per, int) else list(per)
        layers = c.layers_per_block
        down = [d for i, kind in enumerate(c.down_block_types) for d in [per[i] if "CrossAttn" in kind else 0] * layers]
        up = [
            d
            for lvl in range(n)
            for d in [per[lvl] if "CrossAttn" in c.up_block_types[n - 1 - lvl] else 0] * (layers + 1)
        ]
        return {
            "num_res_blocks": [layers] * n,
            "channel_mult": [1] * n,
            "transformer_depth": down,
            "transformer_depth_output": up,
            "transformer_depth_middle": per[-1],
        }
    c = pipe.transformer.config
    hidden = c.get("num_attention_heads", 0) * c.get("attention_head_dim", 0)
    if family == "sd3":
        return {"depth": c.num_layers, "num_blocks": c.num_layers}
    if family in ("flux", "chroma", "flux2", "flux2_klein"):
        return {"depth": c.num_layers, "depth_single_blocks": c.num_single_layers, "hidden_size": hidden}
    if family == "zimage":
        return {
            "dim": c.get("dim", hidden),
            "n_layers": c.get("n_layers"),
            "n_refiner_layers": c.get("n_refiner_layers"),
        }
    return {}


def denoiser_keys(family: str, pipe) -> dict[str, torch.Tensor]:
    """The denoiser's tensors under ComfyUI's names: original layout, ``diffusion_model.`` root (meta tensors)."""
    layout = get_family(family).single_file_layout
    keys = {component: list(getattr(pipe, component).state_dict()) for component, _, _ in layout}
    configs = {component: getattr(getattr(pipe, component), "config", {}) for component, _, _ in layout}
    configs = {c: dict(v) if isinstance(v, Mapping) else {} for c, v in configs.items()}
    denoiser, _, prefix = layout[0]
    state = getattr(pipe, denoiser).state_dict()
    out = {}
    for tensor in original_layout(family, keys, configs):
        if tensor.sources[0][0] != denoiser:
            continue
        built = tensor.build([state[k].to("meta") for _, k in tensor.sources])
        out["diffusion_model." + tensor.name.removeprefix(prefix)] = built
    return out


def clip_keys(family: str, pipe) -> dict[str, torch.Tensor]:
    keys = {}
    for component, clip in CLIP_PREFIX.get(family, {}).items():
        model = getattr(pipe, component)
        root = "" if hasattr(model, "text_model") else "text_model."  # transformers 5 drops CLIP's root
        for name, tensor in model.state_dict().items():
            keys[f"{clip}.transformer.{root}{name}"] = tensor.to("meta")
    return keys


def randomize(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".default." in name and ".lora_" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.05)


def check(comfy, family: str, directory: Path) -> list[dict]:
    pipe = make_tiny_pipeline(family)
    cls = getattr(comfy.model_base, COMFY_CLASS[family], None)
    model = cls() if cls is not None else None
    if model is not None:  # the base model's names, before PEFT wraps its layers
        sd = denoiser_keys(family, pipe)
        clip_sd = clip_keys(family, pipe)
        model.state_dict = lambda: sd
        model.model_config = SimpleNamespace(unet_config=unet_config(family, pipe))
    for i, (component, targets) in enumerate(ADAPTERS[family].items()):
        kwargs = {"r": 4, "lora_alpha": 8} | ({"target_modules": targets} if targets else {})
        add_moslora(getattr(pipe, component), MoSLoRAConfig(**kwargs))
        randomize(getattr(pipe, component), i)
    save_moslora_weights(pipe, directory)
    rows = []
    for name in FILES:
        row = {"family": family, "file": name}
        path = directory / name
        if not path.exists():
            rows.append(row | {"note": "not written"})
            continue
        if model is None:
            rows.append(row | {"note": f"comfy.model_base has no {COMFY_CLASS[family]} in this checkout"})
            continue
        key_map = comfy.lora.model_lora_keys_unet(model, {})
        clip = SimpleNamespace(state_dict=lambda: clip_sd)
        key_map = comfy.lora.model_lora_keys_clip(clip, key_map)
        lora = comfy.lora_convert.convert_lora(load_file(path))
        handler = _Collect()
        logging.getLogger().addHandler(handler)
        try:
            patches = comfy.lora.load_lora(lora, key_map)
        finally:
            logging.getLogger().removeHandler(handler)
        modules = {k.rsplit(".", 2)[0] if ".lora_" in k else k.rsplit(".", 1)[0] for k in lora}
        unused = sorted(handler.unloaded)
        weights = sd | clip_sd
        absent = sorted(str(t) for t in patches if (t[0] if isinstance(t, tuple) else t) not in weights)
        misfit = sorted(str(t) for t, patch in patches.items() if str(t) not in absent and not _fits(patch, t, weights))
        row |= {"modules": len(modules), "matched": len(patches), "unused": unused, "absent": absent}
        rows.append(row | {"misfit": misfit})
    return rows


def _fits(patch, target, weights) -> bool:
    """Whether a LoRA patch's up @ down has the shape of its target (the slice of it, for a fused weight)."""
    up, down = patch.weights[0], patch.weights[1]
    key, offset = target if isinstance(target, tuple) else (target, None)
    shape = list(weights[key].shape)
    if offset is not None:
        shape[offset[0]] = offset[2]
    return up.shape[0] == shape[0] and down.flatten(1).shape[1] == math.prod(shape[1:])


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.unloaded: list[str] = []

    def emit(self, record):
        message = record.getMessage()
        if message.startswith("lora key not loaded: "):
            self.unloaded.append(message.removeprefix("lora key not loaded: "))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--comfyui", type=Path, required=True, help="a ComfyUI checkout (its comfy/ folder)")
    parser.add_argument("--commit", default="", help="the checkout's commit, where it has no .git")
    parser.add_argument("--families", nargs="+", default=list(ADAPTERS))
    args = parser.parse_args()
    if not (args.comfyui / "comfy" / "lora.py").is_file():
        sys.exit(f"--comfyui: expected a ComfyUI checkout with comfy/lora.py, found none under {args.comfyui}")
    torch.manual_seed(0)
    commit = (
        args.commit
        or subprocess.run(
            ["git", "-C", str(args.comfyui), "rev-parse", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
    )
    comfy = import_comfy(args.comfyui)
    print(f"ComfyUI: {args.comfyui} {commit or '(no git metadata)'}\n")
    print(
        "| family | file | adapter modules | matched by ComfyUI | file keys left unused | targets not in model | shape misfits |"
    )
    print("|---|---|---|---|---|---|---|")
    details = []
    for family in args.families:
        with tempfile.TemporaryDirectory() as tmp:
            for row in check(comfy, family, Path(tmp)):
                if "note" in row:
                    print(f"| {family} | {row['file']} | - | - | {row['note']} | - | - |")
                    continue
                counts = f"{row['modules']} | {row['matched']} | {len(row['unused'])} | {len(row['absent'])} | {len(row['misfit'])}"
                print(f"| {family} | {row['file']} | {counts} |")
                if row["unused"] or row["absent"] or row["misfit"]:
                    details.append(row)
        sys.stdout.flush()
    for row in details:
        print(f"\n{row['family']} {row['file']}: {len(row['unused'])} keys left unused, first 12:")
        for key in row["unused"][:12]:
            print(f"    {key}")
        if row["absent"]:
            print(f"  {len(row['absent'])} matched targets the model does not have, first 12:")
            for key in row["absent"][:12]:
                print(f"    {key}")
        if row["misfit"]:
            print(f"  {len(row['misfit'])} patches whose up @ down is not the shape of their target, first 12:")
            for key in row["misfit"][:12]:
                print(f"    {key}")


if __name__ == "__main__":
    main()
