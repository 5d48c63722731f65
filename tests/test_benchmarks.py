"""The benchmarks compare like with like: every formulation they time computes the library's MoSLoRA, and
their reports carry the ratios the README quotes. (Timings themselves are never asserted here.)"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import bench_layer_overhead, bench_trainer  # noqa: E402
from benchmarks.bench_train_step import VARIANTS, add_peft_method  # noqa: E402
from moslora_diffusion import moslora_layers  # noqa: E402


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.to_q = torch.nn.Linear(24, 8)  # out < in
        self.to_k = torch.nn.Linear(8, 24)  # out > in


@pytest.mark.parametrize("tokens", [4, 40])  # per-token mixing and the folded orders
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_timed_formulation_computes_the_library_forward(variant, tokens):
    torch.manual_seed(0)
    model = _Block()
    for method in ("moslora", variant):
        add_peft_method(model, method, 4, ["to_q", "to_k"])
    for _, layer in moslora_layers(model):
        with torch.no_grad():  # the same random factors under both names, B non-zero
            for name in ("lora_A", "lora_mixer", "lora_B"):
                weight = torch.randn_like(getattr(layer, name)["moslora"].weight) * 0.3
                getattr(layer, name)["moslora"].weight.copy_(weight)
                getattr(layer, name)[variant].weight.copy_(weight)
    for name in ("to_q", "to_k"):
        layer = getattr(model, name)
        x = torch.randn(2, tokens // 2, layer.in_features, requires_grad=True)
        outputs, grads = {}, {}
        for method in ("moslora", variant):
            layer.set_adapter(method)
            out = layer(x)
            params = [getattr(layer, n)[method].weight for n in ("lora_A", "lora_mixer", "lora_B")]
            outputs[method] = out
            grads[method] = torch.autograd.grad(out.square().sum(), [*params, x])
        torch.testing.assert_close(outputs[variant], outputs["moslora"], rtol=1e-5, atol=1e-6)
        for got, want in zip(grads[variant], grads["moslora"]):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)  # float rounding of different orders


def test_layer_overhead_benchmark_reports_every_method(capsys):
    bench_layer_overhead.main(["--layers", "2", "--steps", "1", "--rounds", "2", "--width", "16"])
    out = capsys.readouterr().out
    for step in ("forward + backward", "no_grad forward"):
        for method in bench_layer_overhead.METHODS:
            row = next(line for line in out.splitlines() if line.startswith(f"| {step} | {method} |"))
            cells = [c.strip() for c in row.strip("|").split("|")]
            assert len(cells) == 9 and all(float(c) > 0 for c in (cells[2], cells[5], cells[7], cells[8])), row


NEWER_FAMILIES = ("chroma", "zimage", "qwenimage", "flux2_klein", "flux2")


@pytest.mark.parametrize("model", NEWER_FAMILIES)
def test_train_step_benchmark_feeds_each_newer_family_as_the_trainer_does(model):
    """Its smallest shape (one head, one block, 32 px): the family's own step predicts latent-shaped output."""
    from benchmarks import bench_train_step as bench

    setup = bench.Setup(model=model, depth=1, transformer_depth=1, batch=1, resolution=32, heads=1)
    model_ = bench.build_model(setup)
    inputs, target = bench.model_inputs(setup)
    with torch.no_grad():
        assert setup.spec.forward(model_, inputs).shape == target.shape
    assert bench.resolve_target_modules(model_, setup.spec.targets), "the attention preset adapts nothing"


def test_train_step_benchmark_reports_moslora_against_peft_lora_for_a_newer_family(capsys):
    from benchmarks import bench_train_step

    argv = ["--model", "qwenimage", "--heads", "1", "--depth", "1", "--rounds", "1", "--resolution", "32", "--no-rss"]
    bench_train_step.main([*argv, "--ranks", "2", "--methods", "peft_lora", "moslora"])
    out = capsys.readouterr().out
    rows = {line.split("|")[2].strip(): line.split("|") for line in out.splitlines() if line.startswith("| 2 |")}
    assert set(rows) == {"peft_lora", "moslora"}, out
    assert float(rows["peft_lora"][6]) == 1.0 and float(rows["moslora"][6]) > 0  # time x PEFT LoRA
    assert "Qwen-Image-shaped transformer, 1 heads of 128" in out.splitlines()[0]


