"""A real full disk: a tmpfs of a few hundred KB mounted over the output folder (root only).

test_reliability_*.py simulate ENOSPC by patching the writers; here the kernel refuses the bytes, so
every writer (safetensors, torch.save inside accelerate, json, PNG) meets the real error. Each case
checks what a user relies on: one line and a non-zero exit, nothing half-written left behind, what was
there before intact, and (for training) a resume that finishes once there is room again.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
from train_support import REPO, run_main, tiny_run_argv

from moslora_diffusion.fileio import load_safetensors

PAGE = 4096
PROG = "train_dreambooth_moslora.py"


def _can_mount() -> str | None:
    """None when a tmpfs can be mounted here, else the reason to skip."""
    if os.name != "posix" or os.geteuid() != 0:
        return "mounting a tmpfs needs root"
    probe = Path(f"/tmp/moslora-tmpfs-probe-{os.getpid()}")
    probe.mkdir(exist_ok=True)
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe)], capture_output=True, text=True
        )
        if done.returncode != 0:
            return f"mount -t tmpfs failed: {done.stderr.strip() or done.returncode}"
        subprocess.run(["umount", str(probe)], check=True)
        return None
    except FileNotFoundError:
        return "no mount command"
    finally:
        probe.rmdir()


_SKIP = _can_mount()
pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(_SKIP is not None, reason=f"no real full disk: {_SKIP}"),
]


def _pages(n: int) -> int:
    return -(-n // PAGE) * PAGE


def _tree_bytes(path: Path) -> int:
    """What ``path`` takes on a tmpfs: every file rounded up to whole pages."""
    return sum(_pages(p.stat().st_size) for p in path.rglob("*") if p.is_file())


@contextmanager
def small_disk(mountpoint: Path, size: int):
    """A tmpfs of ``size`` bytes (whole pages) at ``mountpoint``; grow it with ``remount(mountpoint, n)``."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={_pages(size)}", "tmpfs", str(mountpoint)], check=True)
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)


def remount(mountpoint: Path, size: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={_pages(size)}", str(mountpoint)], check=True)


def error_line(err: str) -> str:
    assert "Traceback" not in err, err[-3000:]
    return err.strip().splitlines()[-1]


def _leftovers(folder: Path) -> list[str]:
    """Temporary files and folders a writer left (every writer writes to a temporary name first)."""
    return sorted(
        str(p.relative_to(folder)) for p in folder.rglob("*") if ".tmp" in p.name or p.name.startswith(".moslora-")
    )


def _train_argv(out: Path, *extra: str) -> list[str]:
    return tiny_run_argv("sd15", out, "--num_validation_images", "0", *extra)


@pytest.fixture(scope="module")
def reference_sizes(tmp_path_factory) -> dict[str, int]:
    """Sizes on disk of one checkpoint and of the three adapter files of a tiny run (on a roomy disk)."""
    out = tmp_path_factory.mktemp("roomy") / "out"
    assert run_main(_train_argv(out, "--max_train_steps", "1", "--checkpointing_steps", "1")) == 0
    adapters = [p for p in out.iterdir() if p.suffix == ".safetensors"]
    assert len(adapters) == 3
    return {
        "checkpoint": _tree_bytes(out / "checkpoint-1"),
        "adapters": sum(_pages(p.stat().st_size) for p in adapters),
        "other": _tree_bytes(out) - _tree_bytes(out / "checkpoint-1") - sum(_pages(p.stat().st_size) for p in adapters),
    }


def test_a_real_full_disk_at_the_second_checkpoint_keeps_the_first_and_resumes(tmp_path, reference_sizes, capsys):
    # Room for one checkpoint and the small files beside it, not for two.
    size = reference_sizes["checkpoint"] * 3 // 2 + reference_sizes["other"] + 8 * PAGE
    with small_disk(tmp_path / "disk", size) as disk:
        out = disk / "out"
        assert run_main(_train_argv(out, "--max_train_steps", "3", "--checkpointing_steps", "1")) == 1
        line = error_line(capsys.readouterr().err)
        assert line.startswith(f"{PROG}: error: could not write checkpoint-2 in '{out}' ("), line
        assert f"(latest: {out / 'checkpoint-1'})" in line and "--resume_from_checkpoint latest" in line
        assert not _leftovers(out), "a half-written checkpoint was left"
        assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-")) == ["checkpoint-1"]
        assert load_safetensors(out / "checkpoint-1" / "adapter_unet.safetensors")[0]
        assert not any(p.suffix == ".safetensors" for p in out.iterdir()), "adapter files written by a failed run"
        assert not any(p.name.endswith(".lock") for p in out.iterdir()), "the output-folder lock was not released"

        remount(disk, size + 4 * reference_sizes["checkpoint"] + reference_sizes["adapters"])
        argv = _train_argv(
            out, "--max_train_steps", "3", "--checkpointing_steps", "1", "--resume_from_checkpoint", "latest"
        )
        assert run_main(argv) == 0
        assert (out / "moslora_weights.safetensors").is_file() and (out / "checkpoint-3").is_dir()


def test_a_real_full_disk_at_the_final_save_leaves_no_adapter_file_and_keeps_the_checkpoint(
    tmp_path, reference_sizes, capsys
):
    # Room for the checkpoint of the last step and the small files, not for the three adapter files too.
    size = reference_sizes["checkpoint"] + reference_sizes["other"] + reference_sizes["adapters"] // 3 + 4 * PAGE
    with small_disk(tmp_path / "disk", size) as disk:
        out = disk / "out"
        assert run_main(_train_argv(out, "--max_train_steps", "1", "--checkpointing_steps", "1")) == 1
        line = error_line(capsys.readouterr().err)
        assert line.startswith(f"{PROG}: error: could not write ") and "No space left on device" in line, line
        assert not _leftovers(out)
        assert (out / "checkpoint-1").is_dir() and load_safetensors(out / "checkpoint-1" / "adapter_unet.safetensors")[
            0
        ]


@pytest.fixture(scope="module")
def trained_adapter(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("adapter") / "out"
    assert run_main(_train_argv(out, "--checkpointing_steps", "1000")) == 0
    return out


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, "-m", "moslora_diffusion", *args], capture_output=True, text=True, env=env, cwd=REPO
    )


