"""The ``moslora`` command on adapter files: export, inspect, resize, and one-line errors (exit 2)."""

from __future__ import annotations

import argparse
import json
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from moslora_diffusion import MoSLoRAConfig, add_moslora
from moslora_diffusion.cli import SUBCOMMANDS, main
from moslora_diffusion.formats import (
    CHECKPOINT_CONFIG_KEY,
    DIFFUSERS_WEIGHT_NAME,
    KOHYA_WEIGHT_NAME,
    NATIVE_WEIGHT_NAME,
    ONETRAINER_WEIGHT_NAME,
    WEIGHT_NAMES,
    component_config_from_peft,
    diffusers_state_dict,
    read_adapter_file,
)
from moslora_diffusion.loaders import save_moslora_weights
from moslora_diffusion.testing import make_tiny_pipeline, save_tiny_pipeline

Q = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"


@pytest.fixture(scope="module")
def adapter_pipe():
    """A tiny SD 1.5 pipeline with MoSLoRA adapters on the UNet and the (flattened) CLIP text encoder."""
    pipe = make_tiny_pipeline("sd15")
    add_moslora(pipe.unet, MoSLoRAConfig(r=4, lora_alpha=6))
    add_moslora(pipe.text_encoder, MoSLoRAConfig(r=2, lora_alpha=2, mixer_init="orthogonal"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for model in (pipe.unet, pipe.text_encoder):
            for name, param in model.named_parameters():
                if ".lora_B." in name:
                    param.copy_(torch.randn(param.shape, generator=g) * 0.05)
    return pipe


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, adapter_pipe) -> Path:
    directory = tmp_path_factory.mktemp("adapter")
    save_moslora_weights(adapter_pipe, directory, base_model="tiny/sd15")
    return directory


def write_training_checkpoint(pipe, folder: Path, with_config: bool = True) -> Path:
    """A ``checkpoint-N`` folder as the trainer writes it: PEFT parameter names (adapter "default"), each
    component's config in "moslora.config" (absent in checkpoints of earlier versions), training_state.json."""
    folder.mkdir(parents=True)
    for component in ("unet", "text_encoder"):
        model = getattr(pipe, component)
        tensors = {name: p.detach().clone() for name, p in model.named_parameters() if "lora_" in name}
        config = {CHECKPOINT_CONFIG_KEY: json.dumps(component_config_from_peft(model.peft_config["default"]))}
        save_file(tensors, str(folder / f"adapter_{component}.safetensors"), metadata=config if with_config else None)
    state = {"step": 2, "seed": 0, "family": "sd15", "base_model": "tiny/sd15"}
    (folder / "training_state.json").write_text(json.dumps(state))
    (folder / "optimizer.bin").write_bytes(b"")  # beside the adapters, as accelerate writes it; never read
    return folder


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory, adapter_pipe) -> Path:
    return write_training_checkpoint(adapter_pipe, tmp_path_factory.mktemp("run") / "checkpoint-2")


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pipelines")
    return {family: save_tiny_pipeline(family, root / family) for family in ("sd15", "sdxl")}


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("moslora: error: ")
    for fragment in fragments:
        assert fragment in lines[0]


def _deltas(path: Path) -> dict[str, torch.Tensor]:
    state = read_adapter_file(path)
    return {f"{c}.{p}": layer.delta_weight() for c, p, layer in state.layer_items()}


def test_subcommands_are_registered():
    assert {"export", "inspect", "resize"} <= SUBCOMMANDS.keys()


# ------------------------------------------------------------------------------------------------
# inspect


