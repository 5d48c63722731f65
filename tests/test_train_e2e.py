"""End to end: the DreamBooth recipe on tiny offline bases of every family writes an output folder whose
files load in stock diffusers and reproduce the trained model's validation image (and differ from the base's)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file
from train_support import PROMPT, REPO, run_main, train

from moslora_diffusion.families import get_family
from moslora_diffusion.fileio import load_safetensors
from moslora_diffusion.formats import WEIGHT_NAMES
from moslora_diffusion.testing import make_tiny_pipeline, save_tiny_pipeline

# family -> (base: the in-memory tiny:<family>, or the same pipeline saved as a diffusers folder; extra flags).
RUNS = {
    "sd15": (
        "tiny",
        [
            "--checkpointing_steps",
            "1",
            "--checkpoints_total_limit",
            "1",
            "--validation_steps",
            "1",
            "--report_to",
            "tensorboard",
        ],
    ),
    "sdxl": ("tiny", ["--train_text_encoder", "--text_encoder_lr", "1e-2"]),  # both CLIP encoders too
    "sd3": ("folder", []),  # loads every component from subfolders, T5 included
    "flux": ("folder", ["--learning_rate", "5e-2"]),  # the tiny Flux's images move least per step
    "chroma": ("tiny", ["--learning_rate", "5e-2"]),
    "zimage": ("folder", ["--learning_rate", "5e-2"]),  # the Qwen tokenizer and template survive a save
    "qwenimage": ("folder", ["--learning_rate", "5e-2", "--cache_latents"]),  # the video VAE, cached posteriors
    "flux2_klein": ("folder", ["--learning_rate", "5e-2", "--cache_latents"]),  # VAE batch-norm statistics saved
    "flux2": ("tiny", ["--learning_rate", "5e-2"]),  # the guidance input, Mistral's system turn
}
ADAPTER_FILES = tuple(WEIGHT_NAMES.values())


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """family -> output folder of its tiny run, trained on first use."""
    done = {}

    def get(family):
        if family not in done:
            base, extra = RUNS[family]
            folder = tmp_path_factory.mktemp(family)
            if base == "folder":
                extra = ["--pretrained_model_name_or_path", str(save_tiny_pipeline(family, folder / "base")), *extra]
            done[family] = train(family, folder / "out", *extra)
        return done[family]

    return get


@pytest.fixture(params=list(RUNS))
def run(request, runs):
    return request.param, runs(request.param)


def _validation_call(pipe, family: str, output_type: str = "pil") -> np.ndarray:
    """The recipe's validation call (seed 0, the run's resolution and steps), as stock diffusers makes it."""
    kwargs = get_family(family).pipeline_call_kwargs(32)
    generator = torch.Generator().manual_seed(0)
    image = pipe(
        prompt=PROMPT,
        generator=generator,
        output_type=output_type,
        height=32,
        width=32,
        num_inference_steps=2,
        **kwargs,
    ).images[0]
    return np.asarray(image, dtype=np.int16) if output_type == "pil" else image


def test_output_folder_holds_adapter_files_card_and_images(run):
    family, out = run
    for name in (*ADAPTER_FILES, "README.md", "image_0.png", "validation/final.png"):
        assert (out / name).is_file(), name
    assert not list(out.glob(".*.tmp")), "temporary files left behind"
    text = (out / "README.md").read_text()
    front = yaml.safe_load(text.split("---")[1])
    assert front["base_model"] == (f"tiny:{family}" if RUNS[family][0] == "tiny" else str(out.parent / "base"))
    assert front["instance_prompt"] == PROMPT
    assert front["license"]
    assert {"lora", "moslora"} <= set(front["tags"])
    assert "load_lora_weights" in text and "| rank r | `4` |" in text


def test_stock_diffusers_reproduces_the_trained_model_and_differs_from_the_base(run):
    family, out = run
    pipe = make_tiny_pipeline(family)
    base = _validation_call(pipe, family, output_type="np")
    pipe.load_lora_weights(str(out))  # picks pytorch_lora_weights.safetensors
    trained = np.asarray(Image.open(out / "image_0.png"), dtype=np.int16)
    assert np.abs(_validation_call(pipe, family) - trained).max() <= 2, (
        "stock-loaded LoRA does not reproduce the trained model's image"
    )
    assert np.abs(_validation_call(pipe, family, output_type="np") - base).max() > 1e-3, (
        "the adapter does not change the images"
    )


def test_sdxl_run_trains_both_text_encoders(runs):
    keys = load_file(runs("sdxl") / "pytorch_lora_weights.safetensors").keys()
    for prefix in get_family("sdxl").kohya_prefixes.values():  # SDXL's diffusers file holds kohya keys
        assert any(k.startswith(prefix + "_") for k in keys), prefix


def test_sd15_checkpoints_prune_and_validation_logs(runs):
    out = runs("sd15")
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-2"]  # --checkpoints_total_limit 1
    assert (out / "validation" / "step_000001.png").is_file()
    assert list((out / "logs").rglob("events.out.tfevents.*"))


def test_sample_config_runs_the_built_in_default(tmp_path):
    """The README's main job: samples/dreambooth_tiny.toml (the bundled base + samples/subject), shortened here."""
    out = tmp_path / "out"
    argv = [
        "--config",
        str(REPO / "samples" / "dreambooth_tiny.toml"),
        "--output_dir",
        str(out),
        "--max_train_steps",
        "1",
        "--num_validation_images",
        "1",
        "--num_inference_steps",
        "2",
        "--report_to",
        "none",
    ]
    assert run_main(argv) == 0
    assert all((out / name).is_file() for name in ADAPTER_FILES)
    assert (out / "validation" / "step_000000.png").is_file()  # before (validation_at_start)
    assert (out / "validation" / "final.png").is_file()  # after


def test_mixed_precision_keeps_adapters_in_fp32_with_gradient_checkpointing(tmp_path):
    out = train(
        "sd3",
        tmp_path / "out",
        "--mixed_precision",
        "bf16",
        "--gradient_checkpointing",
        "--train_text_encoder",
        "--checkpointing_steps",
        "2",
    )
    for path in [out / "moslora_weights.safetensors", *(out / "checkpoint-2").glob("adapter_*.safetensors")]:
        tensors, _ = load_safetensors(path)
        assert {t.dtype for t in tensors.values()} == {torch.float32}, path.name
