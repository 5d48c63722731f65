"""GGUF bases (``--pretrained_model_name_or_path FILE.gguf --base_config DIR``): the transformer from a
block-quantized GGUF file read by diffusers, MoSLoRA over its GGUFLinear layers (dequant(W) x + s B M A x,
gradients to A, M, B only), adapter files independent of the quantization, merges refused into the GGUF
and done into its full-precision twin, bad files one line and exit status 2."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from family_sets import GGUF_FAMILIES
from PIL import Image
from safetensors.torch import load_file
from test_merge import merge_main
from test_single_file_bases import tiny_flux_converter, write_single_file  # noqa: F401  (fixture: Flux and Chroma widths)
from test_train_args import _bad_input
from test_train_single_file import _validation_image
from train_support import tiny_run_argv, train

from moslora_diffusion import MoSLoRAConfig, add_moslora
from moslora_diffusion.families import get_family
from moslora_diffusion.layer import moslora_layers
from moslora_diffusion.single_file import single_file_components, to_original_state_dict
from moslora_diffusion.single_file_bases import load_single_file_components, read_single_file_family
from moslora_diffusion.testing import make_tiny_pipeline
from moslora_diffusion.training.quantization import BaseQuantization, is_quantized
from moslora_diffusion.training.run_inputs import parse_run

gguf = pytest.importorskip("gguf")
from diffusers.quantizers.gguf.utils import GGUFLinear, dequantize_gguf_tensor  # noqa: E402  (needs gguf)

pytestmark = pytest.mark.usefixtures("one_thread", "tiny_flux_converter")

BLOCK = 32  # Q8_0 and Q4_0 quantize rows in blocks of 32 values (the K-quants need 256: wider than tiny models)
# the quantization's own error, relative to the weight's largest entry (8 bits: half a step of 127; 4 bits: of 7)
QUANT_ERROR = {"Q8_0": 0.01, "Q4_0": 0.15}


def write_gguf(path, state: dict[str, torch.Tensor], quant_type: str = "Q8_0", arch: str = "flux") -> None:
    """A GGUF file as city96's converter writes one: linear weights in ``quant_type`` blocks, the rest F32."""
    qtype = gguf.GGMLQuantizationType[quant_type]
    writer = gguf.GGUFWriter(str(path), arch=arch)
    for name, tensor in state.items():
        array = tensor.float().numpy()
        if array.ndim == 2 and array.shape[1] % BLOCK == 0:
            blocks = gguf.quants.quantize(array, qtype)
            writer.add_tensor(name, blocks, raw_shape=blocks.shape, raw_dtype=qtype)
        else:
            writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_gguf_base(family: str, folder, quant_type: str = "Q8_0"):
    """(GGUF of the seed-1 tiny denoiser in its original names, config folder of the seed-0 pipeline, the seed-1
    pipeline the file was made from)."""
    config_dir = folder / "config"
    if not config_dir.exists():
        make_tiny_pipeline(family, seed=0).save_pretrained(config_dir, safe_serialization=True)
    source = make_tiny_pipeline(family, seed=1)
    components = single_file_components(family)
    configs = {c: dict(getattr(source, c).config) for c in components}
    state = to_original_state_dict(family, {c: getattr(source, c).state_dict() for c in components}, configs)
    prefix = {c: p for c, _, p in get_family(family).single_file_layout}[get_family(family).denoiser]
    denoiser = {name: tensor for name, tensor in state.items() if name.startswith(prefix)}
    path = folder / f"{family}-{quant_type}.gguf"
    write_gguf(path, denoiser, quant_type)
    return path, config_dir, source


def _quantized_layers(model) -> dict[str, torch.nn.Module]:
    """The MoSLoRA layers whose base is a GGUFLinear, by name."""
    return {name: layer for name, layer in moslora_layers(model) if isinstance(layer.get_base_layer(), GGUFLinear)}