def test_export_onto_a_real_full_disk_is_one_line_and_leaves_nothing(tmp_path, trained_adapter):
    with small_disk(tmp_path / "disk", 2 * PAGE) as disk:
        out = disk / "exported"
        done = _cli("export", str(trained_adapter), "--to", "both", "--output_dir", str(out))
        assert done.returncode != 0
        line = error_line(done.stderr)
        assert "No space left on device" in line, line
        assert not out.exists() or not any(out.iterdir()), f"export left {sorted(p.name for p in out.iterdir())}"
        assert not _leftovers(disk)


def test_merge_onto_a_real_full_disk_is_one_line_and_leaves_nothing(tmp_path, trained_adapter):
    base = tmp_path / "base"
    from moslora_diffusion.testing import save_tiny_pipeline

    save_tiny_pipeline("sd15", base)
    with small_disk(tmp_path / "disk", _tree_bytes(base) // 2) as disk:
        for output in (disk / "merged", disk / "merged.safetensors"):
            done = _cli("merge", "--base", str(base), "--adapter", str(trained_adapter), "--output", str(output))
            assert done.returncode != 0, done.stdout
            line = error_line(done.stderr)
            assert "No space left on device" in line, line
            assert not output.exists(), f"merge left {output}"
            assert not _leftovers(disk), _leftovers(disk)
        assert shutil.disk_usage(disk).used < PAGE * 4, "merge left files behind on the full disk"


def test_disk_caches_on_a_real_full_disk_warn_and_train_on(tmp_path, monkeypatch, caplog):
    """A cache is an optimisation: entries that do not fit are a warning naming them, never half-written,
    and the run trains exactly as with in-memory caches."""
    reference = tmp_path / "reference"
    assert (
        run_main(
            _train_argv(reference, "--checkpointing_steps", "1000", "--cache_latents", "--cache_text_encoder_outputs")
        )
        == 0
    )
    with small_disk(tmp_path / "cache", 3 * PAGE) as cache:
        monkeypatch.setenv("MOSLORA_CACHE_DIR", str(cache))
        out = tmp_path / "out"
        argv = _train_argv(
            out, "--checkpointing_steps", "1000", "--cache_latents_to_disk", "--cache_text_encoder_outputs_to_disk"
        )
        with caplog.at_level("WARNING"):
            assert run_main(argv) == 0
        assert any(
            "cache entry" in r.getMessage() and "No space left on device" in r.getMessage() for r in caplog.records
        )
        assert not _leftovers(cache), _leftovers(cache)
        for entry in cache.rglob("*.safetensors"):
            assert load_safetensors(entry)[0]  # whatever was written is whole
    got, _ = load_safetensors(out / "moslora_weights.safetensors")
    expected, _ = load_safetensors(reference / "moslora_weights.safetensors")
    assert got.keys() == expected.keys() and all(bool((got[k] == expected[k]).all()) for k in got)
