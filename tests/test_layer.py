"""The MoSLoRA layer: its maths, its parameters, and diffusers' adapter API with the mixer in place."""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_adapter
from diffusers.training_utils import cast_training_params
from peft import LoraConfig

from moslora_diffusion import MoSLoRAConfig, add_moslora, moslora_layers
from moslora_diffusion.families import family_of_pipeline
from moslora_diffusion.testing import make_tiny_pipeline, tiny_pipeline_kwargs


def adapted_components(pipe):
    family = family_of_pipeline(pipe)
    return [
        (name, getattr(pipe, name)) for name in family.adapter_components() if getattr(pipe, name, None) is not None
    ]


def reference_output(layer, adapter: str, x: torch.Tensor) -> torch.Tensor:
    """W0 x + s * B M A x, computed from the layer's parameters without its forward."""
    base = layer.get_base_layer()
    A = layer.lora_A[adapter].weight
    M = layer.lora_mixer[adapter].weight
    B = layer.lora_B[adapter].weight
    s = layer.scaling[adapter]
    if isinstance(base, torch.nn.Linear):
        return F.linear(x, base.weight, base.bias) + s * (x @ A.T @ M.T @ B.T)
    down = F.conv2d(x, A, None, base.stride, base.padding, base.dilation)
    mixed = torch.einsum("sr,nrhw->nshw", M, down)
    return base(x) + s * F.conv2d(mixed, B)


@pytest.mark.parametrize(
    "family,preset",
    [
        ("sd15", "attention"),
        ("sd15", "attention+ff"),
        ("sd2", "attention"),
        ("sdxl", "attention"),
        ("sd3", "attention+ff"),
        ("flux", "attention+ff"),
        ("chroma", "attention+ff"),
        ("zimage", "attention+ff"),
        ("qwenimage", "attention+ff"),
        ("flux2_klein", "attention"),
        ("flux2_klein", "attention+ff"),
        ("flux2", "attention"),
    ],
)
def test_every_adapted_layer_computes_w0x_plus_sBMAx(family, preset):
    pipe = make_tiny_pipeline(family)
    checked = 0
    for name, component in adapted_components(pipe):
        add_moslora(component, MoSLoRAConfig(r=4, lora_alpha=6, target_modules=preset), "subject")
        randomize_adapter(component, "subject")
        for module_name, layer in moslora_layers(component):
            base = layer.get_base_layer()
            if isinstance(base, torch.nn.Linear):
                x = torch.randn(2, 3, base.in_features)
            else:
                x = torch.randn(1, base.in_channels, 4, 4)
            with torch.no_grad():
                torch.testing.assert_close(
                    layer(x),
                    reference_output(layer, "subject", x),
                    rtol=1e-5,
                    atol=1e-5,
                    msg=f"{family} {name}.{module_name}",
                )
            checked += 1
    assert checked > 0
    if preset == "attention+ff" and family == "sd15":
        assert any(isinstance(layer.get_base_layer(), torch.nn.Conv2d) for _, layer in moslora_layers(pipe.unet))


def test_presets_pick_the_families_attention_projections():
    pipe = make_tiny_pipeline("sd3")
    add_moslora(pipe.transformer, MoSLoRAConfig(r=2), "a")
    names = {
        n.rsplit(".", 1)[-1] if not n.endswith("to_out.0") else "to_out.0" for n, _ in moslora_layers(pipe.transformer)
    }
    assert names == {"to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"}
    add_moslora(pipe.text_encoder, MoSLoRAConfig(r=2), "a")
    te_names = {n.rsplit(".", 1)[-1] for n, _ in moslora_layers(pipe.text_encoder)}
    assert te_names == {"q_proj", "k_proj", "v_proj", "out_proj"}
    with pytest.raises(ValueError, match="Unknown target preset"):
        from moslora_diffusion.targets import parse_target_modules

        parse_target_modules("atention")