def test_trainer_report_gives_the_ratios_against_the_peer():
    report = json.loads((REPO / "benchmarks" / "results" / "trainer_sd1_tiny_cpu.json").read_text())
    text = bench_trainer.markdown(report)
    runs = report["runs"]
    per_round = sorted(
        a["steps_per_s"] / b["steps_per_s"] for a, b in zip(runs["ours:uncached"], runs["peer:uncached"])
    )
    line = next(line for line in text.splitlines() if line.startswith("| steps/s x peer's path"))
    assert f"| {per_round[len(per_round) // 2]:.2f} / " in line, line
    assert any(line.startswith("| class images x peer's path") for line in text.splitlines())


def test_memory_projection_recovers_a_linear_model():
    """bench_memory's projection: weights and fixed step memory linear in blocks, activations in tokens."""
    from benchmarks import bench_memory

    shape = bench_memory.SHAPES["flux"]
    gb = bench_memory.GB

    def run(units, resolution):
        text = bench_memory.flux_text_tokens(resolution)
        tokens = bench_memory.tokens("flux", resolution, text)
        weights = (1 + 2 * units) * gb
        step = (0.5 + 0.1 * units) * gb + tokens * 1000
        return {"model": "flux", "units": units, "resolution": resolution, "text_tokens": text,
                "weights_bytes": weights, "peak_bytes": weights + step}  # fmt: skip

    projected = bench_memory.project(run(1, 64), run(2, 64), run(1, 128), shape)
    tokens_1024 = bench_memory.tokens("flux", 1024, shape.text_tokens)
    assert projected["weights_gb"] == pytest.approx(1 + 2 * shape.full_depth)
    assert projected["step_fixed_gb"] == pytest.approx(0.5 + 0.1 * shape.full_depth)
    assert projected["activations_gb"] * gb == pytest.approx((1000 + shape.kept_per_token) * tokens_1024)


def test_offloaded_encoders_have_the_released_models_parameter_counts():
    """bench_memory --encoders builds CLIP-L, CLIP-bigG, T5-XXL and the VAEs from configs: as large as released."""
    from benchmarks import bench_memory

    counts = {(family, component): count for family in ("sdxl", "flux")
              for component, _, count, _ in bench_memory.encoder_parameter_bytes(family)}  # fmt: skip
    assert counts[("sdxl", "text_encoder (CLIP-L)")] == 123_060_480  # openai/clip-vit-large-patch14 text tower
    assert counts[("sdxl", "text_encoder_2 (CLIP-bigG)")] == 694_659_840  # SDXL's text_encoder_2
    assert counts[("flux", "text_encoder_2 (T5-XXL)")] == 4_762_310_656  # google/t5-v1_1-xxl's encoder
    assert 83e6 < counts[("sdxl", "vae")] < counts[("flux", "vae")] < 84e6


def test_the_memory_benchmarks_gguf_base_is_diffusers_gguf_layer_over_q4_0_blocks():
    """bench_memory's q4_0-gguf base: diffusers' GGUFLinear, as a .gguf loads, computing the block-quantized weight."""
    pytest.importorskip("gguf")
    from diffusers.quantizers.gguf.utils import GGUFLinear

    from benchmarks import bench_memory

    torch.manual_seed(0)
    layers = (torch.nn.Linear(64, 32), torch.nn.Linear(32, 8), torch.nn.Linear(8, 4))
    model = torch.nn.Sequential(*layers).to(torch.bfloat16)  # the benchmark's base dtype, GGUF's compute dtype
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    expected = model(x).float()
    bench_memory.quantize(model, "q4_0-gguf")
    assert [type(m) for m in model] == [GGUFLinear, GGUFLinear, torch.nn.Linear]  # 8 is narrower than a block
    assert model[0].weight.numel() == 32 * 64 // 32 * 18  # Q4_0: 18 bytes per 32 weights
    got = model(x).float()
    assert (got - expected).abs().max() <= 0.2 * expected.abs().max()  # within 4-bit blocks' error


def test_client_loaders_refuses_a_folder_that_is_no_sd_scripts_checkout(tmp_path):
    from benchmarks import client_loaders

    with pytest.raises(SystemExit, match="no networks/lora.py there; give a kohya-ss/sd-scripts checkout"):
        client_loaders.main(["--sd_scripts", str(tmp_path)])


def test_client_loaders_names_each_file_key_after_its_module():
    from benchmarks.client_loaders import _module_of

    assert _module_of("lora_unet_input_blocks_4_1_proj_in.lora_down.weight") == "lora_unet_input_blocks_4_1_proj_in"
    assert _module_of("lora_unet_input_blocks_4_1_proj_in.alpha") == "lora_unet_input_blocks_4_1_proj_in"
    assert _module_of("transformer.transformer_blocks.0.attn.to_q.lora_A.weight") == (
        "transformer.transformer_blocks.0.attn.to_q"
    )
