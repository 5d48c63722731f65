"""MoSLoRA over quantized base layers: forward and gradients equal the dequantized weight plus s * B M A in
fp32; every merge path gives the requantized sum (within the quantization's own error) or refuses in one line.

Backends that run on a CPU: torchao int8/fp8, optimum-quanto int8/fp8, bitsandbytes int8 and nf4 (built
directly: diffusers only loads bitsandbytes on a GPU). Each test skips when its package is not installed.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn

from moslora_diffusion import MoSLoRAConfig, add_moslora
from moslora_diffusion.layer import moslora_layers
from moslora_diffusion.testing import make_tiny_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")

WIDTH = 64  # bitsandbytes' nf4 CPU path needs layers at least its 64-wide block


class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.to_q = nn.Linear(WIDTH, WIDTH)
        self.to_k = nn.Linear(WIDTH, 32)

    def forward(self, x):
        return torch.cat([self.to_q(x), self.to_k(x)], -1)


def _torchao(model, kind):
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

    config = Int8WeightOnlyConfig() if kind == "int8" else Float8WeightOnlyConfig()
    quantize_(model, config)
    return config


def _quanto(model, kind):
    from optimum import quanto

    quanto.quantize(model, weights=quanto.qint8 if kind == "int8" else quanto.qfloat8)
    quanto.freeze(model)


def _bnb(model, kind):
    import bitsandbytes as bnb

    for name in ("to_q", "to_k"):
        linear = getattr(model, name)
        if kind == "int8":
            layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, has_fp16_weights=False)
        else:
            layer = bnb.nn.Linear4bit(
                linear.in_features, linear.out_features, quant_type="nf4", compute_dtype=torch.float32
            )
        layer.load_state_dict(linear.state_dict())
        setattr(model, name, layer.to("cpu"))  # .to() quantizes


def dequantized(layer: nn.Module) -> torch.Tensor:
    """The float weight a quantized base layer computes with."""
    weight = layer.weight
    if type(weight).__name__ == "Int8Params":
        from peft.utils.integrations import dequantize_bnb_weight

        return dequantize_bnb_weight(weight, state=layer.state).float()
    if type(weight).__name__ == "Params4bit":
        import bitsandbytes as bnb

        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()
    return weight.dequantize().float() if hasattr(weight, "dequantize") else weight.float()


# backend -> (quantize(model, kind), module needed, class name of the MoSLoRA layer); kind -> relative error
BACKENDS = {
    "torchao-int8": (_torchao, "int8", "torchao", "MoSLoRATorchaoLinear"),
    "torchao-fp8": (_torchao, "fp8", "torchao", "MoSLoRATorchaoLinear"),
    "quanto-int8": (_quanto, "int8", "optimum", "MoSLoRAQuantoLinear"),
    "quanto-fp8": (_quanto, "fp8", "optimum", "MoSLoRAQuantoLinear"),
    "bnb-int8": (_bnb, "int8", "bitsandbytes", "MoSLoRALinear8bitLt"),
    "bnb-nf4": (_bnb, "nf4", "bitsandbytes", "MoSLoRALinear4bit"),
}
# the quantization's own error, relative to the weight's largest entry (int8: half a step of 127; e4m3: 1/16)
REQUANT_ERROR = {"int8": 0.01, "fp8": 0.07, "nf4": 0.15}


def _quantized_model(backend: str):
    quantize, kind, module, _ = BACKENDS[backend]
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed")
    torch.manual_seed(0)
    model = TwoLayers()
    applied = quantize(model, kind)
    add_moslora(model, MoSLoRAConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k"]))
    for _, layer in moslora_layers(model):
        nn.init.normal_(layer.lora_B["default"].weight, std=0.5)  # a delta larger than the quantization step
        if applied is not None:
            layer.get_apply_tensor_subclass = lambda: applied  # what PEFT reads from diffusers' TorchAoConfig
    return model, kind


FACTORS = ("lora_A", "lora_mixer", "lora_B")


def _reference(model, x):
    """fp32: dequant(W) x + b + s * B M A x, with A, M, B as leaves of their own."""
    outputs, factors = [], []
    for name in ("to_q", "to_k"):
        layer = getattr(model, name)
        a, m, b = (getattr(layer, f)["default"].weight.detach().clone().requires_grad_() for f in FACTORS)
        base = layer.get_base_layer()
        delta = layer.scaling["default"] * b @ m @ a
        outputs.append(nn.functional.linear(x, dequantized(base) + delta, base.bias.detach().float()))
        factors.append((a, m, b))
    return torch.cat(outputs, -1), factors


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_forward_and_gradients_equal_the_dequantized_weight_plus_the_mixed_delta(backend):
    model, _ = _quantized_model(backend)
    assert type(model.to_q).__name__ == BACKENDS[backend][3]
    x = torch.randn(3, WIDTH)
    y = model(x)
    expected, factors = _reference(model, x)
    assert (y.float() - expected).abs().max() <= 1e-5 * expected.abs().max()
    y.square().sum().backward()
    expected.square().sum().backward()
    for name, (a, m, b) in zip(("to_q", "to_k"), factors):
        layer = getattr(model, name)
        for got, want in ((layer.lora_A, a), (layer.lora_mixer, m), (layer.lora_B, b)):
            grad = got["default"].weight.grad
            assert (grad - want.grad).abs().max() <= 1e-4 * want.grad.abs().max(), name


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_merge_requantizes_the_sum_and_unmerge_takes_it_out(backend):
    model, kind = _quantized_model(backend)
    layers = [model.to_q, model.to_k]
    before = [dequantized(layer.get_base_layer()) for layer in layers]
    deltas = [layer.get_delta_weight("default").float() for layer in layers]
    for layer in layers:
        layer.merge()
    for layer, w0, delta in zip(layers, before, deltas):
        merged = dequantized(layer.get_base_layer())
        scale = (w0 + delta).abs().max()
        assert (merged - (w0 + delta)).abs().max() <= REQUANT_ERROR[kind] * scale, "merged weight is not W + s B M A"
        assert (merged - w0).abs().max() >= 0.5 * delta.abs().max(), "merge left the base weight unchanged"
    for layer in layers:
        layer.unmerge()
    for layer, w0 in zip(layers, before):
        assert (dequantized(layer.get_base_layer()) - w0).abs().max() <= 2 * REQUANT_ERROR[kind] * (w0.abs().max() + 1)


def _diffusers_unet(tmp_path, backend: str):
    """The tiny SD1.5 UNet loaded through diffusers with its own quantization config."""
    import diffusers

    if backend == "torchao":
        pytest.importorskip("torchao")
        from torchao.quantization import Int8WeightOnlyConfig

        config = diffusers.TorchAoConfig(Int8WeightOnlyConfig())
    else:
        pytest.importorskip("optimum.quanto")
        config = diffusers.QuantoConfig(weights_dtype="int8")
    unet = make_tiny_pipeline("sd15").unet
    unet.save_pretrained(tmp_path / "unet")
    full = type(unet).from_pretrained(tmp_path / "unet")
    return full, type(unet).from_pretrained(tmp_path / "unet", quantization_config=config, torch_dtype=torch.float32)


@pytest.mark.parametrize("backend", ["torchao", "quanto"])
def test_fuse_lora_on_a_quantized_diffusers_model_adds_the_mixed_delta(tmp_path, backend):
    _, unet = _diffusers_unet(tmp_path, backend)
    add_moslora(unet, MoSLoRAConfig(r=4, lora_alpha=4))
    layers = dict(moslora_layers(unet))
    assert layers
    torch.manual_seed(1)
    expected = {}
    for name, layer in layers.items():
        nn.init.normal_(layer.lora_B["default"].weight, std=0.5)
        expected[name] = dequantized(layer.get_base_layer()) + layer.get_delta_weight("default").float()
    unet.fuse_lora(adapter_names=["default"])
    for name, layer in layers.items():
        got = dequantized(layer.get_base_layer())
        assert (got - expected[name]).abs().max() <= REQUANT_ERROR["int8"] * expected[name].abs().max(), name


@pytest.mark.parametrize("backend", ["torchao", "quanto"])
def test_merge_adapters_into_a_quantized_pipeline_refuses_in_one_line(tmp_path, backend):
    from moslora_diffusion import save_moslora_weights
    from moslora_diffusion.merge import merge_adapters

    full, quantized = _diffusers_unet(tmp_path, backend)
    pipe = make_tiny_pipeline("sd15")
    add_moslora(pipe.unet, MoSLoRAConfig(r=4, lora_alpha=4))
    save_moslora_weights(pipe, tmp_path / "adapter")
    target = make_tiny_pipeline("sd15")
    target.unet = quantized
    expected = r"^cannot merge into unet\.\S+: it is quantized by (torchao|optimum-quanto);"
    with pytest.raises(ValueError, match=expected) as err:
        merge_adapters(target, [tmp_path / "adapter"])
    assert "\n" not in str(err.value)


def test_a_quantized_weight_no_backend_can_requantize_refuses_to_fuse():
    """GGUF-style (or unknown) quantized weights: the generic layer would add to a copy; it refuses instead."""
    model = TwoLayers()
    add_moslora(model, MoSLoRAConfig(r=4, lora_alpha=4, target_modules=["to_q"]))
    base = model.to_q.get_base_layer()
    base.weight = nn.Parameter(torch.zeros(WIDTH, WIDTH, dtype=torch.int8), requires_grad=False)
    expected = r"^cannot merge into to_q: its base weight is quantized by Parameter \(torch\.int8\)"
    with pytest.raises(ValueError, match=expected):
        model.to_q.merge()


def test_a_plain_float_layer_still_merges():
    model = TwoLayers()
    add_moslora(model, MoSLoRAConfig(r=4, lora_alpha=4, target_modules=["to_q"]))
    nn.init.normal_(model.to_q.lora_B["default"].weight)
    w0 = model.to_q.get_base_layer().weight.detach().clone()
    delta = model.to_q.get_delta_weight("default")
    model.to_q.merge()
    assert torch.allclose(model.to_q.get_base_layer().weight, w0 + delta, atol=1e-6)


def test_moslora_merge_refuses_a_quantized_base_folder(tmp_path):
    """A folder saved from a quantized model names its method in config.json; its weights are not full precision."""
    import json

    from moslora_diffusion.merge.base_weights import ComponentWeights

    make_tiny_pipeline("sd15").unet.save_pretrained(tmp_path / "base" / "unet")
    config_path = tmp_path / "base" / "unet" / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization_config"] = {"quant_method": "torchao"}
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"a quantized checkpoint \(torchao\); merging writes full-precision weights"):
        ComponentWeights.find(tmp_path / "base", "unet")
