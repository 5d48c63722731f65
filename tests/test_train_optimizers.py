"""Optimizers, learning rates by role (LoRA+, --mixer_lr), EMA and --compile: each resumes bit for bit, each
flag reaches the optimizer, and what the files hold is what the flags say."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from train_support import native_adapter, run_main, tiny_run_argv, train

from moslora_diffusion.config import MoSLoRAConfig
from moslora_diffusion.families import get_family
from moslora_diffusion.fileio import load_safetensors
from moslora_diffusion.testing import make_tiny_pipeline
from moslora_diffusion.training.adapters import adapter_param_groups, add_adapters
from moslora_diffusion.training.config import UsageError
from moslora_diffusion.training.ema import EMA_FILE
from moslora_diffusion.training.optimizers import parse_optimizer_args
from moslora_diffusion.training.run_inputs import parse_run

pytestmark = pytest.mark.usefixtures("one_thread")

# optimizer -> the package it needs (None: torch or transformers, always here)
OPTIMIZERS = {
    "adamw": None,
    "adamw8bit": "bitsandbytes",
    "prodigy": "prodigyopt",
    "adafactor": None,
    "adamw_schedulefree": "schedulefree",
}
# Dropout, flips and accumulation over an epoch boundary, as tests/test_train_resume.py.
RESUME_FLAGS = [
    "--lora_dropout",
    "0.1",
    "--random_flip",
    "--gradient_accumulation_steps",
    "2",
    "--num_validation_images",
    "0",
]
LR_BY_ROLE = ["--loraplus_lr_ratio", "4", "--mixer_lr", "2e-2"]  # every role's group with its own LR


def _optimizer_param(name: str, *marks):
    package = OPTIMIZERS[name]
    missing = package is not None and importlib.util.find_spec(package) is None
    return pytest.param(name, marks=[pytest.mark.skipif(missing, reason=f"{package} is not installed"), *marks])


def _assert_bit_identical(expected: dict, found: dict) -> None:
    assert expected.keys() == found.keys()
    assert any(t.abs().max() > 0 for k, t in expected.items() if "lora_B" in k), "nothing was trained"
    different = [k for k in expected if not torch.equal(expected[k], found[k])]
    assert not different, f"{len(different)} tensors differ, first {different[0]}"


@pytest.mark.parametrize("optimizer", [_optimizer_param(name) for name in OPTIMIZERS] + ["adamw+ema"])
def test_each_optimizer_resumes_bit_for_bit(tmp_path, optimizer):
    name, _, ema = optimizer.partition("+")
    flags = [*RESUME_FLAGS, "--optimizer", name, *(["--use_ema", "--ema_decay", "0.5"] if ema else [])]
    # Prodigy takes one LR for every group (its peers' 1.0): no LoRA+ nor mixer LR.
    flags += ["--learning_rate", "1.0"] if name == "prodigy" else LR_BY_ROLE
    whole = train("sd15", tmp_path / "whole", *flags, "--max_train_steps", "4", "--checkpointing_steps", "10")
    # The interrupted run also validates every step: schedule-free AdamW then evaluates its average x and must put
    # its training weights back bit for bit (at step 1, x = y: the check needs step 2).
    split = train(
        "sd15",
        tmp_path / "split",
        *flags,
        "--max_train_steps",
        "3",
        "--checkpointing_steps",
        "3",
        "--num_validation_images",
        "1",
        "--validation_steps",
        "1",
    )
    if ema:
        assert (split / "checkpoint-3" / EMA_FILE).is_file()
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
    _assert_bit_identical(native_adapter(whole), native_adapter(split))


def test_parameter_groups_by_role_carry_loraplus_and_mixer_learning_rates():
    family = get_family("sd15")
    components = make_tiny_pipeline("sd15").components
    config = MoSLoRAConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_v"])
    text_config = MoSLoRAConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    trained = add_adapters(components, family, config, text_config)
    groups = adapter_param_groups(
        trained,
        family,
        learning_rate=1e-3,
        text_encoder_lr=1e-5,
        weight_decay=0.1,
        text_encoder_weight_decay=0.2,
        loraplus_lr_ratio=16,
        mixer_lr=5e-3,
    )
    lrs = {group["name"]: (group["lr"], group["weight_decay"]) for group in groups}
    assert lrs == pytest.approx({
        "unet.A": (1e-3, 0.1), "unet.B": (16e-3, 0.1), "unet.M": (5e-3, 0.1),
        "text_encoder.A": (1e-5, 0.2), "text_encoder.B": (16e-5, 0.2), "text_encoder.M": (5e-5, 0.2),  # same ratios
    })  # fmt: skip
    for group in groups:  # each role holds its own kind of weight, and every trainable weight is in one group
        part = {"A": "lora_A", "B": "lora_B", "M": "lora_mixer"}[group["name"].split(".")[1]]
        names = {id(p): n for model in trained.values() for n, p in model.named_parameters()}
        assert all(f".{part}." in names[id(p)] for p in group["params"]), group["name"]
    grouped = sorted(id(p) for group in groups for p in group["params"])
    trainable = sorted(id(p) for model in trained.values() for p in model.parameters() if p.requires_grad)
    assert grouped == trainable


def test_mixer_lr_zero_keeps_the_mixer_at_its_initial_value_and_out_of_the_optimizer(tmp_path):
    flags = ["--num_validation_images", "0", "--max_train_steps", "3", "--loraplus_lr_ratio", "16"]
    trained = train("sd15", tmp_path / "trained", *flags, "--mixer_lr", "0")
    untouched = train("sd15", tmp_path / "untouched", *flags, "--learning_rate", "0")  # every weight at its init
    trained_adapter, initial = native_adapter(trained), native_adapter(untouched)
    mixers = [k for k in initial if "lora_mixer" in k]
    assert mixers and all(torch.equal(trained_adapter[k], initial[k]) for k in mixers)
    assert any(not torch.equal(trained_adapter[k], initial[k]) for k in initial if "lora_B" in k), "B did not train"
    # The recipe's optimizer (in the checkpoint): A at the LR, B at 16x, and no group for M at all.
    state = torch.load(trained / "checkpoint-3" / "optimizer.bin", weights_only=True)
    assert {g["name"]: g["lr"] for g in state["param_groups"]} == pytest.approx({"unet.A": 1e-2, "unet.B": 16e-2})


def test_ema_weights_are_the_exported_adapter(tmp_path):
    out = train(
        "sd15",
        tmp_path / "out",
        "--num_validation_images",
        "0",
        "--max_train_steps",
        "3",
        "--use_ema",
        "--ema_decay",
        "0.9",
    )
    ema, metadata = load_safetensors(out / "checkpoint-3" / EMA_FILE)  # saved at the last step, before the export
    live, _ = load_safetensors(out / "checkpoint-3" / "adapter_unet.safetensors")
    exported = native_adapter(out)
    assert metadata["moslora.ema_optimization_step"] == "3"
    as_native = {k.replace(".default.", "."): t for k, t in ema.items()}  # unet.<module>.lora_B.default.weight
    assert as_native.keys() == {k for k in exported if "lora_" in k}
    assert all(torch.equal(exported[k], t) for k, t in as_native.items())
    assert any(not torch.equal(ema[f"unet.{k}"], t) for k, t in live.items() if "lora_B" in k), (
        "EMA equals the live weights"
    )
    assert "EMA (decay 0.9)" in (out / "README.md").read_text()


def test_ema_added_when_resuming_starts_from_the_checkpoints_weights(tmp_path, caplog):
    flags = ["--num_validation_images", "0", "--checkpointing_steps", "2"]
    out = train("sd15", tmp_path / "out", *flags)
    train("sd15", out, *flags, "--max_train_steps", "3", "--use_ema", "--resume_from_checkpoint", "latest")
    assert "was saved without --use_ema: the EMA starts from its weights" in caplog.text
    # A fresh average's first step takes the weights as they are (d_1 = 0): the export is step 3's live weights
    # (up to rounding: EMAModel computes s - 1 * (s - w)).
    live, _ = load_safetensors(out / "checkpoint-3" / "adapter_unet.safetensors")
    exported = native_adapter(out)
    for key, tensor in live.items():
        torch.testing.assert_close(exported[f"unet.{key.replace('.default.', '.')}"], tensor, rtol=1e-6, atol=1e-7)
    assert (out / "checkpoint-3" / EMA_FILE).is_file()


def test_compile_trains_and_writes_the_same_adapter_keys(tmp_path):
    """--compile's wiring with dynamo's "eager" backend (the graph capture, no code generation): inductor compiles
    for 12-65 s on this CPU, too slow for the suite. The captured graph runs the same kernels: same weights."""
    flags = ["--num_validation_images", "0", "--center_crop", "--checkpointing_steps", "1"]
    eager = native_adapter(train("sd15", tmp_path / "eager", *flags))
    compiled_dir = train("sd15", tmp_path / "compiled", *flags, "--compile", "--compile_backend", "eager")
    compiled = native_adapter(compiled_dir)
    assert compiled.keys() == eager.keys()
    checkpoint, _ = load_safetensors(compiled_dir / "checkpoint-2" / "adapter_unet.safetensors")
    assert not any("_orig_mod" in k for k in checkpoint)
    for key in eager:
        torch.testing.assert_close(compiled[key], eager[key], rtol=0, atol=1e-6, msg=key)


# ---------------------------------------------------------------------------------------------- flags


def test_optimizer_flags_resolve_with_the_peers_defaults(tmp_path, caplog):
    def config(*extra):
        return parse_run(tiny_run_argv("sd15", tmp_path / "out", *extra))[0]

    base = tiny_run_argv("sd15", tmp_path / "out")
    default = parse_run([a for a in base if a not in ("--learning_rate", "1e-2")])[0]
    assert (default.optimizer, default.learning_rate, default.text_encoder_lr) == ("adamw", 1e-4, 5e-6)
    if importlib.util.find_spec("prodigyopt"):
        prodigy = parse_run([a for a in base if a not in ("--learning_rate", "1e-2")] + ["--optimizer", "prodigy"])[0]
        assert (prodigy.learning_rate, prodigy.text_encoder_lr) == (1.0, 1.0)
        assert "expects --learning_rate near 1.0" not in caplog.text
        config("--optimizer", "prodigy")  # the run's 1e-2
        assert "--optimizer prodigy estimates the step size itself and expects --learning_rate near 1.0" in caplog.text
    collected = config("--optimizer_args", "eps=1e-6", "amsgrad=True", "--optimizer_args", "maximize=False")
    assert collected.optimizer_args == ("eps=1e-6", "amsgrad=True", "maximize=False")  # each use adds its values
    assert parse_optimizer_args(["d_coef=2", "betas=0.9,0.99", "name=foo", "flag=True"]) == {
        "d_coef": 2, "betas": (0.9, 0.99), "name": "foo", "flag": True}  # fmt: skip


@pytest.mark.parametrize(
    "flags,expected",
    [
        (["--optimizer_args", "foo"], "--optimizer_args: expected key=value, got 'foo'"),
        (["--optimizer_args", "foo=1"], "--optimizer_args: adamw takes no 'foo' (it takes: betas, eps"),
        (["--optimizer_args", "weight_decay=0.1"], "set per parameter group by --adam_weight_decay"),
        (["--optimizer", "adafactor", "--optimizer_args", "betas=0.9,0.99"], "adafactor takes no 'betas'"),
        (["--optimizer", "prodigy", "--use_8bit_adam"], "--use_8bit_adam means --optimizer adamw8bit"),
        (["--optimizer", "adamw_schedulefree", "--lr_scheduler", "cosine"], "replaces the LR schedule"),
        (["--optimizer", "adamw_schedulefree", "--use_ema"], "already averages the weights"),
        (["--ema_decay", "1.5"], "--ema_decay must be in (0, 1]"),
        (["--optimizer", "prodigy", "--loraplus_lr_ratio", "16"], "prodigy takes one learning rate for every group"),
        (["--optimizer", "prodigy", "--train_text_encoder", "--text_encoder_lr", "0.5"], "--text_encoder_lr gives 0.5"),
        (["--mixer_lr", "-1"], "--mixer_lr cannot be negative"),
    ],
)
def test_bad_optimizer_flags_are_one_line(tmp_path, flags, expected):
    with pytest.raises(UsageError) as err:
        parse_run(tiny_run_argv("sd15", tmp_path / "out", *flags))
    assert expected in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("optimizer", ["prodigy", "adamw_schedulefree", "adamw8bit"])
def test_a_missing_optimizer_package_is_one_line_with_the_pip_command(tmp_path, capsys, monkeypatch, optimizer):
    from moslora_diffusion.training import optimizers

    real = importlib.util.find_spec
    package = OPTIMIZERS[optimizer]
    monkeypatch.setattr(
        optimizers.importlib.util, "find_spec", lambda name, *a: None if name == package else real(name, *a)
    )
    out = tmp_path / "out"
    assert run_main(tiny_run_argv("sd15", out, "--optimizer", optimizer)) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert lines == [
        f"train_dreambooth_moslora.py: error: --optimizer {optimizer} needs {package}: pip install {package} "
        f"(or pip install 'moslora-diffusion[{'bnb' if package == 'bitsandbytes' else 'optimizers'}]')"
    ]
    assert not out.exists()
