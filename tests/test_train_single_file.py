"""Training on a single-file base (``--pretrained_model_name_or_path FILE.safetensors --base_config DIR``):
the family from the file's keys, its weights from the file, the rest from the config folder; bad inputs
are one line and exit status 2."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file
from test_merge_single_file import _flux_converter_for_width
from test_single_file_bases import write_single_file
from test_train_args import _bad_input
from train_support import PROMPT, tiny_run_argv, train

from moslora_diffusion.families import get_family
from moslora_diffusion.fileio import load_safetensors
from moslora_diffusion.single_file import single_file_components
from moslora_diffusion.testing import make_tiny_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def tiny_flux_converter(monkeypatch):
    """diffusers' Flux converter hard-codes FLUX.1's width (3072); the tiny model's is 32."""
    from diffusers.loaders import single_file_model

    mapping = dict(single_file_model.SINGLE_FILE_LOADABLE_CLASSES["FluxTransformer2DModel"])
    mapping["checkpoint_mapping_fn"] = _flux_converter_for_width(32)
    monkeypatch.setitem(single_file_model.SINGLE_FILE_LOADABLE_CLASSES, "FluxTransformer2DModel", mapping)


def single_file_base(family: str, folder):
    """(single file of a seed-1 tiny pipeline, config folder of the seed-0 one, the file's folder twin)."""
    config_dir = folder / "config"
    make_tiny_pipeline(family, seed=0).save_pretrained(config_dir, safe_serialization=True)
    source = write_single_file(family, folder / f"{family}.safetensors", seed=1)
    twin = make_tiny_pipeline(family, seed=0)  # what the trainer builds: the file's components, the folder's others
    twin.register_modules(**{name: getattr(source, name) for name in single_file_components(family)})
    return folder / f"{family}.safetensors", config_dir, twin


def _validation_image(pipe, family: str, output_type: str = "pil") -> np.ndarray:
    kwargs = get_family(family).pipeline_call_kwargs(32)
    generator = torch.Generator().manual_seed(0)
    image = pipe(
        PROMPT, generator=generator, output_type=output_type, height=32, width=32, num_inference_steps=2, **kwargs
    ).images[0]
    return np.asarray(image, dtype=np.int16) if output_type == "pil" else image


@pytest.mark.parametrize("family", ["sd15", "sdxl", "flux"])
def test_training_on_a_single_file_uses_its_weights_and_loads_back_in_stock_diffusers(
    family, tmp_path, tiny_flux_converter
):
    path, config_dir, twin = single_file_base(family, tmp_path)
    extra = ["--learning_rate", "5e-2"] if family == "flux" else []
    out = train(
        family, tmp_path / "out", "--pretrained_model_name_or_path", str(path), "--base_config", str(config_dir), *extra
    )

    front = yaml.safe_load((out / "README.md").read_text().split("---")[1])
    assert front["base_model"] == str(path)  # the card and the adapter files name the file, not the config folder
    tensors, metadata = load_safetensors(out / "moslora_weights.safetensors")
    assert json.loads(metadata["moslora"])["base_model"] == str(path)
    assert load_safetensors(out / "pytorch_lora_weights_kohya.safetensors")[1]["ss_sd_model_name"] == str(path)
    assert all(torch.isfinite(t).all() for t in tensors.values())

    base_image = _validation_image(twin, family, output_type="np")
    twin.load_lora_weights(str(out))
    trained = np.asarray(Image.open(out / "image_0.png"), dtype=np.int16)
    # The run's own image, reproduced on the file's weights: the trainer trained on them, not on the folder's.
    assert np.abs(_validation_image(twin, family) - trained).max() <= 2
    assert np.abs(_validation_image(twin, family, output_type="np") - base_image).max() > 1e-3


def _mystery_file(tmp_path):
    save_file({"encoder.mystery.weight": torch.zeros(1)}, str(tmp_path / "mystery.safetensors"))
    return tmp_path / "mystery.safetensors"


def _pickle(tmp_path):
    (tmp_path / "model.ckpt").write_bytes(b"never opened")
    return tmp_path / "model.ckpt"


def _sd15_file(tmp_path):
    write_single_file("sd15", tmp_path / "sd15.safetensors")
    return tmp_path / "sd15.safetensors"


def _config_folder(family, tmp_path):
    folder = tmp_path / f"config_{family}"
    make_tiny_pipeline(family).save_pretrained(folder, safe_serialization=True)
    return folder


BAD_SINGLE_FILES = {
    "unknown family": (lambda t: ["--pretrained_model_name_or_path", str(_mystery_file(t))], "match no known family"),
    "pickled checkpoint": (
        lambda t: ["--pretrained_model_name_or_path", str(_pickle(t))],
        "pickled checkpoints can run code",
    ),
    "config folder of another family": (
        lambda t: [
            "--pretrained_model_name_or_path",
            str(_sd15_file(t)),
            "--base_config",
            str(_config_folder("sdxl", t)),
        ],
        "is a sd15 checkpoint but --base_config",
    ),
    "default config needs the hub": (
        lambda t: ["--pretrained_model_name_or_path", str(_sd15_file(t))],
        "by default the hub repository stable-diffusion-v1-5/stable-diffusion-v1-5, which could not be fetched",
    ),
    "missing config folder": (
        lambda t: ["--pretrained_model_name_or_path", str(_sd15_file(t)), "--base_config", str(t / "nope")],
        "is neither a diffusers pipeline folder nor a hub id",
    ),
    "base_config without a single file": (lambda t: ["--base_config", str(t)], "leave --base_config out"),
}


@pytest.mark.parametrize("case", list(BAD_SINGLE_FILES))
def test_bad_single_file_inputs_are_one_line(case, tmp_path, capsys):
    flags, expected = BAD_SINGLE_FILES[case]
    out = tmp_path / "out"
    argv = tiny_run_argv("sd15", out, *flags(tmp_path))
    capsys.readouterr()  # the fixtures' own progress bars
    _bad_input(capsys, argv, expected, out)
