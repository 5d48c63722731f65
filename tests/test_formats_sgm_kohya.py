"""SDXL's kohya file names the UNet as sd-scripts' SDXL UNet does (lora_unet_input_blocks_4_1_...), and every
reader of ours takes it back exactly: load_moslora_weights, merge, inspect, --init_lora, export and resize.
(Stock diffusers, ComfyUI and LyCORIS read it in test_loaders.py.)"""

from __future__ import annotations

import logging
import re

import pytest
import torch
from conftest import randomize_adapter
from diffusers import UNet2DConditionModel
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file

from moslora_diffusion import MoSLoRAConfig, add_moslora
from moslora_diffusion.cli import main
from moslora_diffusion.families import get_family
from moslora_diffusion.formats import (
    DIFFUSERS_WEIGHT_NAME,
    KOHYA_WEIGHT_NAME,
    NATIVE_WEIGHT_NAME,
    kohya_file_state_dict,
    read_adapter_file,
)
from moslora_diffusion.formats.sgm_names import sgm_module_names, unet_layout_of_paths, with_sgm_unet_names
from moslora_diffusion.loaders import adapter_state_from_pipeline, fit_adapter_to_models, save_moslora_weights
from moslora_diffusion.merge import merge_adapters
from moslora_diffusion.testing import make_tiny_pipeline
from moslora_diffusion.training.init_lora import add_init_lora, read_init_lora

pytestmark = pytest.mark.usefixtures("one_thread")

SGM_UNET_KEY = re.compile(r"lora_unet_(input_blocks|middle_block|output_blocks)_\d")
# stabilityai/stable-diffusion-xl-base-1.0's unet/config.json, the parts its module tree depends on.
SDXL_UNET = dict(
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
    use_linear_projection=True,
)


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    """A tiny SDXL pipeline with MoSLoRA (attention+ff) on the UNet and plain LoRA on CLIP-L, saved."""
    pipe = make_tiny_pipeline("sdxl")
    add_moslora(pipe.unet, MoSLoRAConfig(r=4, lora_alpha=8, target_modules="attention+ff"))
    add_moslora(pipe.text_encoder, MoSLoRAConfig(r=2, lora_alpha=3))
    randomize_adapter(pipe.unet, "default", seed=1)
    randomize_adapter(pipe.text_encoder, "default", seed=2)
    directory = tmp_path_factory.mktemp("sdxl")
    save_moslora_weights(pipe, directory, base_model="tiny/sdxl")
    return pipe, directory


def _deltas(state) -> dict[str, torch.Tensor]:
    return {f"{c}.{p}": layer.delta_weight() for c, p, layer in state.layer_items()}


def _lora_deltas(unet) -> dict[str, torch.Tensor]:
    return {name: m.get_delta_weight("default") for name, m in unet.named_modules() if isinstance(m, LoraLayer)}


def _assert_same_deltas(got, want) -> None:
    assert got.keys() == want.keys()
    for key, delta in want.items():
        torch.testing.assert_close(got[key], delta, rtol=1e-6, atol=1e-7, msg=key)


def test_the_sdxl_kohya_file_has_sd_scripts_unet_names_and_the_diffusers_file_diffusers_ones(sdxl):
    _, directory = sdxl
    kohya = {k.split(".")[0] for k in load_file(directory / KOHYA_WEIGHT_NAME)}
    unet = {k for k in kohya if k.startswith("lora_unet_")}
    assert unet and all(SGM_UNET_KEY.match(k) for k in unet)
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in unet  # down_blocks.1.attentions.0
    assert "lora_unet_output_blocks_0_1_transformer_blocks_1_ff_net_2" in unet  # up_blocks.0.attentions.0
    assert "lora_unet_middle_block_1_proj_in" in unet
    # The diffusers file keeps diffusers names: LyCORIS on a diffusers UNet reads only those.
    diffusers = {k.split(".")[0] for k in load_file(directory / DIFFUSERS_WEIGHT_NAME)}
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q" in diffusers
    assert len(diffusers) == len(kohya)


def test_our_readers_take_the_sgm_names_back_exactly(sdxl):
    pipe, directory = sdxl
    want = _deltas(adapter_state_from_pipeline(pipe))
    state = read_adapter_file(directory / KOHYA_WEIGHT_NAME)
    assert state.source_format == "kohya" and state.family == "sdxl"
    models = {c: getattr(make_tiny_pipeline("sdxl"), c) for c in ("unet", "text_encoder", "text_encoder_2")}
    _assert_same_deltas(_deltas(fit_adapter_to_models(state, models, get_family("sdxl"))), want)


def test_merge_of_the_sgm_named_file_equals_the_merge_of_the_native_one(sdxl):
    _, directory = sdxl
    got = merge_adapters(make_tiny_pipeline("sdxl"), [(directory / KOHYA_WEIGHT_NAME, 0.7)])
    want = merge_adapters(make_tiny_pipeline("sdxl"), [(directory / NATIVE_WEIGHT_NAME, 0.7)])
    for component in ("unet", "text_encoder"):
        expected = getattr(want, component).state_dict()
        for key, value in getattr(got, component).state_dict().items():
            torch.testing.assert_close(value, expected[key], rtol=0, atol=1e-6, msg=f"{component}.{key}")


