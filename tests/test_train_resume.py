"""Runs that must agree: a resumed run with the uninterrupted one (bit-exact, CPU fp32), cached latents
with encoding every step; and prior preservation generating its class images once."""

from __future__ import annotations

import json

import pytest
import numpy as np
import torch
from PIL import Image
from train_support import native_adapter, train

from moslora_diffusion.training.checkpoints import STATE_FILE


pytestmark = pytest.mark.usefixtures("one_thread")


# Randomness everywhere it can hide: adapter dropout, random flips and crops, accumulation over an epoch
# boundary (5 images, 2 batches per step: steps of 2, 2 and 1 batches per epoch), noise and timesteps.
RESUME_FLAGS = ["--lora_dropout", "0.1", "--random_flip", "--gradient_accumulation_steps", "2", "--num_validation_images", "0"]


def test_resumed_run_ends_with_the_same_adapter_bit_for_bit(tmp_path):
    whole = train("sd15", tmp_path / "whole", *RESUME_FLAGS, "--max_train_steps", "4", "--checkpointing_steps", "10")
    # Stop after step 2 (a checkpoint mid-epoch), then continue to step 4 from it.
    split = train("sd15", tmp_path / "split", *RESUME_FLAGS, "--max_train_steps", "2", "--checkpointing_steps", "2")
    assert json.loads((split / "checkpoint-2" / STATE_FILE).read_text())["step"] == 2
    train("sd15", split, *RESUME_FLAGS, "--max_train_steps", "4", "--checkpointing_steps", "10", "--resume_from_checkpoint", "latest")

    expected, resumed = native_adapter(whole), native_adapter(split)
    assert expected.keys() == resumed.keys()
    assert any(t.abs().max() > 0 for k, t in expected.items() if "lora_B" in k), "nothing was trained"
    different = [k for k in expected if not torch.equal(expected[k], resumed[k])]
    assert not different, f"{len(different)} tensors differ, first {different[0]}"


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
    flags = ["--with_prior_preservation", "--class_prompt", "a photo of a cross", "--class_data_dir", str(class_dir),
             "--num_class_images", "3", "--sample_batch_size", "2", "--num_validation_images", "0", "--max_train_steps", "1"]
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
    assert [p.stat().st_mtime_ns for p in made if p.name != "class_00001.png"] == [s for p, s in zip(made, stamps) if p.name != "class_00001.png"]
    assert not list(class_dir.glob(".*.tmp"))
