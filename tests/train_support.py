"""Shared by tests/test_train_*.py: run the DreamBooth recipe in-process on a tiny offline base."""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate.state import AcceleratorState, GradientState

from moslora_diffusion.fileio import load_safetensors
from moslora_diffusion.training.entry import main

REPO = Path(__file__).resolve().parents[1]
SUBJECT = REPO / "samples" / "subject"
PROMPT = "a photo of sks cross"


def tiny_run_argv(family: str, output_dir: Path, *extra: str) -> list[str]:
    """Flags for a few-step run at 32 px: 2 steps, one 2-step validation image, no TensorBoard, seed 0;
    on samples/subject unless ``extra`` names a --dataset_config or --dataset_name."""
    data = [] if {"--dataset_config", "--dataset_name"} & set(extra) else ["--instance_data_dir", str(SUBJECT)]
    return [
        "--pretrained_model_name_or_path", f"tiny:{family}",
        *data,
        "--instance_prompt", PROMPT,
        "--output_dir", str(output_dir),
        "--resolution", "32",  # a tiny base saved as a folder would default to its family's 512-1024
        "--max_train_steps", "2",
        "--learning_rate", "1e-2",
        "--num_validation_images", "1",
        "--num_inference_steps", "2",
        "--report_to", "none",
        "--seed", "0",
        *extra,
    ]  # fmt: skip


def run_main(argv: list[str]) -> int:
    """The recipe's main(argv) in this process, with a fresh accelerate state before and after."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    try:
        return main(argv)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def train(family: str, output_dir: Path, *extra: str) -> Path:
    """A successful tiny run of ``family`` into ``output_dir``."""
    assert run_main(tiny_run_argv(family, output_dir, *extra)) == 0
    return output_dir


def native_adapter(output_dir: Path) -> dict[str, torch.Tensor]:
    return load_safetensors(Path(output_dir) / "moslora_weights.safetensors")[0]


def saved_hf_dataset(folder: Path, images: list, captions: list[str | None], **columns: str) -> Path:
    """A Hugging Face dataset written with save_to_disk (images stored as bytes inside it): ``images`` are
    PIL images, ``captions`` the text column (None: a row without a caption). ``columns`` renames the
    "image" and "text" columns (e.g. image="photo")."""
    import datasets

    image, text = columns.get("image", "image"), columns.get("text", "text")
    features = datasets.Features({image: datasets.Image(), text: datasets.Value("string")})
    datasets.Dataset.from_dict({image: images, text: captions}, features=features).save_to_disk(str(folder))
    return folder
