"""--dataset_name: a Hugging Face dataset (an imagefolder, a save_to_disk folder) trains like an image folder: its
captions reach the text encoders, images stored inside it are written once and cached like files, and bad columns
or a missing package are one line with exit status 2."""

from __future__ import annotations

import json
import sys

import pytest
from PIL import Image
from test_train_datasets import _spy_prompts
from train_support import PROMPT, REPO, run_main, saved_hf_dataset, tiny_run_argv, train

from moslora_diffusion.datasets.hf_dataset import HFDatasetError, load_rows

pytestmark = pytest.mark.usefixtures("one_thread")

COLOURS = [(200, 30, 30), (30, 30, 200), (30, 200, 30)]


def _images(sizes=((32, 32),) * 3):
    return [Image.new("RGB", size, colour) for size, colour in zip(sizes, COLOURS)]


def _imagefolder(folder, captions):
    folder.mkdir(parents=True)
    for i, image in enumerate(_images()):
        image.save(folder / f"{i}.png")
    lines = [json.dumps({"file_name": f"{i}.png", "caption": caption}) for i, caption in enumerate(captions)]
    (folder / "metadata.jsonl").write_text("\n".join(lines))
    return folder


def _argv(tmp_path, dataset, *extra):
    return tiny_run_argv("sd15", tmp_path / "out", "--dataset_name", str(dataset), "--cache_dir", str(tmp_path / "hf"),
                         *extra)  # fmt: skip


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MOSLORA_CACHE_DIR", str(tmp_path / "cache"))


def test_a_saved_datasets_captions_reach_the_text_encoder(tmp_path, monkeypatch):
    dataset = saved_hf_dataset(tmp_path / "saved", _images(), ["sks cross, red", "sks cross, blue", None])
    calls = _spy_prompts(monkeypatch, "sd15")
    argv = _argv(tmp_path, dataset, "--train_batch_size", "3", "--num_validation_images", "0")
    assert run_main(argv) == 0
    # the row without a caption trains on --instance_prompt; frozen encoders see each caption once
    assert sorted(p for call in calls for p in call) == sorted(["sks cross, red", "sks cross, blue", PROMPT])
    stored = sorted((tmp_path / "cache" / "dataset_images").iterdir())
    assert len(stored) == 3 and all(path.suffix == ".png" for path in stored)


def test_an_imagefolder_trains_offline_with_its_caption_column_and_its_files_in_place(tmp_path, monkeypatch):
    dataset = _imagefolder(tmp_path / "photos", ["a red sks cross", "a blue sks cross", "a green sks cross"])
    calls = _spy_prompts(monkeypatch, "sd15")
    argv = _argv(tmp_path, dataset, "--caption_column", "caption", "--max_train_steps", "1",
                 "--num_validation_images", "0")  # fmt: skip
    assert run_main(argv) == 0
    assert sorted(p for call in calls for p in call) == ["a blue sks cross", "a green sks cross", "a red sks cross"]
    assert not (tmp_path / "cache" / "dataset_images").exists()  # images kept as files are used where they are
    rows = load_rows(str(dataset), caption_column="caption", cache_dir=str(tmp_path / "hf"), images_dir=tmp_path)
    assert [row.image for row in rows] == [dataset / f"{i}.png" for i in range(3)]


def test_without_a_caption_column_every_image_trains_on_the_instance_prompt(tmp_path, monkeypatch):
    dataset = saved_hf_dataset(tmp_path / "saved", _images(), ["x"] * 3, text="notes")
    rows = load_rows(str(dataset), images_dir=tmp_path / "img")
    assert [row.caption for row in rows] == [None] * 3  # no "text" column: no captions, not "notes"
    calls = _spy_prompts(monkeypatch, "sd15")
    assert run_main(_argv(tmp_path, dataset, "--max_train_steps", "1", "--num_validation_images", "0")) == 0
    assert [p for call in calls for p in call] == [PROMPT]


def test_images_stored_in_a_dataset_are_written_once(tmp_path):
    dataset = saved_hf_dataset(tmp_path / "saved", _images(), [None] * 3)
    first = load_rows(str(dataset), images_dir=tmp_path / "img")
    times = [row.image.stat().st_mtime_ns for row in first]
    second = load_rows(str(dataset), images_dir=tmp_path / "img")
    assert [row.image for row in first] == [row.image for row in second]
    assert [row.image.stat().st_mtime_ns for row in second] == times
    assert [Image.open(row.image).getpixel((0, 0)) for row in first] == COLOURS


def _saved(tmp_path):
    return str(saved_hf_dataset(tmp_path / "saved", _images(), ["a", "b", "c"], image="photo"))


# case -> (flags after --dataset_name DATASET, expected text)
BAD_COLUMNS = {
    "image column missing": ([], "--image_column 'image' is not a column of dataset"),
    "caption column missing": (["--image_column", "photo", "--caption_column", "caption"], "columns: photo (Image)"),
    "image column not images": (["--image_column", "text"], "holds string values, not images"),
    "caption column not text": (["--image_column", "photo", "--caption_column", "photo"], "holds Image values"),
}


@pytest.mark.parametrize("case", BAD_COLUMNS)
def test_bad_columns_are_one_line_exit_2_naming_the_columns(case, tmp_path, capsys):
    extra, expected = BAD_COLUMNS[case]
    dataset = _saved(tmp_path)
    capsys.readouterr()  # save_to_disk's progress bar
    assert run_main(_argv(tmp_path, dataset, *extra)) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "torchao" not in line]
    assert len(lines) == 1 and "error:" in lines[0] and expected in lines[0], lines
    assert "photo (Image), text (string)" in lines[0]
    assert not (tmp_path / "out").exists()


def test_without_the_datasets_package_the_error_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets raises ImportError
    assert run_main(_argv(tmp_path, REPO / "samples" / "subject")) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "torchao" not in line]
    assert len(lines) == 1 and "pip install datasets" in lines[0], lines


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--instance_data_dir", "x"], "--instance_data_dir and --dataset_name both name the training images"),
        (["--mask_data_dir", "x", "--masked_loss"], "--mask_data_dir matches masks to image files by name"),
    ],
)
def test_dataset_name_refuses_flags_it_cannot_go_with(tmp_path, capsys, flags, expected):
    assert run_main(_argv(tmp_path, tmp_path, *flags)) == 2
    assert expected in capsys.readouterr().err


def test_a_dataset_without_captions_needs_the_instance_prompt(tmp_path, capsys):
    dataset = saved_hf_dataset(tmp_path / "saved", _images(), ["x"] * 3, text="notes")
    argv = [a for a in _argv(tmp_path, dataset) if a not in ("--instance_prompt", PROMPT)]
    assert run_main(argv) == 2
    assert "has no caption column 'text': name it with --caption_column" in capsys.readouterr().err


def test_a_missing_local_dataset_is_one_line_without_asking_the_hub(tmp_path):
    with pytest.raises(HFDatasetError, match="no such folder"):
        load_rows(str(tmp_path / "nope"), images_dir=tmp_path)


def test_training_on_a_saved_dataset_runs_two_steps(tmp_path):
    dataset = saved_hf_dataset(tmp_path / "saved", _images(((48, 32), (32, 48), (32, 32))), ["a", "b", None])
    out = train("sd15", tmp_path / "run", "--dataset_name", str(dataset))
    assert (out / "pytorch_lora_weights.safetensors").is_file()
