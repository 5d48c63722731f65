"""The trainer on a practitioner's own photos: captions reach the text encoders, buckets reach the denoiser (and
SDXL's micro-conditioning), masked loss, disk caches that make a second run encode nothing, the README's
dataset example, and bad dataset input as one line with exit status 2."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image
from train_support import PROMPT, REPO, native_adapter, run_main, tiny_run_argv, train

from moslora_diffusion.families import get_family

pytestmark = pytest.mark.usefixtures("one_thread")

CAPTIONS = {"img0": "sks cross, red, on white", "img1": "sks cross, blue, on black"}  # img2 has none


def _photos(folder, sizes, captions=None, mode="RGB", colour=(200, 30, 30)):
    folder.mkdir(parents=True, exist_ok=True)
    for i, size in enumerate(sizes):
        Image.new(mode, size, colour).save(folder / f"img{i}.png")
    for stem, caption in (captions or {}).items():
        (folder / f"{stem}.txt").write_text(caption)
    return folder


def _spy_prompts(monkeypatch, family_name: str) -> list[list[str]]:
    family, calls = get_family(family_name), []
    original = family.encode_prompt

    def spy(components, prompts, max_sequence_length=None):
        calls.append(list(prompts))
        return original(components, prompts, max_sequence_length)

    monkeypatch.setattr(family, "encode_prompt", staticmethod(spy))
    return calls


def _count_vae_encodes(monkeypatch) -> list[int]:
    calls, original = [], AutoencoderKL.encode

    def counting(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(AutoencoderKL, "encode", counting)
    return calls


@pytest.mark.parametrize(
    "family, extra",
    [("sd15", []), ("sdxl", []), ("sdxl", ["--train_text_encoder"])],
    ids=["sd15-cached", "sdxl-cached", "sdxl-trained-encoders"],
)
def test_each_images_caption_reaches_the_text_encoders(tmp_path, monkeypatch, family, extra):
    folder = _photos(tmp_path / "photos", [(32, 32)] * 3, CAPTIONS)
    calls = _spy_prompts(monkeypatch, family)
    train(family, tmp_path / "out", "--instance_data_dir", str(folder), "--train_batch_size", "3",
          "--max_train_steps", "1", "--num_validation_images", "0", *extra)  # fmt: skip
    expected = {*CAPTIONS.values(), PROMPT}  # the image without a caption trains on --instance_prompt
    if extra:  # trained encoders: the batch's captions, encoded with the batch
        assert len(calls) == 1 and sorted(calls[0]) == sorted(expected)
    else:  # frozen encoders: every caption encoded once, up front
        assert sorted(p for call in calls for p in call) == sorted(expected) and all(len(c) == 1 for c in calls)


BUCKET_FLAGS = ["--enable_bucket", "--min_bucket_reso", "16", "--max_bucket_reso", "64", "--bucket_reso_steps", "16"]


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_buckets_train_at_their_sizes_and_sdxl_sees_each_images_sizes(tmp_path, monkeypatch, family):
    # 96x32 and 32x96 fit the 48x16 and 16x48 buckets of the 32x32 area exactly (no crop).
    folder = _photos(tmp_path / "photos", [(96, 32), (96, 32), (32, 96), (32, 96)])
    seen = []
    cls = get_family(family)
    original = cls.predict

    def spy(denoiser, noisy_latents, timesteps, conditioning, batch, guidance_scale=1.0):
        seen.append((tuple(noisy_latents.shape[2:]), {k: v.tolist() for k, v in batch.items()}))
        return original(denoiser, noisy_latents, timesteps, conditioning, batch, guidance_scale)

    monkeypatch.setattr(cls, "predict", staticmethod(spy))
    train(family, tmp_path / "out", "--instance_data_dir", str(folder), "--train_batch_size", "2", *BUCKET_FLAGS,
          "--max_train_steps", "2", "--num_validation_images", "0", "--no-random_flip")  # fmt: skip
    scale = 2  # the tiny VAEs downsample twice: a 48x16 bucket is a 24x8 latent
    assert sorted(shape for shape, _ in seen) == [(16 // scale, 48 // scale), (48 // scale, 16 // scale)]
    for shape, micro in seen:
        if family == "sdxl":
            height, width = shape[0] * scale, shape[1] * scale
            assert micro["target_sizes"] == [[height, width]] * 2
            assert micro["original_sizes"] == [[32, 96] if width > height else [96, 32]] * 2
            assert micro["crop_top_lefts"] == [[0, 0]] * 2
        else:
            assert micro == {}


def test_fully_masked_images_train_nothing_and_unmasked_ones_do(tmp_path):
    folder = _photos(tmp_path / "photos", [(32, 32)] * 2, mode="RGBA", colour=(200, 30, 30, 0))  # alpha 0: ignore all
    flags = ["--instance_data_dir", str(folder), "--num_validation_images", "0", "--max_train_steps", "1"]
    masked = native_adapter(train("sd15", tmp_path / "masked", *flags, "--masked_loss", "--alpha_mask"))
    plain = native_adapter(train("sd15", tmp_path / "plain", *flags))
    assert all(not t.any() for k, t in masked.items() if "lora_B" in k)
    assert any(t.any() for k, t in plain.items() if "lora_B" in k)


def test_a_second_run_with_disk_caches_encodes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("MOSLORA_CACHE_DIR", str(tmp_path / "cache"))
    vae_calls, prompt_calls = _count_vae_encodes(monkeypatch), _spy_prompts(monkeypatch, "sd15")
    flags = ["--cache_latents_to_disk", "--cache_text_encoder_outputs_to_disk", "--random_flip",
             "--num_validation_images", "0", "--max_train_steps", "3"]  # fmt: skip
    first = native_adapter(train("sd15", tmp_path / "first", *flags))
    assert len(vae_calls) == 10 and len(prompt_calls) == 1  # 5 images x 2 flips; one caption (samples/subject)
    assert len(list((tmp_path / "cache" / "latents").glob("*.safetensors"))) == 10
    vae_calls.clear(), prompt_calls.clear()
    second = native_adapter(train("sd15", tmp_path / "second", *flags))
    assert vae_calls == [] and prompt_calls == []
    assert all(torch.equal(first[k], second[k]) for k in first)  # the cache holds exactly what was computed


def test_the_readme_dataset_example_runs(tmp_path):
    """README: moslora train --config samples/dreambooth_tiny.toml --dataset_config samples/dataset_tiny.toml ..."""
    out = tmp_path / "out"
    argv = ["--config", str(REPO / "samples" / "dreambooth_tiny.toml"), "--dataset_config",
            str(REPO / "samples" / "dataset_tiny.toml"), "--output_dir", str(out), "--max_train_steps", "1",
            "--num_validation_images", "1", "--num_inference_steps", "2", "--report_to", "none",
            "--no-validation_at_start"]  # fmt: skip
    assert run_main(argv) == 0
    assert (out / "pytorch_lora_weights.safetensors").is_file() and (out / "validation" / "final.png").is_file()


def _toml(tmp_path, text: str) -> str:
    _photos(tmp_path / "img", [(32, 32)])
    (tmp_path / "data.toml").write_text(text)
    return str(tmp_path / "data.toml")


def _mask_of_another_size(tmp_path) -> list[str]:
    _photos(tmp_path / "masks", [(16, 16)])
    return ["--instance_data_dir", str(_photos(tmp_path / "img", [(32, 32)])), "--masked_loss", "--mask_data_dir",
            str(tmp_path / "masks")]  # fmt: skip


def _bad_metadata(tmp_path) -> list[str]:
    folder = _photos(tmp_path / "img", [(32, 32)])
    (folder / "metadata.jsonl").write_text("{oops\n")
    return ["--instance_data_dir", str(folder)]


GOOD = '[general]\nresolution = 32\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = "img"\n'
# case -> (flags added to a tiny run without --instance_data_dir, expected text); callables build files in tmp_path
BAD_DATA = {
    "not toml": (lambda t: ["--dataset_config", _toml(t, "[general\n")], "not valid TOML"),
    "unknown key": (lambda t: ["--dataset_config", _toml(t, GOOD + "num_repeat = 2\n")], "did you mean 'num_repeats'"),
    "wrong type": (lambda t: ["--dataset_config", _toml(t, GOOD + 'num_repeats = "2"\n')], "expected an integer"),
    "missing image_dir": (
        lambda t: ["--dataset_config", _toml(t, GOOD.replace('"img"', '"nope"'))],
        "datasets[0].subsets[0].image_dir: folder 'nope' does not exist",
    ),
    "config and folder": (
        lambda t: ["--dataset_config", _toml(t, GOOD), "--instance_data_dir", str(t / "img")],
        "--dataset_config and --instance_data_dir both name the training images",
    ),
    "cached encoders trained": (
        lambda t: [
            "--instance_data_dir",
            str(REPO / "samples" / "subject"),
            "--cache_text_encoder_outputs",
            "--train_text_encoder",
        ],  # fmt: skip
        "cannot go with --train_text_encoder",
    ),
    "cached encoders shuffled": (
        lambda t: ["--dataset_config", _toml(t, GOOD + "shuffle_caption = true\n"), "--cache_text_encoder_outputs"],
        "shuffles its captions",
    ),
    "masked loss without masks": (
        lambda t: ["--instance_data_dir", str(REPO / "samples" / "subject"), "--masked_loss"],
        "--masked_loss needs masks",
    ),
    "mask of another size": (_mask_of_another_size, "a mask must have its image's size"),
    "bad metadata": (_bad_metadata, "metadata.jsonl:1: not a JSON object"),
    "flux bucket steps": (
        lambda t: [
            "--pretrained_model_name_or_path",
            "tiny:flux",
            "--instance_data_dir",
            str(REPO / "samples" / "subject"),
            "--enable_bucket",
            "--bucket_reso_steps",
            "8",
        ],  # fmt: skip
        "bucket_reso_steps = 8 does not suit flux",
    ),
}


@pytest.mark.parametrize("case", BAD_DATA)
def test_bad_dataset_input_is_one_line_exit_2_before_any_model_loads(case, tmp_path, capsys):
    extra, expected = BAD_DATA[case]
    out = tmp_path / "out"
    argv = [a for a in tiny_run_argv("sd15", out, "--dataset_config") if a != "--dataset_config"] + extra(tmp_path)
    assert run_main(argv) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "torchao" not in line]
    assert len(lines) == 1 and "error:" in lines[0] and expected in lines[0], lines
    assert not out.exists()