def test_inspect_reports_layout_family_ranks_and_mixers(capsys, adapter_dir):
    code, out, _ = run_cli(capsys, "inspect", adapter_dir, "--json")
    assert code == 0
    report = json.loads(out)
    assert report["format"] == "native" and report["family"] == "sd15" and report["base_model"] == "tiny/sd15"
    unet, te = report["components"]["unet"], report["components"]["text_encoder"]
    assert (unet["rank"], unet["lora_alpha"], unet["modules"], unet["mixer"]) == (4, 6, 32, "kaiming")
    assert (te["rank"], te["mixer"]) == (2, "orthogonal")
    assert len(report["layers"]) == 32 + 8
    stats = report["layers"]["text_encoder.text_model.encoder.layers.0.self_attn.q_proj"]
    assert stats["singular_values"] == pytest.approx([1.0, 1.0])  # orthogonal init, B-only randomised
    code, out, _ = run_cli(capsys, "inspect", adapter_dir)
    assert "format:     native" in out and "family:     sd15" in out and "|M-I|/|I|" in out


def test_inspect_checks_a_kohya_file_against_a_pipeline_folder(capsys, adapter_dir, pipelines):
    code, out, _ = run_cli(
        capsys, "inspect", adapter_dir / KOHYA_WEIGHT_NAME, "--pretrained_model_name_or_path", pipelines["sd15"]
    )
    assert code == 0
    assert "format:     kohya" in out and "fits:" in out and "no mixer" in out


# ------------------------------------------------------------------------------------------------
# export


def test_export_writes_the_same_files_as_save(capsys, adapter_dir, tmp_path):
    code, out, _ = run_cli(capsys, "export", adapter_dir, "--to", "both", "--output_dir", tmp_path, "--title", "cats")
    assert code == 0 and "Exported sd15 adapter" in out
    for name in (DIFFUSERS_WEIGHT_NAME, KOHYA_WEIGHT_NAME):
        ours, saved = load_file(tmp_path / name), load_file(adapter_dir / name)
        assert ours.keys() == saved.keys()
        for key in ours:
            torch.testing.assert_close(ours[key], saved[key], rtol=0, atol=0)
    with safe_open(str(tmp_path / KOHYA_WEIGHT_NAME), "pt") as f:
        assert f.metadata()["modelspec.title"] == "cats"
    assert not (tmp_path / NATIVE_WEIGHT_NAME).exists()


def test_export_layout_writes_each_layout_asked_for(capsys, adapter_dir, tmp_path):
    code, out, _ = run_cli(
        capsys, "export", adapter_dir, "--layout", "onetrainer", "--layout", "kohya", "--output_dir", tmp_path
    )
    assert code == 0 and "onetrainer: " in out
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([ONETRAINER_WEIGHT_NAME, KOHYA_WEIGHT_NAME])
    # SD 1.5 has no lora_transformer_: OneTrainer's layout is the kohya one.
    onetrainer, kohya = load_file(tmp_path / ONETRAINER_WEIGHT_NAME), load_file(tmp_path / KOHYA_WEIGHT_NAME)
    assert onetrainer.keys() == kohya.keys() and all(torch.equal(onetrainer[k], kohya[k]) for k in kohya)
    code, _, err = run_cli(
        capsys, "export", adapter_dir, "--layout", "kohya", "--to", "kohya", "--output_dir", tmp_path / "x"
    )
    assert_one_line_error(code, err, "give --layout or --to, not both")


def test_export_refuses_to_overwrite_and_to_read_folded_files(capsys, adapter_dir, tmp_path):
    assert run_cli(capsys, "export", adapter_dir, "--to", "kohya", "--output_dir", tmp_path)[0] == 0
    code, _, err = run_cli(capsys, "export", adapter_dir, "--to", "kohya", "--output_dir", tmp_path)
    assert_one_line_error(code, err, str(tmp_path / KOHYA_WEIGHT_NAME), "--overwrite")
    assert run_cli(capsys, "export", adapter_dir, "--to", "kohya", "--output_dir", tmp_path, "--overwrite")[0] == 0
    code, _, err = run_cli(capsys, "export", adapter_dir / KOHYA_WEIGHT_NAME, "--output_dir", tmp_path / "x")
    assert_one_line_error(code, err, "is a kohya file")


# ------------------------------------------------------------------------------------------------
# resize


