"""Single-file checkpoints as training and merge bases: the family from the keys, the components offline.

Community fine-tunes are shared as one ``.safetensors`` file in the family's original layout
(:mod:`moslora_diffusion.single_file`). A diffusers folder of the same family (``--base_config``) supplies
what such a file lacks: every config, the tokenizers, the scheduler, and the weights of components the
file does not hold (T5 and the CLIPs beside flux1-dev.safetensors or sd3_medium.safetensors).

The family is read from key names, never from sizes, so tiny test models are recognised like real ones
(diffusers' ``infer_diffusers_model_type`` compares widths and block counts of the released models):

    flux2  single_stream_modulation.lin.weight (Flux.2's shared modulation), with guidance_in.* ([dev])
    flux2_klein                                   the same without guidance_in.* ([klein] takes no guidance)
    chroma distilled_guidance_layer.in_proj.weight (Chroma's Flux blocks are told apart by this)
    flux   double_blocks.0.img_attn.qkv.weight (bare, or under model.diffusion_model.)
    zimage layers.0.adaLN_modulation.0.weight with cap_embedder.* (Tongyi's names)
    qwenimage  txt_norm.weight with img_in.weight (diffusers' names, as ComfyUI tells Qwen-Image apart)
    sd3    joint_blocks.0.x_block.attn.qkv.weight (bare, or under model.diffusion_model.)
    sdxl   conditioner.embedders.* text encoders, or a UNet with label_emb (SDXL's added embeddings)
    sd2    cond_stage_model.model.* (OpenCLIP), or a UNet with linear proj_in
    sd15   cond_stage_model.transformer.* (CLIP), or a UNet with conv proj_in

A "v_pred" key (what ComfyUI and our merge write) marks a v-prediction SD2 model. Pickled checkpoints
(.ckpt, .pt, .bin) are refused: loading one can run any code. A ``.gguf`` file holds a block-quantized
transformer (Flux, SD3) under the same names: it supplies the denoiser only (:mod:`moslora_diffusion.gguf_bases`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from .families import FAMILIES, UNUSED_COMPONENTS, family_of_model_dir, model_index_classes
from .gguf_bases import gguf_quantization_config, is_gguf_file, read_gguf_tensor_names
from .single_file import SINGLE_FILE_LAYOUTS, TRANSFORMER_RULES

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
DENOISER_PREFIX = "model.diffusion_model."


def _strip(key: str) -> str:
    return key.removeprefix(DENOISER_PREFIX)


def detect_single_file_family(keys: set[str], proj_in_ndim: int | None = None) -> str:
    """The family of a single-file checkpoint from its tensor names (see the module docstring).

    ``proj_in_ndim`` is the number of dimensions of a UNet ``proj_in`` weight (2: linear, SD2; 4: conv,
    SD1), needed only for a UNet-only file without text encoders.
    """
    bare = {_strip(k) for k in keys}
    if "single_stream_modulation.lin.weight" in bare:
        return "flux2" if "guidance_in.in_layer.weight" in bare else "flux2_klein"
    if "distilled_guidance_layer.in_proj.weight" in bare:
        return "chroma"
    if "double_blocks.0.img_attn.qkv.weight" in bare:
        return "flux"
    if "layers.0.adaLN_modulation.0.weight" in bare and "cap_embedder.1.weight" in bare:
        return "zimage"
    if "txt_norm.weight" in bare and "img_in.weight" in bare:
        return "qwenimage"
    if "joint_blocks.0.x_block.attn.qkv.weight" in bare:
        return "sd3"
    if any(k.startswith("conditioner.embedders.") for k in keys) or f"{DENOISER_PREFIX}label_emb.0.0.weight" in keys:
        return "sdxl"
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return "sd2"
    if any(k.startswith("cond_stage_model.transformer.") for k in keys):
        return "sd15"
    if any(k.startswith(DENOISER_PREFIX + "input_blocks.") for k in keys) and proj_in_ndim is not None:
        return "sd2" if proj_in_ndim == 2 else "sd15"
    example = ", ".join(sorted(keys)[:3]) or "no tensors"
    raise ValueError(
        "the single file's tensor names match no known family "
        f"(SD1.x, SD2.x, SDXL, SD3, Flux, Chroma, Flux.2, Z-Image, Qwen-Image; found e.g. {example})"
    )


def _check_safetensors(path: Path) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ValueError(f"{path}: pickled checkpoints can run code when loaded; convert it to .safetensors first")
    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"{path}: expected a .safetensors single-file checkpoint (or a .gguf transformer)")
    if not path.is_file():
        raise ValueError(f"{path}: no such file")


def read_single_file_family(path: str | os.PathLike) -> tuple[str, bool]:
    """(family, v_prediction marker present) of a ``.safetensors`` single file or a ``.gguf`` transformer,
    reading its header only."""
    from safetensors import safe_open

    path = Path(path)
    if is_gguf_file(path):
        return _gguf_family(path), False
    _check_safetensors(path)
    try:
        with safe_open(str(path), "pt") as f:
            keys = set(f.keys())
            proj_ins = (k for k in sorted(keys) if k.startswith(DENOISER_PREFIX) and k.endswith(".proj_in.weight"))
            proj_in = next(proj_ins, None)
            ndim = len(f.get_slice(proj_in).get_shape()) if proj_in else None
    except Exception as err:  # noqa: BLE001 - safetensors' SafetensorError on a corrupt or truncated header
        raise ValueError(f"{path}: not a readable .safetensors file ({' '.join(str(err).split())})") from None
    try:
        return detect_single_file_family(keys, ndim), "v_pred" in keys
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


def _gguf_family(path: Path) -> str:
    """The family of a GGUF transformer; ValueError in one line for a family diffusers reads no GGUF of."""
    keys = read_gguf_tensor_names(path)
    try:
        family = detect_single_file_family(keys)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    if not FAMILIES[family].gguf_denoiser:
        readable = ", ".join(name for name, f in FAMILIES.items() if f.gguf_denoiser)
        raise ValueError(f"{path}: a GGUF {family} model; GGUF bases are read for transformers only ({readable})")
    return family


def single_file_components_held(path: str | os.PathLike) -> tuple[str, ...]:
    """The pipeline components whose weights a ``.safetensors`` single file (or a ``.gguf``) holds (header only)."""
    from safetensors import safe_open

    family, _ = read_single_file_family(path)
    if is_gguf_file(path):
        return (FAMILIES[family].denoiser,)
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
    return tuple(c for c, kind, prefix in SINGLE_FILE_LAYOUTS[family] if _holds(keys, kind, prefix))


# What a Hub --base_config contributes: configs and tokenizers of every component, weights of the missing ones.
_CONFIG_PATTERNS = ("model_index.json", "*/*.json", "*/*.txt", "*/*.model")
_SKIPPED_WEIGHTS = ("*.fp16.*", "*.bf16.*", "*non_ema*", "*.bin", "*.ckpt", "*.pt", "*.pth", "*.msgpack", "*.onnx")


def base_config_folder(
    base_config: str | os.PathLike, single_file: str | os.PathLike, revision: str | None = None, weights: bool = True
) -> Path:
    """The local diffusers folder ``--base_config`` names: the folder itself, or a Hub repository's snapshot.

    From the Hub only what the single file lacks is fetched: model_index.json, every config and tokenizer,
    and (``weights``) the safetensors weights of the components that are not in the file (T5 and the CLIPs
    beside flux1-dev.safetensors); never the weights the file replaces, never pickles.
    """
    path = Path(base_config).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    model_index = json.loads(Path(_hub_file(str(base_config), "model_index.json", revision)).read_text())
    held = set(single_file_components_held(single_file))
    missing = [
        name
        for name, spec in model_index.items()
        if not name.startswith("_") and isinstance(spec, (list, tuple)) and name not in held
        and name not in UNUSED_COMPONENTS
    ]  # fmt: skip
    patterns = [*_CONFIG_PATTERNS, *(f"{name}/*.safetensors" for name in missing if weights)]
    try:
        return Path(
            snapshot_download(
                str(base_config), revision=revision, allow_patterns=patterns, ignore_patterns=list(_SKIPPED_WEIGHTS)
            )
        )
    except Exception as err:  # noqa: BLE001 - offline, gated, missing repository: one line
        reason = " ".join(str(err).split())[:200] or type(err).__name__
        raise ValueError(
            f"--base_config {base_config}: the Hub repository could not be fetched ({reason}); "
            "pass --base_config DIR, a local diffusers folder of the same model"
        ) from None


def _hub_file(repo_id: str, filename: str, revision: str | None) -> str:
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(repo_id, filename, revision=revision)
    except Exception as err:  # noqa: BLE001 - offline, gated, missing repository: one line
        reason = " ".join(str(err).split())[:200] or type(err).__name__
        raise ValueError(
            f"--base_config {repo_id}: its {filename} could not be fetched from the Hub ({reason}); "
            "pass --base_config DIR, a local diffusers folder of the same model"
        ) from None


def _model_index(config_dir: Path) -> dict:
    index = config_dir / "model_index.json"
    if not index.is_file():
        raise ValueError(f"--base_config {config_dir}: expected a diffusers folder with model_index.json")
    return json.loads(index.read_text())


def _load_clip(component_cls, config_dir: Path, component: str, kind: str, prefix: str, checkpoint: dict):
    """A CLIP text encoder built from the config folder's config, its weights from the single file."""
    from diffusers.loaders import single_file_utils as sfu
    from transformers import AutoConfig

    model = component_cls(AutoConfig.from_pretrained(config_dir, subfolder=component))
    if kind == "clip":
        state = sfu.convert_ldm_clip_checkpoint(checkpoint, prefix)
    else:
        state = sfu.convert_open_clip_checkpoint(model, checkpoint, prefix=prefix)
    if not hasattr(model, "text_model"):  # transformers 5 flattens CLIPTextModel; the converters keep the root
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    model.load_state_dict(state, strict=True)
    return model.eval()