CASES = [("flux", "Q8_0"), ("flux", "Q4_0"), *((f, "Q8_0") for f in GGUF_FAMILIES if f != "flux")]


@pytest.mark.parametrize("family, quant_type", CASES)
def test_an_adapted_gguf_layer_computes_the_dequantized_weight_plus_the_mixed_delta(family, quant_type, tmp_path):
    path, config_dir, source = write_gguf_base(family, tmp_path, quant_type)
    assert read_single_file_family(path) == (family, False)
    _, components, _ = load_single_file_components(path, config_dir)
    denoiser = components[get_family(family).denoiser]
    full = dict(getattr(source, get_family(family).denoiser).named_modules())
    add_moslora(denoiser, MoSLoRAConfig(r=4, lora_alpha=8))
    layers = _quantized_layers(denoiser)
    assert len(layers) >= 4, "the GGUF file's attention projections should load as GGUFLinear"
    trainable = {name.rsplit(".", 3)[1] for name, p in denoiser.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A", "lora_mixer", "lora_B"}

    torch.manual_seed(0)
    for name, layer in layers.items():
        weight = dequantize_gguf_tensor(layer.get_base_layer().weight).float()
        original = full[name].weight
        # the file holds the source model's weights, within the block quantization's own error
        assert (weight - original).abs().max() <= QUANT_ERROR[quant_type] * original.abs().max(), name
        torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.5)
        x = torch.randn(3, layer.in_features)
        a, m, b = (getattr(layer, f)["default"].weight for f in ("lora_A", "lora_mixer", "lora_B"))
        leaves = [t.detach().clone().requires_grad_() for t in (a, m, b)]
        expected = torch.nn.functional.linear(
            x, weight + layer.scaling["default"] * leaves[2] @ leaves[1] @ leaves[0], layer.get_base_layer().bias
        )
        y = layer(x)
        assert (y - expected).abs().max() <= 1e-5 * expected.abs().max(), name
        y.square().sum().backward()
        expected.square().sum().backward()
        for got, want in zip((a, m, b), leaves):
            assert (got.grad - want.grad).abs().max() <= 1e-4 * want.grad.abs().max(), name
        assert layer.get_base_layer().weight.grad is None


def _saved_bytes_and_grads(layer, x):
    """(largest tensor autograd saved in the forward, output, dL/dx, dL/dA, dL/dM, dL/dB) of ``layer`` on ``x``."""
    saved = []
    x = x.clone().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(
        lambda t: saved.append(t.numel() * t.element_size()) or t, lambda t: t
    ):
        y = layer(x)
    y.square().sum().backward()
    grads = [getattr(layer, f)["default"].weight.grad.clone() for f in ("lora_A", "lora_mixer", "lora_B")]
    for f in ("lora_A", "lora_mixer", "lora_B"):
        getattr(layer, f)["default"].weight.grad = None
    return max(saved), y.detach(), x.grad, *grads


@pytest.mark.parametrize("quant_type", ["Q8_0", "Q4_0"])
def test_gguf_layers_keep_no_dequantized_weight_for_the_backward(quant_type):
    """Through F.linear autograd keeps each GGUF layer's dequantized weight until the backward (a full-precision
    copy of the model without gradient checkpointing); the trainer's GGUF layers dequantize again instead.
    Outputs and gradients are the same tensors."""
    from diffusers.quantizers.gguf.utils import GGUFParameter

    from moslora_diffusion.gguf_bases import dequantize_again_in_backward

    qtype = gguf.GGMLQuantizationType[quant_type]
    torch.manual_seed(0)
    weight = torch.randn(256, 256)
    net = torch.nn.Module()
    net.proj = GGUFLinear(256, 256, bias=True, compute_dtype=torch.float32)
    net.proj.weight = GGUFParameter(torch.from_numpy(gguf.quants.quantize(weight.numpy(), qtype)), quant_type=qtype)
    net.proj.bias = torch.nn.Parameter(torch.randn(256), requires_grad=False)
    add_moslora(net, MoSLoRAConfig(r=4, lora_alpha=8, target_modules=["proj"]))
    ((_, layer),) = moslora_layers(net)
    torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.5)
    x = torch.randn(2, 8, 256)

    stock = _saved_bytes_and_grads(layer, x)
    assert dequantize_again_in_backward(net) == 1
    lean = _saved_bytes_and_grads(layer, x)
    weight_bytes = 256 * 256 * 4
    assert stock[0] >= weight_bytes and lean[0] < weight_bytes  # the fp32 weight copy is gone
    for got, want in zip(lean[1:], stock[1:]):
        assert torch.allclose(got, want, rtol=1e-6, atol=1e-6)
    with torch.no_grad():  # no gradient, the stock path
        assert torch.equal(layer(x), stock[1])