def test_frozen_identity_mixer_equals_peft_lora_with_same_factors():
    pipe = make_tiny_pipeline("sd15")
    unet_mos = pipe.unet
    unet_lora = copy.deepcopy(unet_mos)
    targets = ["to_q", "to_k", "to_v", "to_out.0"]
    add_moslora(
        unet_mos,
        MoSLoRAConfig(r=4, lora_alpha=8, target_modules=targets, mixer_init="identity", train_mixer=False),
        "x",
    )
    unet_lora.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=targets), "x")
    randomize_adapter(unet_lora, "x")
    # copy A and B from the PEFT LoRA model; the MoSLoRA mixer stays the identity
    lora_params = dict(unet_lora.named_parameters())
    with torch.no_grad():
        for name, param in unet_mos.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                param.copy_(lora_params[name])
    x, t, ctx = torch.randn(1, 4, 16, 16), torch.tensor([500]), torch.randn(1, 7, 32)
    with torch.no_grad():
        torch.testing.assert_close(unet_mos(x, t, ctx).sample, unet_lora(x, t, ctx).sample, rtol=1e-5, atol=1e-6)


def test_mixer_inits_have_their_documented_properties():
    unet = make_tiny_pipeline("sd15").unet
    for init in ("kaiming", "orthogonal", "identity"):
        add_moslora(unet, MoSLoRAConfig(r=8, target_modules=["to_q"], mixer_init=init), init)
    for _, layer in moslora_layers(unet):
        eye = torch.eye(8)
        torch.testing.assert_close(layer.lora_mixer["identity"].weight, eye)
        orth = layer.lora_mixer["orthogonal"].weight
        torch.testing.assert_close(orth.T @ orth, eye, atol=1e-5, rtol=0)
        kaiming = layer.lora_mixer["kaiming"].weight
        assert kaiming.abs().max() <= 1 / 8**0.5 + 1e-6  # kaiming-uniform a=sqrt(5): bound 1/sqrt(fan_in)
        assert not torch.allclose(kaiming, eye)
        assert torch.count_nonzero(layer.lora_B["kaiming"].weight) == 0  # adapter starts as a no-op


def test_kaiming_folded_is_the_init_only_control():
    """A = M0 A0 with M0 the kaiming mixer the same seed gives MoSLoRA; M = identity (frozen with train_mixer=False)."""
    layers = {}
    for init in ("kaiming", "kaiming_folded"):
        unet = make_tiny_pipeline("sd15").unet
        torch.manual_seed(3)
        add_moslora(
            unet, MoSLoRAConfig(r=4, target_modules=["to_q"], mixer_init=init, train_mixer=init == "kaiming"), "x"
        )
        layers[init] = moslora_layers(unet)
    for (_, mos), (_, folded) in zip(layers["kaiming"], layers["kaiming_folded"]):
        m0, a0 = mos.lora_mixer["x"].weight, mos.lora_A["x"].weight
        torch.testing.assert_close(folded.lora_A["x"].weight, m0 @ a0)
        torch.testing.assert_close(folded.lora_mixer["x"].weight, torch.eye(4))
        assert not folded.lora_mixer["x"].weight.requires_grad


@pytest.mark.parametrize("train_mixer", [True, False])
def test_trainable_parameter_count_is_r_in_plus_out_plus_r_squared(train_mixer):
    unet = make_tiny_pipeline("sd15").unet
    r = 4
    add_moslora(unet, MoSLoRAConfig(r=r, train_mixer=train_mixer), "x")
    expected = 0
    for _, layer in moslora_layers(unet):
        base = layer.get_base_layer()
        expected += r * (base.in_features + base.out_features) + (r * r if train_mixer else 0)
    trainable = sum(p.numel() for p in unet.parameters() if p.requires_grad)
    assert trainable == expected
    # set_adapters switches requires_grad back on for adapter weights: a frozen mixer must stay frozen
    unet.set_adapters(["x"], [0.5])
    assert sum(p.numel() for p in unet.parameters() if p.requires_grad) == expected


def test_gradients_reach_A_M_B_and_nothing_else():
    unet = make_tiny_pipeline("sd15").unet
    add_moslora(unet, MoSLoRAConfig(r=4), "x")
    randomize_adapter(unet, "x")
    out = unet(torch.randn(1, 4, 16, 16), torch.tensor([10]), torch.randn(1, 7, 32)).sample
    out.square().mean().backward()
    kinds = set()
    for name, param in unet.named_parameters():
        if any(k in name for k in ("lora_A", "lora_B", "lora_mixer")):
            assert param.grad is not None and param.grad.abs().sum() > 0, name
            kinds.add(next(k for k in ("lora_A", "lora_B", "lora_mixer") if k in name))
        else:
            assert param.grad is None, name
    assert kinds == {"lora_A", "lora_B", "lora_mixer"}