def load_single_file_components(
    path: str | os.PathLike, base_config: str | os.PathLike, compute_dtype: torch.dtype | None = None
) -> tuple[str, dict[str, Any], dict]:
    """(family, components, model_index) of a single-file base, fully offline.

    Components the file holds get their weights from it (denoiser and VAE through diffusers'
    ``from_single_file`` with ``config=`` the folder; CLIPs through diffusers' converters); all others
    come from ``base_config`` (a local diffusers folder of the same family). The scheduler of a file with
    a "v_pred" marker predicts v. A ``.gguf`` file gives the denoiser only, its linear layers left
    block-quantized and computing in ``compute_dtype`` (fp32 when None).
    """

    from safetensors.torch import load_file

    path, config_dir = Path(path), Path(base_config)
    family, v_prediction = read_single_file_family(path)
    if not config_dir.is_dir():
        raise ValueError(f"--base_config {config_dir}: expected a local diffusers folder of a {family} model")
    model_index = _model_index(config_dir)
    config_family = family_of_model_dir(config_dir).name
    if config_family != family:
        raise ValueError(
            f"{path} is a {family} checkpoint but --base_config {config_dir} is a {config_family} model; "
            f"give a {family} folder"
        )
    gguf = is_gguf_file(path)
    checkpoint = {} if gguf else load_file(str(path))  # the CLIPs' converters take the whole file
    held = single_file_components_held(path)
    in_file = {c: (kind, prefix) for c, kind, prefix in SINGLE_FILE_LAYOUTS[family] if c in held}
    denoiser_kwargs = {"quantization_config": gguf_quantization_config(compute_dtype)} if gguf else {}
    components: dict[str, Any] = {}
    for name, component_cls in model_index_classes(model_index).items():
        if component_cls is None:
            components[name] = None
            continue
        if name not in in_file:
            kwargs = {"use_safetensors": True} if issubclass(component_cls, torch.nn.Module) else {}
            components[name] = component_cls.from_pretrained(config_dir, subfolder=name, **kwargs)
        elif in_file[name][0] in ("clip", "open_clip"):
            components[name] = _load_clip(component_cls, config_dir, name, *in_file[name], checkpoint)
        else:
            kwargs = denoiser_kwargs if name == FAMILIES[family].denoiser else {}
            components[name] = component_cls.from_single_file(
                str(path), config=str(config_dir), subfolder=name, **kwargs
            )
    if v_prediction and components.get("scheduler") is not None:
        components["scheduler"] = type(components["scheduler"]).from_config(
            components["scheduler"].config, prediction_type="v_prediction"
        )
    return family, components, model_index


def _holds(keys: set[str], kind: str, prefix: str) -> bool:
    if kind in TRANSFORMER_RULES:  # the family was detected from its transformer, bare-named or prefixed
        return True
    return any(k.startswith(prefix) for k in keys)