# Byte offsets of each K-quant block's fp16 scale fields (ggml's block_q*_K layouts): the rest of a block is
# any bits at all, so random bytes with small finite scales are valid blocks.
K_QUANT_SCALES = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def _k_quant_blocks(quant_type: str, rows: int, blocks_per_row: int, seed: int = 0) -> np.ndarray:
    """Random valid ``quant_type`` blocks (gguf's Python quantizer has no K-quants): uint8 (rows, bytes)."""
    values, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[quant_type]]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(rows, blocks_per_row, size), dtype=np.uint8)
    for offset in K_QUANT_SCALES[quant_type]:
        scales = rng.uniform(1e-3, 1e-2, size=(rows, blocks_per_row)).astype(np.float16)
        raw[:, :, offset : offset + 2] = scales[..., None].view(np.uint8)
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("quant_type", list(K_QUANT_SCALES))
def test_an_adapted_k_quant_layer_computes_the_dequantized_weight_plus_the_mixed_delta(quant_type):
    """The K-quants community Flux files use (Q4_K_S, Q5_K_M, ...): 256-value blocks, wider than the tiny models,
    so one 512-wide GGUFLinear; the reference weight is gguf-py's own numpy dequantization."""
    from diffusers.quantizers.gguf.utils import GGUFParameter

    qtype = gguf.GGMLQuantizationType[quant_type]
    raw = _k_quant_blocks(quant_type, rows=8, blocks_per_row=2)
    reference = torch.from_numpy(gguf.quants.dequantize(raw, qtype).astype(np.float32))
    net = torch.nn.Module()
    net.proj = GGUFLinear(512, 8, compute_dtype=torch.float32)
    net.proj.weight = GGUFParameter(torch.from_numpy(raw), quant_type=qtype)
    add_moslora(net, MoSLoRAConfig(r=4, lora_alpha=8, target_modules=["proj"]))
    ((_, layer),) = moslora_layers(net)
    assert isinstance(layer.get_base_layer(), GGUFLinear)
    weight = dequantize_gguf_tensor(layer.get_base_layer().weight).float()
    # diffusers' torch dequantization against ggml's numpy one: equal up to its half-precision scale products
    assert (weight - reference).abs().max() <= 1e-3 * reference.abs().max()

    torch.manual_seed(0)
    torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.5)
    x = torch.randn(3, 512)
    a, m, b = (getattr(layer, f)["default"].weight for f in ("lora_A", "lora_mixer", "lora_B"))
    leaves = [t.detach().clone().requires_grad_() for t in (a, m, b)]
    expected = torch.nn.functional.linear(x, weight + layer.scaling["default"] * leaves[2] @ leaves[1] @ leaves[0])
    y = layer(x)
    assert (y - expected).abs().max() <= 1e-5 * expected.abs().max()
    y.square().sum().backward()
    expected.square().sum().backward()
    for got, want in zip((a, m, b), leaves):
        assert (got.grad - want.grad).abs().max() <= 1e-4 * want.grad.abs().max()


