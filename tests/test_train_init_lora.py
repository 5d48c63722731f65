"""--init_lora: training starts from an existing LoRA, step 0 equal to it (M = I, the file's ranks and alphas
module by module), whatever layout it is in; files that do not fit the base are one line and exit status 2."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import randomize_adapter
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from safetensors.torch import save_file
from test_train_args import _bad_input
from train_support import native_adapter, run_main, tiny_run_argv, train

from moslora_diffusion import MoSLoRAConfig, add_moslora
from moslora_diffusion.families import get_family
from moslora_diffusion.fileio import load_safetensors
from moslora_diffusion.formats import WEIGHT_NAMES
from moslora_diffusion.loaders import save_moslora_weights
from moslora_diffusion.testing import make_tiny_pipeline
from moslora_diffusion.training.init_lora import add_init_lora, read_init_lora

pytestmark = pytest.mark.usefixtures("one_thread")

# Module-by-module ranks and alphas, as community LoRAs have them (kohya's conv_dim, per-block alphas).
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
RANK_PATTERN = {"down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": 2}
ALPHA_PATTERN = {"up_blocks.0.attentions.1.transformer_blocks.0.attn2.to_v": 1.0}


def make_lora(family: str, folder, *, text_encoder: bool = True, moslora: bool = False, patterns: bool = True):
    """A random adapter on a tiny ``family`` pipeline, saved in our three layouts; returns the live pipeline."""
    pipe = make_tiny_pipeline(family)
    spec = get_family(family)
    patterns = {"rank_pattern": RANK_PATTERN, "alpha_pattern": ALPHA_PATTERN} if patterns else {}
    unet_config = (
        MoSLoRAConfig(r=4, lora_alpha=8, target_modules=UNET_TARGETS)
        if moslora
        else LoraConfig(r=4, lora_alpha=8, target_modules=UNET_TARGETS, **patterns)
    )
    models = {spec.denoiser: unet_config}
    if text_encoder:
        models[spec.text_encoders[0]] = LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "out_proj"])
    for i, (component, config) in enumerate(models.items()):
        model = getattr(pipe, component)
        add_moslora(model, config, "x") if isinstance(config, MoSLoRAConfig) else model.add_adapter(
            config, adapter_name="x"
        )
        randomize_adapter(model, "x", seed=i + 1)
    save_moslora_weights(pipe, folder, adapter_name="x")
    return pipe


def _lora_layers(model, adapter_name: str) -> dict[str, LoraLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer) and adapter_name in m.lora_A}


@pytest.mark.parametrize("layout", ["diffusers", "kohya", "native"])
def test_step_0_equals_the_file_exactly(layout, tmp_path):
    reference = make_lora("sd15", tmp_path, moslora=layout == "native")
    family = get_family("sd15")
    components = dict(make_tiny_pipeline("sd15").components)
    init = read_init_lora(str(tmp_path / WEIGHT_NAMES[layout]), family)
    assert (init.rank, init.lora_alpha) == (4, 8)
    trained = add_init_lora(
        components, family, init, target_modules=None, train_text_encoder=True, text_encoder_config=None,
        train_mixer=True, lora_dropout=0.0, adapter_name="default",
    )  # fmt: skip
    assert list(trained) == ["unet", "text_encoder"]
    for component in trained:
        want, got = _lora_layers(getattr(reference, component), "x"), _lora_layers(components[component], "default")
        assert got.keys() == want.keys()
        for name, layer in got.items():
            torch.testing.assert_close(
                layer.get_delta_weight("default"), want[name].get_delta_weight("x"), rtol=1e-6, atol=1e-7
            )
            mixer = layer.lora_mixer["default"].weight
            assert torch.equal(mixer, torch.eye(mixer.shape[0])) and mixer.requires_grad
    # One rank per MoSLoRA component: the rank-2 layer is padded with zeros to 4, its delta unchanged.
    padded = _lora_layers(components["unet"], "default")["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"]
    assert padded.r["default"] == 4
    if layout != "native":
        assert not padded.lora_A["default"].weight[2:].any() and not padded.lora_B["default"].weight[:, 2:].any()


def _image(pipe) -> np.ndarray:
    return pipe(
        "a photo",
        generator=torch.Generator().manual_seed(0),
        height=32,
        width=32,
        num_inference_steps=2,
        output_type="np",
    ).images


def _started_from(path, train_text_encoder: bool = False):
    pipe, family = make_tiny_pipeline("sd15"), get_family("sd15")
    add_init_lora(
        pipe.components, family, read_init_lora(str(path), family), target_modules=None,
        train_text_encoder=train_text_encoder, text_encoder_config=None, train_mixer=True, lora_dropout=0.0,
        adapter_name="default",
    )  # fmt: skip
    return pipe


def test_step_0_images_are_the_loras_own_with_per_module_ranks_and_alphas(tmp_path):
    live = make_lora("sd15", tmp_path)  # the LoRA itself, as PEFT runs it
    got = _image(_started_from(tmp_path / WEIGHT_NAMES["kohya"]))
    assert abs(got - _image(live)).max() < 1e-5
    assert abs(got - _image(make_tiny_pipeline("sd15"))).max() > 1e-3


def test_step_0_images_equal_stock_diffusers_loading_the_kohya_file(tmp_path):
    # One alpha for every module: diffusers 0.42's kohya converter drops per-module alphas of SD 1.x files
    # (its alpha_pattern keys, "...processor.to_v_lora.down.weight", match no module).
    make_lora("sd15", tmp_path, patterns=False)
    stock = make_tiny_pipeline("sd15")
    stock.load_lora_weights(str(tmp_path), weight_name=WEIGHT_NAMES["kohya"])
    assert abs(_image(_started_from(tmp_path / WEIGHT_NAMES["kohya"])) - _image(stock)).max() < 1e-5


def test_two_steps_from_a_kohya_file_train_the_unet_and_keep_its_text_encoder_layers(tmp_path):
    make_lora("sd15", tmp_path / "lora")
    kohya = tmp_path / "lora" / WEIGHT_NAMES["kohya"]
    out = train("sd15", tmp_path / "out", "--init_lora", str(kohya))
    start, _ = load_safetensors(tmp_path / "lora" / WEIGHT_NAMES["native"])
    end = native_adapter(out)
    assert end.keys() == start.keys() | {k.replace("lora_A", "lora_mixer") for k in start if "lora_A" in k}
    assert all(torch.isfinite(t).all() for t in end.values())
    unet_b = [k for k in start if k.startswith("unet.") and "lora_B" in k]
    assert any(not torch.equal(end[k], start[k]) for k in unet_b), "the unet's layers did not train"
    for key in (k for k in start if k.startswith("text_encoder.")):  # no --train_text_encoder: kept as in the file
        torch.testing.assert_close(end[key], start[key], rtol=0, atol=0)
    padded = end["unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"]
    assert padded.shape[0] == 4 and not padded[2:].any(), "the padding of a rank-2 layer stays zero"
    card = (out / "README.md").read_text()
    assert str(kohya) in card


def _sdxl_lora_without_family(tmp_path):
    """An SDXL kohya file with its metadata stripped: only its module names tell it is not for SD 1.5."""
    make_lora("sdxl", tmp_path / "sdxl")
    tensors, _ = load_safetensors(tmp_path / "sdxl" / WEIGHT_NAMES["kohya"])
    save_file(tensors, str(tmp_path / "anonymous.safetensors"))
    return tmp_path / "anonymous.safetensors"


def _sd15_lora(tmp_path, text_encoder=True):
    make_lora("sd15", tmp_path / "sd15", text_encoder=text_encoder)
    return tmp_path / "sd15" / WEIGHT_NAMES["diffusers"]


BAD_INIT_LORAS = {
    "a LoRA of another family": (
        lambda t: [str((make_lora("sdxl", t / "sdxl"), t / "sdxl")[1])],
        "a LoRA for sdxl, but the base is sd15",
    ),
    "modules the base lacks": (lambda t: [str(_sdxl_lora_without_family(t))], "names no module of this pipeline's"),
    "no such file": (lambda t: [str(t / "nope.safetensors")], "--init_lora: "),
    "a disagreeing --rank": (lambda t: [str(_sd15_lora(t)), "--rank", "8"], "--rank 8 disagrees with --init_lora"),
    "a disagreeing --target_modules": (
        lambda t: [str(_sd15_lora(t)), "--target_modules", "attention+ff"],
        "--target_modules attention+ff adapts",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INIT_LORAS))
def test_an_init_lora_that_does_not_fit_is_one_line(case, tmp_path, capsys):
    build, expected = BAD_INIT_LORAS[case]
    out = tmp_path / "out"
    path, *extra = build(tmp_path)
    argv = tiny_run_argv("sd15", out, "--init_lora", path, *extra)
    capsys.readouterr()
    _bad_input(capsys, argv, expected, out)


def test_agreeing_rank_and_target_modules_are_accepted(tmp_path):
    lora = _sd15_lora(tmp_path, text_encoder=False)
    out = tmp_path / "out"
    assert run_main(tiny_run_argv("sd15", out, "--init_lora", str(lora), "--rank", "4", "--target_modules",
                                  ",".join(UNET_TARGETS), "--max_train_steps", "1")) == 0  # fmt: skip


def test_train_mixer_only_moves_only_the_mixers_and_the_file_folds_them(tmp_path):
    """--train_mixer_only: A and B stay bit for bit as in the file; only M trains (r^2 per layer), and the
    folded diffusers file carries B·M, so stock diffusers draws the re-targeted adapter."""
    make_lora("sd15", tmp_path / "lora", text_encoder=False, patterns=False)  # one rank: no padding to compare
    native = tmp_path / "lora" / WEIGHT_NAMES["native"]
    out = train("sd15", tmp_path / "out", "--init_lora", str(native), "--train_mixer_only")
    start, _ = load_safetensors(native)
    end = native_adapter(out)
    for key in start:  # A and B: unchanged, exactly
        torch.testing.assert_close(end[key], start[key], rtol=0, atol=0)
    mixers = {k: v for k, v in end.items() if "lora_mixer" in k}
    assert mixers and any(not torch.equal(m, torch.eye(m.shape[0])) for m in mixers.values()), "no mixer trained"
    folded, _ = load_safetensors(out / WEIGHT_NAMES["diffusers"])
    assert folded, "the run wrote no folded file"


@pytest.mark.parametrize(
    "extra, expected",
    [
        ([], "--train_mixer_only trains M between a fixed A and B, which must come from a LoRA: add --init_lora"),
        (["--init_lora", "x.safetensors", "--freeze_mixer"], "--train_mixer_only trains only the mixer"),
    ],
)
def test_train_mixer_only_without_a_lora_or_with_a_frozen_mixer_is_one_line(extra, expected, tmp_path, capsys):
    out = tmp_path / "out"
    _bad_input(capsys, tiny_run_argv("sd15", out, "--train_mixer_only", *extra), expected, out)
