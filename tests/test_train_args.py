"""Flags, --config files, and bad input: one clear line, exit status 2, nothing written."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest
from PIL import Image
from train_support import PROMPT, REPO, SUBJECT, run_main, tiny_run_argv

from moslora_diffusion.training.config import RunConfig, UsageError
from moslora_diffusion.training.run_inputs import parse_run


def _bad_input(capsys, argv, expected: str, output_dir) -> None:
    assert run_main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "error:" in lines[0], err
    assert expected in lines[0], lines[0]
    assert not output_dir.exists(), "bad input must not create the output folder"


def _folder_without_images(tmp_path):
    folder = tmp_path / "junk"
    folder.mkdir()
    (folder / "a.txt").write_text("not an image")
    (folder / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (folder / "c.jpg").write_bytes(b"")
    return folder


def _unsupported_pipeline(tmp_path):
    folder = tmp_path / "kandinsky"
    folder.mkdir()
    (folder / "model_index.json").write_text(
        json.dumps({"_class_name": "KandinskyPipeline", "unet": ["diffusers", "UNet2DConditionModel"]})
    )
    return folder


# case -> (flags replacing/added to a good tiny run, expected text). Callables build fixtures in tmp_path.
BAD_INPUTS = {
    "missing instance dir": (lambda t: ["--instance_data_dir", str(t / "nope")], "--instance_data_dir '"),
    "empty instance dir": (lambda t: ["--instance_data_dir", str((t / "empty").mkdir() or t / "empty")], "is empty"),
    "no readable images": (
        lambda t: ["--instance_data_dir", str(_folder_without_images(t))],
        "holds no readable images (found 3 files: a.txt, b.png, c.jpg)",
    ),
    "missing base": (lambda t: ["--pretrained_model_name_or_path", str(t / "no" / "such" / "model")], "does not exist"),
    "base without model_index": (
        lambda t: ["--pretrained_model_name_or_path", str(t)],
        "not a diffusers pipeline folder",
    ),
    "unsupported pipeline": (
        lambda t: ["--pretrained_model_name_or_path", str(_unsupported_pipeline(t))],
        "Unsupported pipeline 'KandinskyPipeline'",
    ),
    "unknown tiny family": (lambda t: ["--pretrained_model_name_or_path", "tiny:sd9"], "tiny:sd15"),
    "prior without class prompt": (
        lambda t: ["--with_prior_preservation", "--class_data_dir", str(t / "class")],
        "--class_prompt is required",
    ),
    "resume without checkpoint": (lambda t: ["--resume_from_checkpoint", "latest"], "no checkpoint-<step> folder"),
    "resume from missing folder": (
        lambda t: ["--resume_from_checkpoint", str(t / "checkpoint-7")],
        "no such checkpoint folder",
    ),
    "unknown preset": (lambda t: ["--target_modules", "atention"], "Unknown target preset 'atention'"),
    "modules the model lacks": (lambda t: ["--target_modules", "to_qq,to_kk"], "--target_modules"),
    "8-bit adam without bitsandbytes": (lambda t: ["--use_8bit_adam"], "pip install bitsandbytes"),
    "bad resolution": (lambda t: ["--resolution", "30"], "multiple of 8"),
}


_HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(c, marks=pytest.mark.skipif(_HAS_BNB and "bitsandbytes" in c, reason="bitsandbytes installed"))
        for c in BAD_INPUTS
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, tmp_path, capsys):
    extra, expected = BAD_INPUTS[case]
    out = tmp_path / "out"
    _bad_input(capsys, tiny_run_argv("sd15", out) + extra(tmp_path), expected, out)


def test_missing_required_flag(tmp_path, capsys):
    out = tmp_path / "out"
    _bad_input(
        capsys,
        ["--pretrained_model_name_or_path", "tiny:sd15", "--instance_data_dir", str(SUBJECT), "--output_dir", str(out)],
        "--instance_prompt is required",
        out,
    )


def test_unreadable_files_are_skipped_with_a_warning_naming_them(tmp_path, caplog):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for image in sorted(SUBJECT.glob("*.png"))[:2]:
        (folder / image.name).write_bytes(image.read_bytes())
    (folder / "notes.txt").write_text("hi")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    _, inputs = parse_run(tiny_run_argv("sd15", tmp_path / "out", "--instance_data_dir", str(folder)))
    assert [p.name for p in inputs.instance_images] == ["cross_0.png", "cross_1.png"]
    assert "broken.png, notes.txt" in caplog.text


def test_script_reports_bad_input_without_traceback(tmp_path):
    out = tmp_path / "out"
    argv = tiny_run_argv("sd15", out, "--instance_data_dir", str(tmp_path / "missing"))
    result = subprocess.run(
        [sys.executable, str(REPO / "train_scripts" / "train_dreambooth_moslora.py"), *argv],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
        timeout=300,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert (
        f"train_dreambooth_moslora.py: error: --instance_data_dir '{tmp_path / 'missing'}' does not exist"
        in result.stderr
    )
    assert not out.exists()


# ---------------------------------------------------------------------------------------------- config files

CONFIG_KEYS = {
    "pretrained_model_name_or_path": "tiny:sdxl",
    "instance_data_dir": "subject",  # relative to the config file
    "instance_prompt": PROMPT,
    "rank": 8,
    "random_flip": True,
    "target_modules": ["to_q", "to_v"],
    "learning_rate": 3e-4,
}


def _write_toml(path, values):
    lines = []
    for key, value in values.items():
        lines.append(f"{key} = {json.dumps(value)}" if not isinstance(value, bool) else f"{key} = {str(value).lower()}")
    path.write_text("\n".join(lines) + "\n")


def _config_dir(tmp_path):
    folder = tmp_path / "cfg"
    (folder / "subject").mkdir(parents=True)
    Image.new("RGB", (16, 16), "red").save(folder / "subject" / "red.png")
    return folder


def test_toml_and_yaml_configs_give_the_same_arguments(tmp_path):
    import yaml

    folder = _config_dir(tmp_path)
    _write_toml(folder / "run.toml", CONFIG_KEYS)
    (folder / "run.yaml").write_text(yaml.safe_dump(CONFIG_KEYS))
    (toml_config, toml_inputs), (yaml_config, yaml_inputs) = (
        parse_run(["--config", str(folder / name)]) for name in ("run.toml", "run.yaml")
    )
    from_toml, from_yaml = dataclasses.asdict(toml_config), dataclasses.asdict(yaml_config)
    for values in (from_toml, from_yaml):
        values.pop("seed")  # drawn at random when not given
    assert from_toml == from_yaml and toml_inputs.instance_images == yaml_inputs.instance_images
    assert (
        from_toml["rank"] == 8 and from_toml["random_flip"] is True and from_toml["target_modules"] == ("to_q", "to_v")
    )
    assert [p.name for p in toml_inputs.instance_images] == ["red.png"]


def test_flags_override_the_config_file(tmp_path):
    folder = _config_dir(tmp_path)
    _write_toml(folder / "run.toml", CONFIG_KEYS)
    config, _ = parse_run(
        ["--config", str(folder / "run.toml"), "--rank", "2", "--no-random_flip", "--target_modules", "attention+ff"]
    )
    assert (config.rank, config.random_flip, config.target_modules, config.learning_rate) == (
        2,
        False,
        "attention+ff",
        3e-4,
    )


@pytest.mark.parametrize(
    "content,expected",
    [
        ("rnak = 4\n", "unknown key 'rnak' (did you mean 'rank'?)"),
        ("rank = \n", "cannot parse"),
        ("center_crop = 1\n", "true or false"),
    ],
)
def test_bad_config_files(tmp_path, content, expected):
    (tmp_path / "bad.toml").write_text(content)
    with pytest.raises(UsageError, match=expected.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")):
        parse_run(["--config", str(tmp_path / "bad.toml")])


# ---------------------------------------------------------------------------------------------- moslora train


def test_moslora_train_takes_the_scripts_flags(tmp_path, capsys):
    from moslora_diffusion import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    assert (
        "usage: moslora train" in help_text and "--with_prior_preservation" in help_text and "--mixer_init" in help_text
    )
    out = tmp_path / "out"
    assert cli.main(["train", *tiny_run_argv("sd15", out, "--target_modules", "atention")]) == 2
    assert (
        capsys.readouterr().err.strip()
        == "moslora train: error: Unknown target preset 'atention'; presets are ['attention', 'attention+ff'] (or give module names)"
    )
    assert not out.exists()


_HEAVY = ("torch", "diffusers", "transformers", "peft", "accelerate")


@pytest.mark.parametrize(
    "argv,status",
    [
        (["--help"], 0),
        (["train", "--help"], 0),
        (["export", "--help"], 0),
        (["train", "--rankk", "3"], 2),
        (["train", "--rank", "x"], 2),
    ],
)
def test_help_and_flag_errors_answer_before_the_heavy_imports(argv, status):
    """`moslora --help`, `moslora train --help` and bad flags must not wait for torch & co. (seconds each)."""
    code = (
        "import sys\nfrom moslora_diffusion.cli import main\n"
        f"try:\n    status = main({argv!r})\nexcept SystemExit as exit:\n    status = exit.code\n"
        f"loaded = [m for m in {_HEAVY!r} if m in sys.modules]\n"
        "print('LOADED', loaded, 'STATUS', status)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert f"LOADED [] STATUS {status}" in done.stdout, done.stdout + done.stderr


# ---------------------------------------------------------------------------------------------- flags a new user trips on


def test_an_abbreviated_flag_is_refused_with_the_full_name_suggested(tmp_path, capsys):
    out = tmp_path / "out"
    _bad_input(
        capsys,
        tiny_run_argv("sd15", out, "--learning_rat", "1e-3"),
        "unrecognized arguments: --learning_rat 1e-3 (did you mean --learning_rate?)",
        out,
    )
    with pytest.raises(UsageError, match="unrecognized arguments: --conf"):  # nor is --config abbreviated
        parse_run(["--conf", str(tmp_path / "run.toml")])


def test_an_output_dir_that_is_a_file_is_refused_before_the_base_is_looked_up(tmp_path, capsys):
    taken = tmp_path / "notes.txt"
    taken.write_text("mine")
    # A hub id as the base: were the folder checked after the base, this would wait for the hub (or say offline).
    for output_dir, expected in ((taken, "is a file"), (taken / "run", f"lies under a file ('{taken}')")):
        argv = tiny_run_argv("sd15", output_dir, "--pretrained_model_name_or_path", "nosuch/model")
        assert run_main(argv) == 2
        line = capsys.readouterr().err.strip()
        assert line.startswith(
            f"train_dreambooth_moslora.py: error: --output_dir '{output_dir}' {expected}; give a folder"
        ), line
        assert taken.read_text() == "mine"


def test_a_mistyped_hub_id_fails_at_once_in_one_line(tmp_path, capsys, monkeypatch):
    """Offline (HF_HUB_OFFLINE, as in these tests), or online with no such repository: no retries, one line."""
    out = tmp_path / "out"
    started = time.monotonic()
    _bad_input(
        capsys,
        tiny_run_argv("sd15", out, "--pretrained_model_name_or_path", "stabilityai/stable-diffusion-xl-bas"),
        "'stabilityai/stable-diffusion-xl-bas' is neither a local folder nor a file, and as a Hub id it could not "
        "be fetched (offline: HF_HUB_OFFLINE is set",
        out,
    )

    import huggingface_hub
    from huggingface_hub import constants

    requests = []

    def unreachable(self, repo_id, **kwargs):
        requests.append(kwargs.get("timeout"))
        raise OSError("[Errno -2] Name or service not known")

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", unreachable)
    _bad_input(
        capsys,
        tiny_run_argv("sd15", out, "--pretrained_model_name_or_path", "nosuch/model"),
        "could not be fetched (offline, or no such repository: [Errno -2] Name or service not known)",
        out,
    )
    assert len(requests) == 1 and requests[0] <= 10, requests  # one request with a short timeout: no retries
    assert time.monotonic() - started < 30


def test_help_gives_every_flag_a_text_and_no_empty_defaults(capsys):
    from moslora_diffusion.training.config import build_parser

    parser = build_parser()
    silent = [
        a.dest
        for a in parser._actions
        if a.option_strings and a.help != argparse.SUPPRESS and not (a.help or "").strip()
    ]
    assert not silent, f"flags without help: {silent}"
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "(default: None)" not in text
    assert "AdamW's beta1" in text and "AdamW's epsilon" in text and "(default: 1e-08)" in text
    assert "Default: the rank (s = 1)." in text


def test_every_run_config_field_is_a_flag_and_a_config_key(tmp_path):
    """Adding a flag is one RunConfig field: the parser and the --config keys follow from it."""
    from moslora_diffusion.training.config import build_parser

    flags = {a.dest for a in build_parser()._actions if a.option_strings} - {"help", "config"}
    assert flags == {f.name for f in dataclasses.fields(RunConfig)}
    folder = _config_dir(tmp_path)
    _write_toml(folder / "run.toml", {**CONFIG_KEYS, "overwrite_output_dir": True, "adam_epsilon": 1e-6})
    config, _ = parse_run(["--config", str(folder / "run.toml")])
    assert config.overwrite_output_dir is True and config.adam_epsilon == 1e-6
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.rank = 3


def test_the_torchvision_fallback_notices_of_transformers_are_silenced():
    """transformers 5 logs "`CLIPImageProcessor` requires torchvision (not installed); falling back to ..."
    when diffusers' pipelines import, on every `moslora train` and `moslora merge`: not the user's concern."""
    code = "{}import transformers\ntransformers.CLIPImageProcessor, transformers.SiglipImageProcessor\n"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    quiet = subprocess.run(
        [sys.executable, "-c", code.format("import moslora_diffusion._warnings\n")],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=300,
    )
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    assert "requires torchvision" not in quiet.stderr, quiet.stderr
    if importlib.util.find_spec("torchvision") is None:  # the notice exists here: check that the test sees it
        loud = subprocess.run(
            [sys.executable, "-c", code.format("")], capture_output=True, text=True, cwd=REPO, env=env, timeout=300
        )
        assert "requires torchvision" in loud.stderr, loud.stderr


def test_train_text_encoder_on_a_family_whose_encoders_stay_frozen_says_so(tmp_path, caplog):
    from moslora_diffusion.training.run_inputs import parse_run

    argv = ["--pretrained_model_name_or_path", "tiny:chroma", "--instance_data_dir", str(REPO / "samples" / "subject"),
            "--instance_prompt", "a photo of sks shape", "--output_dir", str(tmp_path / "out"), "--train_text_encoder"]  # fmt: skip
    with caplog.at_level("WARNING"):
        parse_run(argv)
    assert any("--train_text_encoder: chroma's text encoders stay frozen" in r.getMessage() for r in caplog.records)