@pytest.mark.slow
@pytest.mark.parametrize("quant_type", ["Q8_0", "Q4_0"])
def test_an_adapter_trained_over_a_gguf_base_is_independent_of_the_quantization(quant_type, tmp_path):
    """Stock diffusers over the full-precision twin draws the GGUF run's image within the quantization's error."""
    path, config_dir, source = write_gguf_base("flux", tmp_path, quant_type)
    out = train(
        "flux", tmp_path / "out", "--pretrained_model_name_or_path", str(path), "--base_config", str(config_dir),
        "--learning_rate", "5e-2",
    )  # fmt: skip
    drawn_gguf = np.asarray(Image.open(out / "image_0.png"), dtype=np.int16)
    assert all(torch.isfinite(t).all() for t in load_file(str(out / "moslora_weights.safetensors")).values())

    twin = make_tiny_pipeline("flux", seed=0)  # what the trainer built: the file's transformer, the folder's others
    twin.register_modules(transformer=source.transformer)
    gguf_base = make_tiny_pipeline("flux", seed=0)
    gguf_base.register_modules(transformer=load_single_file_components(path, config_dir)[1]["transformer"])
    base_full = _validation_image(twin, "flux")
    quantization_error = np.abs(_validation_image(gguf_base, "flux") - base_full).max()  # the base alone, 0-255

    twin.load_lora_weights(str(out))  # stock diffusers, folded file, full-precision transformer
    drawn_full = _validation_image(twin, "flux")
    difference = np.abs(drawn_full - drawn_gguf).max()
    print(f"{quant_type} GGUF base: quantization alone moves pixels by {quantization_error}/255; the adapter over the "
          f"full-precision twin draws the GGUF run's image within {difference}/255")  # fmt: skip
    assert difference <= quantization_error + 2
    assert np.abs(drawn_full - base_full).max() > 2, "the adapter did not train"

    # moslora merge: into the GGUF file it refuses in one line; into its full-precision twin it merges
    adapter = ["--adapter", str(out), "--base_config", str(config_dir)]
    merged = tmp_path / "merged.safetensors"
    assert merge_main(["--base", str(path), *adapter, "--output", str(merged)]) == 2
    assert not merged.exists()
    full_file = tmp_path / "flux.safetensors"
    write_single_file("flux", full_file, seed=1)
    assert merge_main(["--base", str(full_file), *adapter, "--output", str(merged)]) == 0
    before, after = load_file(str(full_file)), load_file(str(merged))
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed and all(k.endswith(".weight") for k in changed)


