"""Runs that must agree: a resumed run with the uninterrupted one (bit-exact, CPU fp32), cached latents
with encoding every step; and prior preservation generating its class images once."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from family_sets import ALL_FAMILIES
from PIL import Image
from train_support import PROMPT, native_adapter, run_main, saved_hf_dataset, tiny_run_argv, train

from moslora_diffusion.fileio import load_safetensors
from moslora_diffusion.formats import NATIVE_HEADER_KEY, WEIGHT_NAMES
from moslora_diffusion.training.checkpoints import ADAPTER_CONFIG_KEY, STATE_FILE
from moslora_diffusion.training.train_log import TrainLog, read_train_log

pytestmark = pytest.mark.usefixtures("one_thread")


# Randomness everywhere it can hide: adapter dropout, random flips and crops, accumulation over an epoch
# boundary (5 images, 2 batches per step: steps of 2, 2 and 1 batches per epoch), noise and timesteps.
RESUME_FLAGS = [
    "--lora_dropout",
    "0.1",
    "--random_flip",
    "--gradient_accumulation_steps",
    "2",
    "--num_validation_images",
    "0",
]


# A kohya dataset file with more randomness: buckets (two aspect ratios and a random crop), repeats, reg images
# mixed into the batches, caption shuffling and dropout. 6 training + 6 reg samples in batches of 2: buckets of
# 2, 2 and 8 samples give 6 batches, 3 steps per epoch.
BUCKETED_DATASET = """
[general]
caption_extension = ".txt"
shuffle_caption = true
keep_tokens = 1
caption_dropout_rate = 0.3
[[datasets]]
resolution = 32
batch_size = 2
enable_bucket = true
min_bucket_reso = 16
max_bucket_reso = 64
bucket_reso_steps = 16
  [[datasets.subsets]]
  image_dir = "img"
  num_repeats = 2
  class_tokens = "sks cross"
  flip_aug = true
  random_crop = true
  [[datasets.subsets]]
  image_dir = "reg"
  is_reg = true
  class_tokens = "a cross"