def test_resize_to_full_rank_is_lossless(capsys, adapter_dir, tmp_path):
    # The text encoder has rank 2, so resize to 2 is full rank there and a real cut for the unet (rank 4).
    code, out, _ = run_cli(capsys, "resize", adapter_dir, "--rank", 4, "--output_dir", tmp_path / "r4", "--json")
    assert code == 2  # rank 4 > the text encoder's rank 2: resizing only shrinks
    code, out, _ = run_cli(capsys, "resize", adapter_dir, "--rank", 2, "--output_dir", tmp_path / "r2", "--json")
    assert code == 0
    report = json.loads(out)
    assert set(report["files"]) == {"native", "diffusers", "kohya"}
    before, after = _deltas(adapter_dir / NATIVE_WEIGHT_NAME), _deltas(tmp_path / "r2" / NATIVE_WEIGHT_NAME)
    for name, energy in report["energy"].items():
        if name.startswith("text_encoder."):
            assert energy == pytest.approx(1.0)
            torch.testing.assert_close(after[name], before[name], atol=1e-5, rtol=1e-5)
        else:
            assert 0.0 < energy < 1.0
    resized = read_adapter_file(tmp_path / "r2" / KOHYA_WEIGHT_NAME)
    assert {layer.rank for _, _, layer in resized.layer_items()} == {2}


def test_resize_prints_energy_per_layer(capsys, adapter_dir, tmp_path):
    code, out, _ = run_cli(capsys, "resize", adapter_dir, "--rank", 1, "--output_dir", tmp_path)
    assert code == 0
    assert re.search(rf"^unet\.{re.escape(Q)} +retained energy 0\.\d+$", out, re.MULTILINE)
    assert "Resized to rank 1: 40 layers" in out


# ------------------------------------------------------------------------------------------------
# Bad files: one line, exit 2


def _write_native_variant(adapter_dir: Path, tmp_path: Path, name: str, change) -> Path:
    tensors = load_file(adapter_dir / NATIVE_WEIGHT_NAME)
    with safe_open(str(adapter_dir / NATIVE_WEIGHT_NAME), "pt") as f:
        metadata = f.metadata()
    change(tensors)
    path = tmp_path / name
    save_file(tensors, str(path), metadata=metadata)
    return path


def test_bad_files_give_one_line_and_exit_2(capsys, adapter_dir, tmp_path):
    pickle_file = tmp_path / "adapter.bin"
    pickle_file.write_bytes(b"\x80\x04K\x01.")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 100)
    good = (adapter_dir / NATIVE_WEIGHT_NAME).read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good[: len(good) - 1000])
    nan_key, mixer_key = f"unet.{Q}.lora_B.weight", f"unet.{Q}.lora_mixer.weight"
    nan = _write_native_variant(adapter_dir, tmp_path, "nan.safetensors", lambda t: t[nan_key].fill_(float("nan")))
    rank = _write_native_variant(
        adapter_dir, tmp_path, "rank.safetensors", lambda t: t.__setitem__(mixer_key, torch.eye(5))
    )
    cases = [
        (pickle_file, "only .safetensors files are accepted"),
        (garbage, "not a valid safetensors file"),
        (truncated, ""),
        (nan, f"'{nan_key}' holds NaN"),
        (rank, f"'{mixer_key}' has shape (5, 5)"),
    ]
    for path, fragment in cases:
        code, _, err = run_cli(capsys, "inspect", path)
        assert_one_line_error(code, err, str(path), fragment)


def test_files_that_do_not_fit_the_pipeline_give_one_line(capsys, adapter_dir, pipelines, tmp_path):
    code, _, err = run_cli(capsys, "inspect", adapter_dir, "--pretrained_model_name_or_path", pipelines["sdxl"])
    assert_one_line_error(code, err, str(adapter_dir / NATIVE_WEIGHT_NAME), "made for sd15, but the pipeline is sdxl")
    key = f"unet.{Q}.lora_A.weight"
    tensors, _ = diffusers_state_dict(read_adapter_file(adapter_dir))  # PEFT keys, as diffusers writes them
    tensors[key] = torch.zeros(4, 40)
    path = tmp_path / "wide.safetensors"
    save_file(tensors, str(path))
    code, _, err = run_cli(capsys, "inspect", path, "--pretrained_model_name_or_path", pipelines["sd15"])
    assert_one_line_error(code, err, str(path), f"'{key}' has A (4, 40)", "does not fit")