def test_merging_into_a_gguf_base_refuses_in_one_line(tmp_path, capsys):
    path, config_dir, _ = write_gguf_base("flux", tmp_path)
    adapter = tmp_path / "adapter"
    pipe = make_tiny_pipeline("flux")
    add_moslora(pipe.transformer, MoSLoRAConfig(r=4, lora_alpha=4))
    from moslora_diffusion import save_moslora_weights

    save_moslora_weights(pipe, adapter)
    capsys.readouterr()
    argv = ["--base", str(path), "--base_config", str(config_dir), "--adapter", str(adapter)]
    assert merge_main([*argv, "--output", str(tmp_path / "out.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "is a GGUF file" in err and "merge into the full-precision" in err, err
    assert not (tmp_path / "out.safetensors").exists()


def _truncated(tmp_path):
    path, _, _ = write_gguf_base("flux", tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    return path


def _not_gguf(tmp_path):
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all" * 8)
    return tmp_path / "junk.gguf"


def _language_model(tmp_path):
    write_gguf(tmp_path / "llm.gguf", {"blk.0.attn_q.weight": torch.zeros(32, 32)}, arch="llama")
    return tmp_path / "llm.gguf"


def _unet(tmp_path):
    state = {"model.diffusion_model.label_emb.0.0.weight": torch.zeros(32, 32)}  # SDXL's added embedding
    write_gguf(tmp_path / "sdxl.gguf", state)
    return tmp_path / "sdxl.gguf"


def _quantized_twice(tmp_path):
    return _gguf(tmp_path), ["--quantize_base", "int8"]


def _upper_case_suffix(tmp_path):
    path = _gguf(tmp_path)
    return path.rename(path.with_suffix(".GGUF")), []


def _gguf(tmp_path):
    path, _, _ = write_gguf_base("flux", tmp_path)
    return path


BAD_GGUF = {
    "truncated": (lambda t: (_truncated(t), []), "not a readable GGUF file, or a truncated one"),
    "not GGUF": (lambda t: (_not_gguf(t), []), "not a readable GGUF file"),
    "unknown family": (lambda t: (_language_model(t), []), "match no known family"),
    "a UNet family": (lambda t: (_unet(t), []), "a GGUF sdxl model; GGUF bases are read for transformers only"),
    "--quantize_base": (_quantized_twice, "is a GGUF file, quantized already; leave --quantize_base out (or add"),
    ".GGUF": (_upper_case_suffix, "rename it to end in .gguf (lower case)"),
}


@pytest.mark.parametrize("case", list(BAD_GGUF))
def test_bad_gguf_bases_are_one_line_exit_2(case, tmp_path, capsys):
    make, expected = BAD_GGUF[case]
    path, extra = make(tmp_path)
    config_dir = tmp_path / "config"
    if not config_dir.exists():
        make_tiny_pipeline("flux").save_pretrained(config_dir, safe_serialization=True)
    out = tmp_path / "out"
    argv = tiny_run_argv(
        "flux", out, "--pretrained_model_name_or_path", str(path), "--base_config", str(config_dir), *extra
    )
    capsys.readouterr()
    _bad_input(capsys, argv, expected, out)


@pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="torchao is not installed")
def test_quantize_text_encoders_over_a_gguf_base_quantizes_the_text_encoders_only(tmp_path):
    """Flux as people run it on 12-16 GB: the transformer a GGUF, T5 (and CLIP) int8, the VAE full precision."""
    path, config_dir, _ = write_gguf_base("flux", tmp_path)
    argv = ["--quantize_base", "int8", "--quantize_text_encoders"]
    _, inputs = parse_run(tiny_run_argv("flux", tmp_path / "unused", *_base(path, config_dir), *argv))
    assert inputs.quantization == BaseQuantization("int8", "torchao", text_encoders=True, denoiser=False)
    components = inputs.base.load_components(quantization=inputs.quantization, torch_dtype=torch.float32)
    transformer = components["transformer"]  # the file's GGUF blocks, not requantized by torchao
    assert _quantized_layers_of(transformer) and transformer.hf_quantizer.quantization_config.quant_method == "gguf"
    assert is_quantized(components["text_encoder_2"]) and is_quantized(components["text_encoder"])  # T5, CLIP
    assert not is_quantized(components["vae"])
    lean = [m for m in transformer.modules() if isinstance(m, GGUFLinear) and "forward_native" in vars(m)]
    assert lean and len(lean) == len(_quantized_layers_of(transformer))  # the trainer's lean GGUF backward

    out = train("flux", tmp_path / "out", *_base(path, config_dir), *argv)
    assert all(torch.isfinite(t).all() for t in load_file(str(out / "moslora_weights.safetensors")).values())


def _base(path, config_dir) -> list[str]:
    return ["--pretrained_model_name_or_path", str(path), "--base_config", str(config_dir)]


def _quantized_layers_of(model) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, GGUFLinear)]


def test_a_missing_gguf_package_names_the_pip_command(tmp_path, capsys, monkeypatch):
    from moslora_diffusion import gguf_bases

    path = _gguf(tmp_path)
    real = gguf_bases.importlib.util.find_spec
    monkeypatch.setattr(gguf_bases.importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name))
    out = tmp_path / "out"
    argv = tiny_run_argv("flux", out, "--pretrained_model_name_or_path", str(path), "--base_config", str(tmp_path))
    capsys.readouterr()
    _bad_input(capsys, argv, "GGUF bases need the gguf package: pip install gguf", out)