"""


def _bucketed_dataset(tmp_path) -> list[str]:
    rng = np.random.default_rng(0)
    for folder, sizes in (("img", [(96, 32), (32, 96), (50, 36)]), ("reg", [(32, 32), (32, 32)])):
        (tmp_path / folder).mkdir()
        for i, (width, height) in enumerate(sizes):
            pixels = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / folder / f"{i}.png")
    (tmp_path / "img" / "0.txt").write_text("sks cross, red, on white, small")
    (tmp_path / "data.toml").write_text(BUCKETED_DATASET)
    return ["--dataset_config", str(tmp_path / "data.toml"), "--prior_loss_weight", "0.5"]


def _hf_dataset(tmp_path) -> list[str]:
    """A save_to_disk dataset (images stored inside it) with captions for two of three rows, in buckets."""
    rng = np.random.default_rng(1)
    images = [
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for w, h in ((96, 32), (32, 96), (32, 32))
    ]
    dataset = saved_hf_dataset(tmp_path / "saved", images, ["sks cross, red", None, "sks cross, small"])
    return ["--dataset_name", str(dataset), "--enable_bucket", "--min_bucket_reso", "16", "--bucket_reso_steps", "16",
            "--caption_dropout_rate", "0.3"]  # fmt: skip


RESUME_DATA = {
    "folder": lambda tmp_path: [],
    "kohya-buckets-repeats-reg": _bucketed_dataset,
    "hf-dataset-buckets": _hf_dataset,
}


@pytest.mark.parametrize("data", RESUME_DATA)
def test_resumed_run_ends_with_the_same_adapter_bit_for_bit(tmp_path, monkeypatch, data):
    monkeypatch.setenv("MOSLORA_CACHE_DIR", str(tmp_path / "cache"))
    flags = [*RESUME_FLAGS, *RESUME_DATA[data](tmp_path)]
    whole = train("sd15", tmp_path / "whole", *flags, "--max_train_steps", "4", "--checkpointing_steps", "10")
    # Stop after step 2 (a checkpoint mid-epoch), then continue to step 4 from it.
    split = train("sd15", tmp_path / "split", *flags, "--max_train_steps", "2", "--checkpointing_steps", "2")
    assert json.loads((split / "checkpoint-2" / STATE_FILE).read_text())["step"] == 2
    train(
        "sd15",
        split,
        *flags,
        "--max_train_steps",
        "4",
        "--checkpointing_steps",
        "10",
        "--resume_from_checkpoint",
        "latest",
    )

    expected, resumed = native_adapter(whole), native_adapter(split)
    assert expected.keys() == resumed.keys()
    assert any(t.abs().max() > 0 for k, t in expected.items() if "lora_B" in k), "nothing was trained"
    different = [k for k in expected if not torch.equal(expected[k], resumed[k])]
    assert not different, f"{len(different)} tensors differ, first {different[0]}"


def _train_straight_and_split(family: str, tmp_path, flags: list[str]) -> tuple[Path, Path]:
    """4 steps in one run, and 2 steps, stop (checkpoint-2), then resume to 4."""
    whole = train(family, tmp_path / "whole", *flags, "--max_train_steps", "4", "--checkpointing_steps", "10")
    split = train(family, tmp_path / "split", *flags, "--max_train_steps", "2", "--checkpointing_steps", "2")
    first_log = read_train_log(split / "logs" / "train_log.jsonl")
    resume = ["--max_train_steps", "4", "--checkpointing_steps", "10", "--resume_from_checkpoint", "latest"]
    train(family, split, *flags, *resume)
    log = read_train_log(split / "logs" / "train_log.jsonl")
    # A resumed run keeps the first run's lines as written; a fresh 4-step run would have rewritten them.
    assert log[:2] == first_log and [row["step"] for row in log] == [1, 2, 3, 4]
    return whole, split


# Every family but sd15, whose resume is tested above with more randomness (buckets, repeats, reg images).
@pytest.mark.parametrize("family", [f for f in ALL_FAMILIES if f != "sd15"])
def test_every_family_resumes_bit_for_bit(family, tmp_path):
    flags = ["--lora_dropout", "0.1", "--random_flip", "--num_validation_images", "0"]
    whole, split = _train_straight_and_split(family, tmp_path, flags)
    expected, resumed = native_adapter(whole), native_adapter(split)
    assert expected.keys() == resumed.keys()
    assert any(t.abs().max() > 0 for k, t in expected.items() if "lora_B" in k), "nothing was trained"
    different = [k for k in expected if not torch.equal(expected[k], resumed[k])]
    assert not different, f"{family}: {len(different)} tensors differ, first {different[0]}"


def test_cached_latents_train_like_encoding_every_step(tmp_path):
    # Augmentation off; the cache keeps the VAE posterior, so each step still samples a fresh latent.
    flags = ["--center_crop", "--no-random_flip", "--num_validation_images", "0", "--max_train_steps", "3"]
    encoded = native_adapter(train("sd15", tmp_path / "encoded", *flags))
    cached = native_adapter(train("sd15", tmp_path / "cached", *flags, "--cache_latents"))
    scale = max(t.abs().max() for k, t in encoded.items() if "lora_B" in k)
    for key in encoded:
        # Batched and one-by-one VAE encodes differ by float rounding (~1e-6) only.
        torch.testing.assert_close(cached[key], encoded[key], rtol=0, atol=0.01 * float(scale), msg=key)


def test_prior_preservation_generates_missing_class_images_once(tmp_path):
    class_dir = tmp_path / "class"
    flags = [
        "--with_prior_preservation",
        "--class_prompt",
        "a photo of a cross",
        "--class_data_dir",
        str(class_dir),
        "--num_class_images",
        "3",
        "--sample_batch_size",
        "2",
        "--num_validation_images",
        "0",
        "--max_train_steps",
        "1",
    ]
    train("sd15", tmp_path / "first", *flags)
    made = sorted(class_dir.glob("*.png"))
    assert [p.name for p in made] == ["class_00000.png", "class_00001.png", "class_00002.png"]
    stamps = [p.stat().st_mtime_ns for p in made]
    lost = np.asarray(Image.open(class_dir / "class_00001.png"), dtype=np.int16)
    (class_dir / "class_00001.png").unlink()  # lose one: only it is made again, the same image (seeded per image)
    train("sd15", tmp_path / "second", *flags, "--cache_latents")
    assert sorted(class_dir.glob("*.png")) == made
    again = np.asarray(Image.open(class_dir / "class_00001.png"), dtype=np.int16)
    # Not bit-identical: it was made in a batch of 2 and is now made alone, and CPU kernels may round
    # differently per batch size; a different seed would differ everywhere by far more.
    assert np.abs(again - lost).max() <= 3, np.abs(again - lost).max()
    assert [p.stat().st_mtime_ns for p in made if p.name != "class_00001.png"] == [
        s for p, s in zip(made, stamps) if p.name != "class_00001.png"
    ]
    assert not list(class_dir.glob(".*.tmp"))


def test_a_short_run_checkpoints_its_last_step_and_a_longer_run_continues_it(tmp_path):
    """--checkpointing_steps larger than the run: the last step is still saved, so the run can be extended."""
    out = train("sd15", tmp_path / "out", "--num_validation_images", "0", "--checkpointing_steps", "1000")
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-2"]
    state = json.loads((out / "checkpoint-2" / STATE_FILE).read_text())
    assert state == {"step": 2, "seed": 0, "family": "sd15", "base_model": "tiny:sd15"}
    # The checkpoint's adapter says what it is, as the native file's header does (for moslora inspect / export).
    _, metadata = load_safetensors(out / "checkpoint-2" / "adapter_unet.safetensors")
    _, native_metadata = load_safetensors(out / WEIGHT_NAMES["native"])
    assert (
        json.loads(metadata[ADAPTER_CONFIG_KEY]) == json.loads(native_metadata[NATIVE_HEADER_KEY])["components"]["unet"]
    )
    first_log = read_train_log(out / "logs" / "train_log.jsonl")
    assert [row["step"] for row in first_log] == [1, 2]

    # Longer, and --checkpoints_total_limit 1 with a last step (3) that is no multiple of --checkpointing_steps.
    train(
        "sd15",
        out,
        "--num_validation_images",
        "0",
        "--max_train_steps",
        "3",
        "--checkpointing_steps",
        "2",
        "--checkpoints_total_limit",
        "1",
        "--resume_from_checkpoint",
        "latest",
    )
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-3"]
    log = read_train_log(out / "logs" / "train_log.jsonl")
    assert log[:2] == first_log and [row["step"] for row in log] == [1, 2, 3]


def test_the_train_log_has_a_line_per_step_without_tensorboard(tmp_path):
    out = train(
        "sd15",
        tmp_path / "out",
        "--num_validation_images",
        "0",
        "--max_train_steps",
        "3",
        "--lr_scheduler",
        "linear",
        "--report_to",
        "none",
    )
    log = read_train_log(out / "logs" / "train_log.jsonl")
    assert [sorted(row) for row in log] == [["loss", "lr", "seconds", "step"]] * 3
    assert [row["step"] for row in log] == [1, 2, 3]
    assert all(isinstance(row["loss"], float) and 0 < row["loss"] < 10 for row in log)
    assert [row["lr"] for row in log] == pytest.approx([1e-2 * 2 / 3, 1e-2 / 3, 0.0])  # linear decay over 3 steps
    seconds = [row["seconds"] for row in log]
    assert seconds == sorted(seconds) and seconds[0] >= 0
    assert not list((out / "logs").rglob("events.out.tfevents.*"))


def test_a_resumed_train_log_drops_the_lines_a_killed_run_wrote_after_its_checkpoint(tmp_path):
    path = tmp_path / "logs" / "train_log.jsonl"
    path.parent.mkdir()
    path.write_text(
        "".join(json.dumps({"step": s, "loss": 1.0, "lr": 0.1, "seconds": float(s)}) + "\n" for s in range(1, 6))
        + '{"step": 6, "lo'
    )  # the line the kill cut short
    TrainLog(path, start_step=3).write(4, loss=0.5, lr=0.1)
    rows = read_train_log(path)
    assert [row["step"] for row in rows] == [1, 2, 3, 4] and rows[-1]["loss"] == 0.5 and rows[-1]["seconds"] >= 3.0
    TrainLog(path, start_step=0).write(1, loss=0.7, lr=0.1)  # a new run (--overwrite_output_dir) starts afresh
    assert [row["loss"] for row in read_train_log(path)] == [0.7]


def test_a_rerun_into_an_earlier_runs_folder_is_refused_unless_told_to_overwrite(tmp_path, capsys):
    out = train("sd15", tmp_path / "out", "--num_validation_images", "0")
    before = {name: (out / name).read_bytes() for name in WEIGHT_NAMES.values()}
    capsys.readouterr()
    assert run_main(tiny_run_argv("sd15", out, "--num_validation_images", "0", "--instance_prompt", PROMPT)) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(
        f"train_dreambooth_moslora.py: error: --output_dir '{out}' already holds an earlier run's moslora_weights.safetensors"
    ), lines
    assert "--resume_from_checkpoint latest, or replace it with --overwrite_output_dir" in lines[0]
    assert {name: (out / name).read_bytes() for name in before} == before

    train("sd15", out, "--num_validation_images", "0", "--seed", "1", "--overwrite_output_dir")
    assert (out / WEIGHT_NAMES["native"]).read_bytes() != before[WEIGHT_NAMES["native"]]


@pytest.mark.parametrize("other", [("--rank", "8"), ("--mixer_lr", "0")], ids=["rank", "optimizer groups"])
def test_resuming_with_settings_the_checkpoint_does_not_fit_is_one_line(other, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_main(tiny_run_argv("sd15", out, "--num_validation_images", "0")) == 0
    argv = tiny_run_argv("sd15", out, "--num_validation_images", "0", "--max_train_steps", "4", *other)
    assert run_main([*argv, "--resume_from_checkpoint", "latest"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert f"cannot resume from {out / 'checkpoint-2'}: it does not fit this run's settings (" in line, line