def test_init_lora_from_the_sgm_named_file_starts_at_the_file(sdxl):
    pipe, directory = sdxl
    family = get_family("sdxl")
    components = dict(make_tiny_pipeline("sdxl").components)
    init = read_init_lora(str(directory / KOHYA_WEIGHT_NAME), family)
    add_init_lora(
        components, family, init, target_modules=None, train_text_encoder=False, text_encoder_config=None,
        train_mixer=True, lora_dropout=0.0, adapter_name="default",
    )  # fmt: skip
    got, want = _lora_deltas(components["unet"]), _lora_deltas(pipe.unet)
    assert len(got) == len(want) > 0
    _assert_same_deltas(got, want)


def test_inspect_fits_the_sgm_named_file_to_an_sdxl_folder(sdxl, tmp_path, capsys):
    from moslora_diffusion.testing import save_tiny_pipeline

    _, directory = sdxl
    base = save_tiny_pipeline("sdxl", tmp_path / "sdxl")
    code = main(["inspect", str(directory / KOHYA_WEIGHT_NAME), "--pretrained_model_name_or_path", str(base)])
    out = capsys.readouterr().out
    assert code == 0 and "format:     kohya" in out and "fits:" in out


def test_export_without_the_unet_config_writes_the_same_file_as_save(sdxl, tmp_path, capsys):
    _, directory = sdxl
    assert main(["export", str(directory), "--layout", "kohya", "--output_dir", str(tmp_path)]) == 0
    exported, saved = load_file(tmp_path / KOHYA_WEIGHT_NAME), load_file(directory / KOHYA_WEIGHT_NAME)
    assert exported.keys() == saved.keys()
    for key, value in saved.items():
        assert torch.equal(exported[key], value), key


def test_resize_keeps_the_sgm_names(sdxl, tmp_path, capsys):
    _, directory = sdxl
    out = tmp_path / "small"
    assert main(["resize", str(directory / KOHYA_WEIGHT_NAME), "--rank", "2", "--output_dir", str(out)]) == 0
    names = {k.split(".")[0] for k in load_file(out / KOHYA_WEIGHT_NAME)}
    assert names == {k.split(".")[0] for k in load_file(directory / KOHYA_WEIGHT_NAME)}


@pytest.mark.parametrize("targets", [("to_q", "to_k", "to_v", "to_out.0"), ("proj_in", "ff.net.2", "conv1", "conv2")])
def test_the_layout_read_from_full_sdxl_paths_gives_the_configs_names(targets):
    """Without the UNet's config (export, resize) the SGM names of a real SDXL UNet come out the same."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET)
    paths = [name for name, _ in unet.named_modules() if name.endswith(targets)]
    from_config = sgm_module_names(unet.config, paths)
    assert sgm_module_names(unet_layout_of_paths(paths), paths) == from_config
    assert len(from_config) == len(paths)
    known = {  # sd-scripts' sdxl_model_util.make_unet_conversion_map: input_blocks.{3i+j+1}, output_blocks.{3i+j}
        "input_blocks.7.1.transformer_blocks.9.attn1.to_q": "down_blocks.2.attentions.0.transformer_blocks.9.attn1.to_q",
        "output_blocks.5.1.transformer_blocks.1.ff.net.2": "up_blocks.1.attentions.2.transformer_blocks.1.ff.net.2",
        "output_blocks.8.0.out_layers.3": "up_blocks.2.resnets.2.conv2",
        "middle_block.2.in_layers.2": "mid_block.resnets.1.conv1",
    }
    assert {sgm: path for sgm, path in known.items() if sgm in from_config}.items() <= from_config.items()
    assert any(sgm in from_config for sgm in known)


def test_an_adapter_whose_layout_cannot_be_read_keeps_diffusers_names_with_a_warning(sdxl, caplog):
    pipe, _ = sdxl
    state = adapter_state_from_pipeline(pipe)
    unet = state.components["unet"]
    unet.layers = {p: layer for p, layer in unet.layers.items() if p.startswith("down_blocks.1.")}
    with pytest.raises(ValueError, match="layers_per_block cannot be read"):
        with_sgm_unet_names(state, "unet")
    with caplog.at_level(logging.WARNING):
        tensors, _ = kohya_file_state_dict(state)
    assert "lora_unet_down_blocks_" in caplog.text
    assert all(k.startswith(("lora_unet_down_blocks_1_", "lora_te1_")) for k in tensors)
    # With the UNet's config the same adapter gets its SGM names.
    tensors, _ = kohya_file_state_dict(state, denoiser_config=dict(pipe.unet.config))
    assert any(k.startswith("lora_unet_input_blocks_4_1_") for k in tensors)