class _TwoLinears(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.narrow_out = torch.nn.Linear(48, 16)  # out < in: many tokens fold M into B
        self.wide_out = torch.nn.Linear(16, 48)  # out > in: many tokens fold M into A


@pytest.mark.parametrize("tokens", [8, 12, 100])  # per token (<= 16 features), folded (> 16), across a batch dim
@pytest.mark.parametrize("name", ["narrow_out", "wide_out"])
def test_forward_and_gradients_are_exact_whichever_order_applies_the_mixer(name, tokens):
    """The forward mixes each token (few tokens) or folds M into B or A (many): the same maths, and grads."""
    torch.manual_seed(0)
    model = _TwoLinears()
    add_moslora(model, MoSLoRAConfig(r=4, lora_alpha=6, target_modules=["narrow_out", "wide_out"]), "x")
    randomize_adapter(model, "x")
    layer = getattr(model, name)
    n_in = layer.get_base_layer().in_features
    x = torch.randn(2, tokens // 2, n_in, requires_grad=True)
    params = [layer.lora_A["x"].weight, layer.lora_mixer["x"].weight, layer.lora_B["x"].weight, x]
    out, ref = layer(x), reference_output(layer, "x", x)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    weights = torch.randn(out.shape)
    for got, want in zip(
        torch.autograd.grad((out * weights).sum(), params), torch.autograd.grad((ref * weights).sum(), params)
    ):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_forward_under_autocast_and_with_dropout_matches_the_reference():
    """bf16 autocast (mixed precision) and a live dropout go through the same forward."""
    torch.manual_seed(0)
    model = _TwoLinears()
    add_moslora(model, MoSLoRAConfig(r=4, lora_dropout=0.5, target_modules=["narrow_out"]), "x")
    randomize_adapter(model, "x")
    layer = model.narrow_out
    x = torch.randn(3, 40, 48)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer.eval()(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference_output(layer, "x", x), atol=5e-2, rtol=5e-2)
    layer.train()
    torch.manual_seed(1)
    dropped = layer(x)
    torch.manual_seed(1)
    x_dropped = layer.lora_dropout["x"](x)
    base = layer.get_base_layer()
    want = (
        reference_output(layer, "x", x_dropped)
        - F.linear(x_dropped, base.weight, base.bias)
        + F.linear(x, base.weight, base.bias)
    )
    torch.testing.assert_close(dropped, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_base_with_fp32_adapter(dtype):
    pipe32 = make_tiny_pipeline("sd15")
    add_moslora(pipe32.unet, MoSLoRAConfig(r=4), "x")
    randomize_adapter(pipe32.unet, "x")
    unet = copy.deepcopy(pipe32.unet).to(dtype)
    cast_training_params(unet, dtype=torch.float32)
    adapter = [p for n, p in unet.named_parameters() if "lora_" in n]
    assert adapter and all(p.dtype == torch.float32 for p in adapter)
    x, t, ctx = torch.randn(1, 4, 16, 16), torch.tensor([10]), torch.randn(1, 7, 32)
    out = unet(x.to(dtype), t, ctx.to(dtype)).sample
    assert out.dtype == dtype
    out.float().square().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in adapter)
    with torch.no_grad():
        ref = pipe32.unet(x, t, ctx).sample
    tol = 2e-2 if dtype == torch.float16 else 1e-1
    torch.testing.assert_close(out.detach().float(), ref, atol=tol, rtol=tol)


def test_model_add_adapter_with_moslora_config_works_directly():
    unet = make_tiny_pipeline("sd15").unet
    unet.add_adapter(MoSLoRAConfig(r=4, target_modules=["to_q", "to_v"]), adapter_name="direct")
    layers = list(moslora_layers(unet))
    assert layers and all("direct" in layer.lora_mixer for _, layer in layers)


# ---- pipeline-level adapter API against images of a pipeline whose weights were baked by hand ----


def images(pipe, prompt="a photo of sks dog"):
    out = pipe(prompt, generator=torch.Generator().manual_seed(0), **tiny_pipeline_kwargs("sd15")).images
    return torch.from_numpy(out)


def bake(pipe, source_unet, weights: dict[str, float]):
    """Set ``pipe.unet``'s weights to W0 + sum_a w_a * (alpha_a / r_a) * B_a M_a A_a, from ``source_unet``'s factors."""
    params = dict(pipe.unet.named_parameters())
    with torch.no_grad():
        for name, layer in source_unet.named_modules():
            for adapter, weight in weights.items():
                if adapter not in getattr(layer, "lora_A", {}):
                    continue
                A, B = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
                if adapter in getattr(layer, "lora_mixer", {}):
                    A = layer.lora_mixer[adapter].weight @ A
                params[f"{name}.weight"].add_(weight * layer.lora_alpha[adapter] / layer.r[adapter] * (B @ A))


@pytest.fixture(scope="module")
def two_adapter_pipe():
    pipe = make_tiny_pipeline("sd15")
    add_moslora(pipe.unet, MoSLoRAConfig(r=4, lora_alpha=8), "subject")
    randomize_adapter(pipe.unet, "subject", std=0.2)
    # a plain LoRA beside it, added the way diffusers' loaders add one
    pipe.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_v"]), "style")
    randomize_adapter(pipe.unet, "style", std=0.2, seed=1)
    base = images(make_tiny_pipeline("sd15"))
    return pipe, base


def baked_images(pipe, weights):
    ref = make_tiny_pipeline("sd15")
    bake(ref, pipe.unet, weights)
    return images(ref)


def test_set_adapters_weights_match_baked_weights(two_adapter_pipe):
    pipe, base = two_adapter_pipe
    pipe.set_adapters(["subject", "style"], [0.8, 0.5])
    got = images(pipe)
    assert (got - base).abs().max() > 1e-2  # the adapters do something
    torch.testing.assert_close(got, baked_images(pipe, {"subject": 0.8, "style": 0.5}), atol=1e-4, rtol=0)
    pipe.set_adapters(["subject"], [1.0])
    torch.testing.assert_close(images(pipe), baked_images(pipe, {"subject": 1.0}), atol=1e-4, rtol=0)


def test_fuse_unfuse_and_disable_reproduce_reference_images(two_adapter_pipe):
    pipe, base = two_adapter_pipe
    pipe.set_adapters(["subject", "style"], [0.7, 1.0])
    unfused = images(pipe)
    pipe.fuse_lora(components=["unet"], lora_scale=1.0, adapter_names=["subject", "style"])
    torch.testing.assert_close(images(pipe), unfused, atol=1e-4, rtol=0)
    pipe.unfuse_lora(components=["unet"])
    torch.testing.assert_close(images(pipe), unfused, atol=1e-4, rtol=0)
    pipe.disable_lora()
    torch.testing.assert_close(images(pipe), base, atol=1e-5, rtol=0)
    pipe.enable_lora()
    torch.testing.assert_close(images(pipe), unfused, atol=1e-4, rtol=0)


def test_delete_and_unload_return_to_the_base_images():
    pipe = make_tiny_pipeline("sd15")
    base = images(pipe)
    add_moslora(pipe.unet, MoSLoRAConfig(r=4), "a")
    add_moslora(pipe.text_encoder, MoSLoRAConfig(r=4), "a")
    add_moslora(pipe.unet, MoSLoRAConfig(r=2), "b")
    for component in (pipe.unet, pipe.text_encoder):
        randomize_adapter(component, "a", std=0.2)
    randomize_adapter(pipe.unet, "b", std=0.2)
    pipe.set_adapters(["a", "b"])
    with_both = images(pipe)
    pipe.delete_adapters("b")
    assert all("b" not in layer.lora_mixer for _, layer in moslora_layers(pipe.unet))
    pipe.set_adapters(["a"])
    only_a = images(pipe)
    assert (with_both - only_a).abs().max() > 1e-3
    pipe.unload_lora_weights()
    assert not list(moslora_layers(pipe.unet)) and not list(moslora_layers(pipe.text_encoder))
    torch.testing.assert_close(images(pipe), base, atol=1e-5, rtol=0)


def test_moslora_after_a_plain_lora_on_the_same_layers():
    unet = make_tiny_pipeline("sd15").unet
    unet.add_adapter(LoraConfig(r=2, target_modules=["to_q"]), "plain")
    add_moslora(unet, MoSLoRAConfig(r=4, target_modules=["to_q"]), "mos")
    layers = list(moslora_layers(unet))
    assert layers and all(
        set(layer.lora_A) == {"plain", "mos"} and set(layer.lora_mixer) == {"mos"} for _, layer in layers
    )
