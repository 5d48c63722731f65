"""Every ``moslora`` command the README and docs/ show runs as written (placeholders filled in).

Commands are taken from code blocks and from table cells (inline code starting with ``moslora``); a span
that is only ``moslora <subcommand>`` names the command and is not run. ``train`` commands are parsed by
the trainer's real parser (flags and --config files checked; no training); inspect, export, resize and
merge run end to end on tiny adapters and tiny bases, in a fresh folder per command. A synopsis runs twice:
with every ``[optional]`` part left out, and with all of them in; ``a|b`` takes its first alternative.
"""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import pytest
import torch

from moslora_diffusion import MoSLoRAConfig, add_moslora
from moslora_diffusion.cli import main
from moslora_diffusion.formats import DIFFUSERS_WEIGHT_NAME, NATIVE_WEIGHT_NAME
from moslora_diffusion.loaders import save_moslora_weights
from moslora_diffusion.testing import make_tiny_pipeline, save_tiny_pipeline

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SUBCOMMANDS = ("train", "export", "inspect", "resize", "merge")
# Placeholder -> what the fresh folder of each command holds under that name (see ``workspace``).
PLACEHOLDERS = {
    "BASE_DIR": "my-sd15",
    "PIPELINE_DIR": "my-sd15",
    "ADAPTER_DIR": "sks-dog",
    "FILE_OR_DIR": "sks-dog",
    "PATH": "sks-dog",
    "WEIGHT": "0.8",
    "OUT_DIR": "out-dir",
    "OUT.safetensors": "out.safetensors",
    "K": "2",
    "T": "title",
}
SKIPPED = {
    "moslora train ...": "a placeholder for the trainer's flags, documented in docs/training.md",
    # Starts from the README main job's output; tests/test_train_init_lora.py trains --train_mixer_only itself.
    "moslora train --config samples/dreambooth_tiny.toml --init_lora moslora-dreambooth-model --train_mixer_only "
    "--output_dir mixer-run": "needs the main job's moslora-dreambooth-model folder",
}


def documented_commands() -> list[tuple[str, str]]:
    """(where, command) for every moslora command shown in a code block or a table cell."""
    found = []
    for doc in DOCS:
        in_fence = False
        for number, line in enumerate(doc.read_text().splitlines(), 1):
            if line.lstrip().startswith("```"):
                in_fence = not in_fence
                continue
            where = f"{doc.relative_to(REPO)}:{number}"
            if in_fence or line.startswith("    "):
                for part in line.split("&&"):
                    part = part.strip()
                    if part.startswith("moslora ") and part.split()[1] in SUBCOMMANDS:
                        found.append((where, part))
            elif line.startswith("|"):
                for span in re.findall(r"`(moslora [^`]+)`", line):
                    if len(span.split()) > 2 and span.split()[1] in SUBCOMMANDS:
                        found.append((where, span))
    return found


def runnable_forms(command: str) -> list[list[str]]:
    """argv lists (without "moslora") for a command or synopsis: optional parts left out, then all in."""
    forms = []
    for text in (re.sub(r"\s*\[[^\]]*\]", "", command), command.replace("[", "").replace("]", "")):
        text = text.replace(" ...", "")
        argv = []
        for token in shlex.split(text)[1:]:
            if "|" in token and not token.startswith("-"):
                token = token.split("|")[0]
            head, sep, tail = token.partition(":")  # PATH:WEIGHT
            if sep:
                argv.append(f"{PLACEHOLDERS.get(head, head)}:{PLACEHOLDERS.get(tail, tail)}")
            else:
                argv.append(PLACEHOLDERS.get(token, token))
        if argv not in forms:
            forms.append(argv)
    return forms


COMMANDS = documented_commands()


def test_the_docs_show_commands_of_every_kind():
    shown = {command.split()[1] for _, command in COMMANDS}
    assert shown == set(SUBCOMMANDS), shown
    assert any("resize" in c and "--output_dir" not in c for _, c in COMMANDS)  # the README's short form


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory) -> dict[str, Path]:
    """Tiny bases (sd15, sdxl) and a native MoSLoRA adapter for each."""
    root = tmp_path_factory.mktemp("docs")
    paths = {}
    for family in ("sd15", "sdxl"):
        paths[f"my-{family}"] = save_tiny_pipeline(family, root / f"my-{family}")
        pipe = make_tiny_pipeline(family)
        add_moslora(pipe.unet, MoSLoRAConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_v"]))
        with torch.no_grad():
            for name, param in pipe.unet.named_parameters():
                if ".lora_B." in name:
                    param.normal_(0, 0.05)
        save_moslora_weights(pipe, root / f"adapter-{family}", base_model=f"tiny/{family}")
        paths[f"adapter-{family}"] = root / f"adapter-{family}"
    return paths


def workspace(fixtures: dict[str, Path], folder: Path, argv: list[str]) -> None:
    """The names a command refers to, in ``folder``: bases, and adapters made for the command's base."""
    family = "sdxl" if any("sdxl" in a for a in argv) else "sd15"
    for name in ("my-sd15", "my-sdxl"):
        (folder / name).symlink_to(fixtures[name], target_is_directory=True)
    (folder / "sks-dog").mkdir()  # a native adapter as shared alone (export writes the folded files beside it)
    shutil.copy(fixtures[f"adapter-{family}"] / NATIVE_WEIGHT_NAME, folder / "sks-dog")
    shutil.copy(fixtures[f"adapter-{family}"] / DIFFUSERS_WEIGHT_NAME, folder / "style.safetensors")


@pytest.mark.parametrize("where, command", COMMANDS, ids=[f"{w} {c}" for w, c in COMMANDS])
def test_documented_command_runs_as_written(where, command, fixtures, tmp_path, monkeypatch, capsys):
    if command in SKIPPED:
        pytest.skip(SKIPPED[command])
    for i, argv in enumerate(runnable_forms(command)):
        if argv[0] == "train":
            # The real parser, --config files resolved from the repository root; no training.
            from moslora_diffusion.training.run_inputs import parse_run

            monkeypatch.chdir(REPO)
            try:
                parse_run(argv[1:], prog="moslora train")
            except SystemExit as exit_info:
                assert exit_info.code == 0, f"{where}: {command!r} -> {capsys.readouterr().err}"
            continue
        folder = tmp_path / f"form{i}"
        folder.mkdir()
        workspace(fixtures, folder, argv)
        monkeypatch.chdir(folder)
        try:
            code = main(argv)
        except SystemExit as exit_info:
            code = exit_info.code
        assert code == 0, f"{where}: moslora {shlex.join(argv)} -> {capsys.readouterr().err}"