@pytest.mark.filterwarnings("ignore:'moslora_diffusion.cli' found in sys.modules:RuntimeWarning")
def test_module_entry_points(capsys, tmp_path, monkeypatch):
    bad = tmp_path / "adapter.ckpt"
    bad.write_bytes(b"")
    monkeypatch.setattr(sys, "argv", ["moslora", "inspect", str(bad)])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("moslora_diffusion.cli", run_name="__main__")
    assert exit_info.value.code == 2
    assert_one_line_error(2, capsys.readouterr().err, str(bad))
    result = subprocess.run(
        [sys.executable, "-m", "moslora_diffusion", "inspect", str(bad)], capture_output=True, text=True, timeout=300
    )
    assert_one_line_error(result.returncode, result.stderr, str(bad))


# ------------------------------------------------------------------------------------------------
# Defaults and flags as the README shows them


def test_resize_without_output_dir_writes_beside_the_adapter_and_never_over_it(capsys, adapter_dir, tmp_path):
    source = tmp_path / "sks"
    source.mkdir()
    (source / NATIVE_WEIGHT_NAME).write_bytes((adapter_dir / NATIVE_WEIGHT_NAME).read_bytes())
    before = (source / NATIVE_WEIGHT_NAME).read_bytes()
    code, out, _ = run_cli(capsys, "resize", source, "--rank", 1)
    assert code == 0, out
    output = tmp_path / "sks-rank1"
    assert sorted(p.name for p in output.iterdir()) == sorted(WEIGHT_NAMES.values())
    assert str(output / NATIVE_WEIGHT_NAME) in out
    # The same default from the file itself; an existing output needs --overwrite; the input is never the output.
    code, _, err = run_cli(capsys, "resize", source / NATIVE_WEIGHT_NAME, "--rank", 1)
    assert_one_line_error(code, err, "already exists", "--overwrite")
    assert run_cli(capsys, "resize", source / NATIVE_WEIGHT_NAME, "--rank", 1, "--overwrite")[0] == 0
    code, _, err = run_cli(capsys, "resize", source, "--rank", 1, "--output_dir", source, "--overwrite")
    assert_one_line_error(code, err, "the adapter's own folder")
    assert sorted(p.name for p in source.iterdir()) == [NATIVE_WEIGHT_NAME]
    assert (source / NATIVE_WEIGHT_NAME).read_bytes() == before


