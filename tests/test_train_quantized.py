"""--quantize_base: the choices are checked before loading, and an adapter trained over a quantized base is
the same file as over a full-precision one: stock diffusers over the full-precision base draws what the
quantized pipeline drew, within the quantization's own error; folded and kohya files equal the native one."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from PIL import Image
from train_support import PROMPT, native_adapter, run_main, tiny_run_argv, train

from moslora_diffusion.families import get_family
from moslora_diffusion.loaders import load_moslora_weights
from moslora_diffusion.testing import make_tiny_pipeline
from moslora_diffusion.training import quantization
from moslora_diffusion.training.base_model import resolve_base_model
from moslora_diffusion.training.quantization import BaseQuantization, is_quantized, resolve_quantization

pytestmark = pytest.mark.usefixtures("one_thread")
_HAS_TORCHAO = importlib.util.find_spec("torchao") is not None
_HAS_QUANTO = importlib.util.find_spec("optimum") is not None and importlib.util.find_spec("optimum.quanto") is not None


def _bad_input(capsys, argv, expected: str, output_dir) -> None:
    assert run_main(argv) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and "error:" in lines[0] and expected in lines[0], lines
    assert not output_dir.exists(), "bad input must not create the output folder"


BAD = {
    "nf4 on CPU": (["--quantize_base", "nf4"], "--quantize_base nf4 needs a CUDA GPU (bitsandbytes); without one use int8 or fp8"),
    "bitsandbytes on CPU": (["--quantize_base", "int8", "--quantization_backend", "bitsandbytes"], "bitsandbytes needs a CUDA GPU"),
    "quanto has no nf4": (["--quantize_base", "nf4", "--quantization_backend", "quanto"], "--quantization_backend quanto has no nf4; use bitsandbytes"),
    "backend alone": (["--quantization_backend", "torchao"], "need --quantize_base int8|fp8|nf4"),
    "text encoders alone": (["--quantize_text_encoders"], "need --quantize_base int8|fp8|nf4"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD))
def test_bad_quantization_choices_are_one_line_exit_2(case, tmp_path, capsys):
    extra, expected = BAD[case]
    out = tmp_path / "out"
    _bad_input(capsys, tiny_run_argv("sd15", out, *extra), expected, out)


def test_a_missing_backend_names_the_pip_command_before_loading(tmp_path, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        quantization.importlib.util, "find_spec", lambda name, *a: None if name == "optimum" else real(name, *a)
    )
    out = tmp_path / "out"
    argv = tiny_run_argv("sd15", out, "--quantize_base", "fp8")
    _bad_input(capsys, argv, "needs optimum-quanto: pip install optimum-quanto", out)


def test_auto_picks_per_device():
    pick = lambda kind, cuda: resolve_quantization(kind, "auto", False, cuda).backend  # noqa: E731
    if _HAS_TORCHAO and _HAS_QUANTO:
        assert (pick("int8", False), pick("fp8", False), pick("fp8", True)) == ("torchao", "quanto", "torchao")
    if importlib.util.find_spec("bitsandbytes"):
        assert (pick("int8", True), pick("nf4", True)) == ("bitsandbytes", "bitsandbytes")


@pytest.mark.skipif(not _HAS_QUANTO, reason="optimum-quanto is not installed")
@pytest.mark.parametrize("train_text_encoder", [False, True])
def test_quantize_text_encoders_quantizes_the_frozen_ones_only(train_text_encoder):
    base = resolve_base_model("tiny:flux")
    trained = base.family.trainable_text_encoders if train_text_encoder else ()
    quantization = BaseQuantization("int8", "quanto", text_encoders=True)
    components = base.load_components(
        quantization=quantization, torch_dtype=torch.float32, trained_text_encoders=trained
    )
    assert is_quantized(components["transformer"])
    assert is_quantized(components["text_encoder_2"])  # T5
    assert is_quantized(components["text_encoder"]) is not train_text_encoder  # CLIP, trained or frozen
    assert not is_quantized(components["vae"])


def _image(pipe, output_type="np"):
    kwargs = get_family("sd15").pipeline_call_kwargs(32)
    generator = torch.Generator().manual_seed(0)
    size = {"height": 32, "width": 32, "num_inference_steps": 2}
    image = pipe(PROMPT, generator=generator, output_type=output_type, **size, **kwargs)
    return np.asarray(image.images[0], dtype=np.float64 if output_type == "np" else np.int16)


@pytest.mark.skipif(not _HAS_TORCHAO, reason="torchao is not installed")
def test_an_adapter_trained_over_an_int8_base_is_independent_of_the_quantization(tmp_path):
    out = train("sd15", tmp_path / "out", "--quantize_base", "int8", "--max_train_steps", "4")
    drawn_quantized = np.asarray(Image.open(out / "image_0.png"), dtype=np.int16)  # the quantized pipeline's

    full = make_tiny_pipeline("sd15")
    base_full = _image(full, "pil")
    quantized_base = make_tiny_pipeline("sd15")
    quantized_base.unet = resolve_base_model("tiny:sd15").load_components(
        quantization=BaseQuantization("int8", "torchao"), torch_dtype=torch.float32
    )["unet"]
    quantization_error = np.abs(_image(quantized_base, "pil") - base_full).max()  # the base alone, 0-255

    full.load_lora_weights(str(out))  # stock diffusers, folded file, full-precision base
    drawn_full = _image(full, "pil")
    difference = np.abs(drawn_full - drawn_quantized).max()
    print(f"int8 (torchao) base: quantization alone moves pixels by {quantization_error}/255; "
          f"the adapter over the full-precision base draws the quantized run's image within {difference}/255")  # fmt: skip
    assert difference <= quantization_error + 2
    assert np.abs(drawn_full - base_full).max() > 2, "the adapter did not train"

    # folded (stock), kohya (stock) and native (ours) files give the same model over the full-precision base
    folded = _image(full)
    kohya = make_tiny_pipeline("sd15")
    kohya.load_lora_weights(str(out), weight_name="pytorch_lora_weights_kohya.safetensors")
    native = make_tiny_pipeline("sd15")
    assert load_moslora_weights(native, out, weight_name="moslora_weights.safetensors", trainable=True) == "native"
    for other in (_image(kohya), _image(native)):
        assert np.abs(other - folded).max() <= 1e-5


@pytest.mark.skipif(not _HAS_QUANTO, reason="optimum-quanto is not installed")
def test_quanto_int8_trains_sdxl_in_bf16_on_the_cpu(tmp_path):
    """optimum-quanto's bf16 int8 CPU kernel refuses SDXL's proj_in input (a permuted feature map, strided last
    dimension); the trainer hands quanto layers contiguous inputs, so the run trains instead of crashing."""
    out = train(
        "sdxl", tmp_path / "out", "--quantize_base", "int8", "--quantization_backend", "quanto",
        "--mixed_precision", "bf16", "--max_train_steps", "2",
    )  # fmt: skip
    adapter = native_adapter(out)
    assert adapter and all(torch.isfinite(t.float()).all() for t in adapter.values())
