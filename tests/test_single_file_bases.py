"""Single-file checkpoints as bases (moslora_diffusion.single_file_bases): the family from the keys,
every component loaded offline with the weights of the pipeline the file was written from."""

from __future__ import annotations

import pytest
import torch
from family_sets import SINGLE_FILE_FAMILIES
from safetensors.torch import save_file
from test_merge_single_file import _chroma_converter_for_width, _flux_converter_for_width

from moslora_diffusion.single_file import single_file_components, to_original_state_dict
from moslora_diffusion.single_file_bases import (
    detect_single_file_family,
    load_single_file_components,
    read_single_file_family,
)
from moslora_diffusion.testing import make_tiny_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")


def write_single_file(family: str, path, seed: int = 0, marker: bool = False):
    """A tiny pipeline (weights differ from the config folder's: another seed) as one single file."""
    pipe = make_tiny_pipeline(family, seed=seed)
    components = single_file_components(family)
    # Only diffusers configs matter to the layout (transformers' are not mappings).
    configs = {c: dict(getattr(pipe, c).config) for c in components if hasattr(getattr(pipe, c).config, "keys")}
    state = to_original_state_dict(family, {c: getattr(pipe, c).state_dict() for c in components}, configs)
    if marker:
        state["v_pred"] = torch.zeros(0)
    save_file(state, str(path))
    return pipe


@pytest.fixture(scope="module")
def config_folders(tmp_path_factory):
    made = {}

    def get(family):
        if family not in made:
            made[family] = tmp_path_factory.mktemp(f"config_{family}")
            make_tiny_pipeline(family, seed=0).save_pretrained(made[family], safe_serialization=True)
        return made[family]

    return get


@pytest.fixture
def tiny_flux_converter(monkeypatch):
    """diffusers' Flux and Chroma converters hard-code FLUX.1's width (3072); the tiny models' is 32."""
    from diffusers.loaders import single_file_model

    for name, converter in (
        ("FluxTransformer2DModel", _flux_converter_for_width(32)),
        ("ChromaTransformer2DModel", _chroma_converter_for_width(32)),
    ):
        mapping = dict(single_file_model.SINGLE_FILE_LOADABLE_CLASSES[name])
        mapping["checkpoint_mapping_fn"] = converter
        monkeypatch.setitem(single_file_model.SINGLE_FILE_LOADABLE_CLASSES, name, mapping)


@pytest.mark.parametrize("family", SINGLE_FILE_FAMILIES)
def test_the_family_is_read_from_the_keys(family, tmp_path):
    write_single_file(family, tmp_path / "model.safetensors")
    assert read_single_file_family(tmp_path / "model.safetensors") == (family, False)


@pytest.mark.parametrize("family, proj_in_ndim", [("sd15", 4), ("sd2", 2)])
def test_a_unet_only_file_is_told_apart_by_its_proj_in(family, proj_in_ndim):
    keys = {"model.diffusion_model.input_blocks.1.1.proj_in.weight", "first_stage_model.encoder.conv_in.weight"}
    assert detect_single_file_family(keys, proj_in_ndim) == family
    assert detect_single_file_family({"double_blocks.0.img_attn.qkv.weight"}) == "flux"


def test_flux_relatives_are_told_apart_from_flux():
    """Chroma and Flux.2 files hold Flux's double_blocks.0.img_attn.qkv.weight too."""
    flux = {"double_blocks.0.img_attn.qkv.weight", "img_in.weight"}
    assert detect_single_file_family(flux | {"distilled_guidance_layer.in_proj.weight"}) == "chroma"
    flux2 = flux | {"single_stream_modulation.lin.weight"}
    assert detect_single_file_family(flux2) == "flux2_klein"
    assert detect_single_file_family(flux2 | {"guidance_in.in_layer.weight"}) == "flux2"
    assert detect_single_file_family({f"model.diffusion_model.{k}" for k in flux2}) == "flux2_klein"


@pytest.mark.parametrize("family", SINGLE_FILE_FAMILIES)
def test_loading_gives_the_single_files_weights(family, tmp_path, config_folders, tiny_flux_converter):
    path = tmp_path / "model.safetensors"
    source = write_single_file(family, path, seed=1, marker=family == "sd2")
    got_family, components, model_index = load_single_file_components(path, config_folders(family))
    assert got_family == family and "_class_name" in model_index
    base = make_tiny_pipeline(family, seed=0)
    for name in ("unet", "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        if getattr(base, name, None) is None:
            continue
        # Held by the file: the file's weights (seed 1); not held (T5, Flux's CLIP and VAE): the folder's.
        expected = source if name in single_file_components(family) else base
        got, want = components[name].state_dict(), getattr(expected, name).state_dict()
        assert got.keys() == want.keys(), name
        for key, value in want.items():
            assert torch.equal(got[key], value), f"{name}.{key}"
    expected_prediction = "v_prediction" if family == "sd2" else base.scheduler.config.get("prediction_type")
    assert components["scheduler"].config.get("prediction_type") == expected_prediction


def test_a_pickled_checkpoint_is_refused(tmp_path):
    (tmp_path / "model.ckpt").write_bytes(b"not opened")
    message = "model.ckpt: pickled checkpoints can run code when loaded; convert it to .safetensors first"
    with pytest.raises(ValueError, match=message):
        read_single_file_family(tmp_path / "model.ckpt")


def test_a_file_of_no_known_family_is_refused(tmp_path):
    save_file({"encoder.mystery.weight": torch.zeros(1)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ValueError, match=r"match no known family .*found e.g. encoder.mystery.weight"):
        read_single_file_family(tmp_path / "x.safetensors")


def test_a_config_folder_of_another_family_is_refused(tmp_path, config_folders):
    write_single_file("sd15", tmp_path / "model.safetensors")
    message = r"model.safetensors is a sd15 checkpoint but --base_config .* is a sdxl model"
    with pytest.raises(ValueError, match=message):
        load_single_file_components(tmp_path / "model.safetensors", config_folders("sdxl"))


def test_a_v_pred_marker_makes_the_scheduler_predict_v(tmp_path, config_folders):
    write_single_file("sd15", tmp_path / "model.safetensors", marker=True)
    _, components, _ = load_single_file_components(tmp_path / "model.safetensors", config_folders("sd15"))
    assert components["scheduler"].config.prediction_type == "v_prediction"