@pytest.mark.parametrize(
    "argv, hint",
    [
        (["inspect", "ADAPTER", "--jso"], "--json"),
        (["resize", "ADAPTER", "--ran", "1"], "--rank"),
        (["export", "ADAPTER", "--overwrit"], "--overwrite"),
        (["merge", "--bas", "x", "--adapter", "y", "--output", "z"], "--base"),
    ],
)
def test_abbreviated_flags_are_refused_with_a_did_you_mean(capsys, adapter_dir, argv, hint):
    argv = [str(adapter_dir) if a == "ADAPTER" else a for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"({argv[2] if argv[0] != 'merge' else '--bas'}: did you mean {hint}?)" in err


def test_no_subcommand_parser_matches_prefixes():
    from moslora_diffusion.cli import build_parser

    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert not parser.allow_abbrev
    assert all(not sub.allow_abbrev for sub in subparsers.choices.values())


# ------------------------------------------------------------------------------------------------
# Training checkpoints


def test_a_training_checkpoint_reads_as_its_native_adapter(capsys, adapter_dir, checkpoint_dir):
    native = _deltas(adapter_dir)
    for path in (checkpoint_dir, checkpoint_dir / "adapter_unet.safetensors"):
        state = read_adapter_file(path)
        assert state.source_format == "checkpoint" and state.family == "sd15" and state.base_model == "tiny/sd15"
        deltas = {f"{c}.{p}": layer.delta_weight() for c, p, layer in state.layer_items()}
        # CLIP's modules get their checkpoint names (text_model. root), as in the native file.
        assert deltas.keys() == (native.keys() if path.is_dir() else {k for k in native if k.startswith("unet.")})
        for key, delta in deltas.items():
            torch.testing.assert_close(delta, native[key], rtol=0, atol=0)
    code, out, _ = run_cli(capsys, "inspect", checkpoint_dir, "--json")
    assert code == 0
    report = json.loads(out)
    assert report["format"] == "checkpoint" and set(report["components"]) == {"unet", "text_encoder"}
    assert report["components"]["text_encoder"]["mixer"] == "orthogonal"


def test_export_resize_and_merge_read_a_training_checkpoint(capsys, adapter_dir, checkpoint_dir, tmp_path):
    from moslora_diffusion.merge import merge_adapters

    native = _deltas(adapter_dir)
    assert run_cli(capsys, "export", checkpoint_dir, "--output_dir", tmp_path / "exported")[0] == 0
    for name in (DIFFUSERS_WEIGHT_NAME, KOHYA_WEIGHT_NAME):
        assert (tmp_path / "exported" / name).is_file()
    exported = _deltas(tmp_path / "exported" / DIFFUSERS_WEIGHT_NAME)  # SD 1.5: kohya stems, dots lost
    native = {key.replace(".", "_"): delta for key, delta in native.items()}
    assert {key.replace(".", "_") for key in exported} == native.keys()
    for key, delta in exported.items():
        torch.testing.assert_close(delta, native[key.replace(".", "_")], rtol=1e-5, atol=1e-7)
    code, out, _ = run_cli(capsys, "resize", checkpoint_dir, "--rank", 1)
    assert code == 0 and (checkpoint_dir.parent / "checkpoint-2-rank1" / NATIVE_WEIGHT_NAME).is_file(), out
    from_checkpoint = merge_adapters(make_tiny_pipeline("sd15"), [checkpoint_dir])
    from_native = merge_adapters(make_tiny_pipeline("sd15"), [adapter_dir])
    for key, value in from_native.unet.state_dict().items():
        assert torch.equal(from_checkpoint.unet.state_dict()[key], value), key


def test_an_old_checkpoint_says_which_files_to_use(capsys, adapter_pipe, tmp_path):
    old = write_training_checkpoint(adapter_pipe, tmp_path / "run" / "checkpoint-600", with_config=False)
    for command in (["inspect", old], ["export", old], ["resize", old, "--rank", 1]):
        code, _, err = run_cli(capsys, *command)
        assert_one_line_error(code, err, "training checkpoint", str(tmp_path / "run" / NATIVE_WEIGHT_NAME))


# ------------------------------------------------------------------------------------------------
# Metadata describes the file as it is


def test_inspect_after_resize_reports_the_identity_mixer(capsys, adapter_dir, tmp_path):
    code, out, _ = run_cli(capsys, "inspect", adapter_dir, "--json")
    assert json.loads(out)["components"]["unet"]["mixer"] == "kaiming"
    assert run_cli(capsys, "resize", adapter_dir, "--rank", 1, "--output_dir", tmp_path / "r1")[0] == 0
    code, out, _ = run_cli(capsys, "inspect", tmp_path / "r1", "--json")
    report = json.loads(out)
    assert {info["mixer"] for info in report["components"].values()} == {"identity"}
    assert all(stats["distance_from_identity"] == 0 for stats in report["layers"].values())
    code, out, _ = run_cli(capsys, "inspect", tmp_path / "r1")
    assert "mixer identity" in out and "kaiming" not in out and "orthogonal" not in out
