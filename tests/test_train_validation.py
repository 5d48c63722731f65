"""Validation a user can choose checkpoints by: several prompts, a fixed seed each, one labelled grid per step with a
caption file, the --validation_* sampling settings, and one clear line for bad input."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from PIL import Image
from train_support import PROMPT, run_main, tiny_run_argv, train

from moslora_diffusion.testing import make_tiny_pipeline
from moslora_diffusion.training.run_inputs import parse_run
from moslora_diffusion.training.validation import generate_validation_images, labelled_grid, read_prompts_file

pytestmark = pytest.mark.usefixtures("one_thread")

CALL = {"height": 32, "width": 32, "num_inference_steps": 2}


def test_a_run_with_two_prompts_writes_a_grid_row_each_and_a_caption_file(tmp_path, caplog):
    prompts = ["a red cross", "a blue cross on black"]
    caplog.set_level(logging.INFO, logger="moslora_diffusion")
    out = train("sd15", tmp_path / "out", "--validation_prompt", prompts[0], "--validation_prompt", prompts[1],
                "--num_validation_images", "2", "--validation_steps", "1", "--validation_resolution", "48x32",
                "--validation_num_inference_steps", "3", "--validation_guidance_scale", "2.5",
                "--validation_negative_prompt", "blurry", "--validation_cpu_offload")  # fmt: skip
    for name in ("step_000001", "final"):
        grid = Image.open(out / "validation" / f"{name}.png")
        assert grid.size == (2 * 48, 2 * (14 + 32))  # 2 images a row, a 14 px label strip above each of 2 rows
        gray = np.asarray(grid.convert("L"))
        assert gray[:14].min() < 128 and gray[46:60].min() < 128, "a prompt is not written above its row"
        assert (out / "validation" / f"{name}.txt").read_text() == f"row 1: {prompts[0]}\nrow 2: {prompts[1]}\n"
    assert sorted(p.name for p in out.glob("image_*.png")) == [f"image_{i}.png" for i in range(4)]
    card = (out / "README.md").read_text()
    assert f"Prompt: `{prompts[1]}`" in card and f'pipe(prompt="{prompts[0]}")' in card
    assert "--validation_cpu_offload has no effect on cpu" in caplog.text


def test_each_prompt_has_its_own_fixed_seed():
    """Prompt i is drawn with seed + i: its images are the same whatever the other prompts (and at every step)."""
    pipe = make_tiny_pipeline("sd15")
    both = generate_validation_images(pipe, ["a red cross", "a blue cross"], 2, 7, CALL, [])
    alone = generate_validation_images(pipe, ["a red cross"], 2, 7, CALL, [])
    assert [p for p, _ in both] == ["a red cross", "a blue cross"] and all(len(images) == 2 for _, images in both)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(both[0][1], alone[0][1]))
    assert not np.array_equal(np.asarray(both[0][1][0]), np.asarray(both[0][1][1]))  # two draws, not one twice
    again = generate_validation_images(pipe, ["a blue cross"], 1, 8, CALL, [])  # the second prompt's seed, alone
    assert np.array_equal(np.asarray(again[0][1][0]), np.asarray(both[1][1][0]))
    assert generate_validation_images(pipe, ["x"], 0, 7, CALL, []) == []


def test_labelled_grid_rows_follow_the_prompts():
    red, blue = Image.new("RGB", (8, 8), "red"), Image.new("RGB", (8, 8), "blue")
    grid = np.asarray(labelled_grid([("r", [red, red]), ("b", [blue])]))
    assert grid.shape == (2 * (14 + 8), 16, 3)
    assert (grid[14:22, :8] == [255, 0, 0]).all() and (grid[36:44, :8] == [0, 0, 255]).all()
    assert (grid[36:44, 8:] == 255).all()  # a shorter row leaves white


def test_prompts_file_adds_its_lines_after_the_flags(tmp_path):
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("a sks cross on a beach\n\n  a sks cross in snow  \n", encoding="utf-8")
    out = tmp_path / "out"
    config, _ = parse_run(
        tiny_run_argv("sd15", out, "--validation_prompt", "first", "--validation_prompts_file", str(prompts_file))
    )
    assert config.validation_prompt == ("first", "a sks cross on a beach", "a sks cross in snow")
    config, _ = parse_run(tiny_run_argv("sd15", out, "--validation_prompts_file", str(prompts_file)))
    assert config.validation_prompt == ("a sks cross on a beach", "a sks cross in snow")  # no instance prompt added
    assert parse_run(tiny_run_argv("sd15", out))[0].validation_prompt == (PROMPT,)


@pytest.mark.parametrize(
    "content,expected",
    [(None, "does not exist"), (b"\n \n", "holds no prompt"), (b"caf\xe9\n", "is not UTF-8 text (byte 3)")],
)
def test_bad_prompts_files(tmp_path, content, expected):
    path = tmp_path / "prompts.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ValueError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        read_prompts_file(path)


@pytest.mark.parametrize(
    "flags,expected",
    [
        (["--validation_resolution", "12x"], "argument --validation_resolution: expected WxH in pixels, e.g. 768x512"),
        (["--validation_resolution", "axb"], "got 'axb'"),
        (
            ["--validation_resolution", "36x32"],
            "--validation_resolution 36x32: both sides must be multiples of 8 for sd15",
        ),
        (["--validation_prompts_file", "nope.txt"], "--validation_prompts_file 'nope.txt' does not exist"),
        (["--validation_num_inference_steps", "0"], "--validation_num_inference_steps must be positive"),
    ],
)
def test_bad_validation_flags_are_one_line_exit_2(tmp_path, capsys, flags, expected):
    out = tmp_path / "out"
    assert run_main(tiny_run_argv("sd15", out, *flags)) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(lines) == 1 and expected in lines[0], lines
    assert not out.exists()


def test_config_file_gives_prompts_as_a_list_and_optimizer_args_as_a_table(tmp_path):
    (tmp_path / "run.toml").write_text(
        'validation_prompt = ["a, b", "c"]\nvalidation_resolution = "64x32"\n[optimizer_args]\namsgrad = true\n'
    )
    config, _ = parse_run(tiny_run_argv("sd15", tmp_path / "out", "--config", str(tmp_path / "run.toml")))
    assert config.validation_prompt == ("a, b", "c")  # a comma inside a prompt stays
    assert config.validation_resolution == (64, 32) and config.optimizer_args == ("amsgrad=True",)
