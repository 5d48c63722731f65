"""Soak: a long tiny DreamBooth run SIGKILLed at random moments and resumed each time.

    python benchmarks/soak_kill_resume.py --steps 2000 --kills 10       # about 15-25 min on 2 cores

Runs the real CLI (``python -m moslora_diffusion train`` on ``tiny:sd15``, one thread, a checkpoint
every 50 steps, ``--checkpoints_total_limit 2``) twice: once uninterrupted, once killed with SIGKILL at
``--kills`` random moments (uniform over each attempt's expected life, start-up included, so some kills
land during start-up, some during a checkpoint write) and resumed with ``--resume_from_checkpoint
latest``. Reports whether the final adapter is bit-identical to the uninterrupted run's, the largest disk
use seen in the output folder (sampled every 0.2 s) against what the checkpoint limit allows, and the
wall time the kills cost. Writes benchmarks/results/soak_kill_resume.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from moslora_diffusion.fileio import load_safetensors  # noqa: E402


def _du(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:  # removed while walking (a checkpoint being pruned)
                pass
    return total


def _argv(out: Path, steps: int, every: int, limit: int, resume: bool) -> list[str]:
    argv = [
        sys.executable, "-m", "moslora_diffusion", "train",
        "--pretrained_model_name_or_path", "tiny:sd15",
        "--instance_data_dir", str(REPO / "samples" / "subject"),
        "--instance_prompt", "a photo of sks cross",
        "--output_dir", str(out), "--resolution", "32",
        "--max_train_steps", str(steps), "--checkpointing_steps", str(every),
        "--checkpoints_total_limit", str(limit), "--learning_rate", "1e-3",
        "--lora_dropout", "0.1", "--random_flip", "--num_validation_images", "0",
        "--report_to", "none", "--seed", "0",
    ]  # fmt: skip
    return argv + (["--resume_from_checkpoint", "latest"] if resume else [])


def _env() -> dict[str, str]:
    # One thread: the same kernels in every attempt, so the same bits.
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}


def _has_checkpoint(out: Path) -> bool:
    return any((p / "training_state.json").is_file() for p in out.glob("checkpoint-*"))


def _run(argv: list[str], log: Path, kill_after: float | None, samples: list[int], out: Path) -> tuple[int, float]:
    """Run ``argv``; SIGKILL it after ``kill_after`` seconds (None: let it finish). Returns (status, seconds)."""
    start = time.monotonic()
    with log.open("ab") as sink:
        proc = subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT, env=_env(), cwd=REPO)
        while proc.poll() is None:
            if out.exists():
                samples.append(_du(out))
            if kill_after is not None and time.monotonic() - start >= kill_after:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                break
            time.sleep(0.2)
    return proc.returncode, time.monotonic() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--steps", type=int, default=2000, help="training steps of the run")
    parser.add_argument("--kills", type=int, default=10, help="SIGKILLs before the run is let finish")
    parser.add_argument("--checkpointing_steps", type=int, default=50, help="checkpoint every this many steps")
    parser.add_argument("--checkpoints_total_limit", type=int, default=2, help="checkpoints kept")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill times")
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results", help="where to write")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="moslora-soak-"))
    every, limit = args.checkpointing_steps, args.checkpoints_total_limit

    ref_out, samples_ref = work / "uninterrupted", []
    status, ref_seconds = _run(
        _argv(ref_out, args.steps, every, limit, False), work / "uninterrupted.log", None, samples_ref, ref_out
    )
    if status != 0:
        print((work / "uninterrupted.log").read_text()[-3000:])
        return 1
    print(f"uninterrupted: {ref_seconds:.1f} s", flush=True)

    out, samples, attempts, soak_seconds = work / "soak", [], [], 0.0
    # Each attempt is killed at a uniform moment of the time a fair share of the run would take.
    share = ref_seconds / (args.kills + 1)
    for kill in range(args.kills):
        kill_after = rng.uniform(0.3, 1.7) * share
        status, seconds = _run(
            _argv(out, args.steps, every, limit, _has_checkpoint(out)), work / "soak.log", kill_after, samples, out
        )
        soak_seconds += seconds
        attempts.append({"kill": kill + 1, "after_s": round(kill_after, 2), "status": status})
        print(f"kill {kill + 1}: after {kill_after:.1f} s (exit {status})", flush=True)
        if status == 0:  # the run finished before the kill: nothing left to interrupt
            break
    status, seconds = _run(
        _argv(out, args.steps, every, limit, _has_checkpoint(out)), work / "soak.log", None, samples, out
    )
    soak_seconds += seconds
    if status != 0:
        print((work / "soak.log").read_text()[-3000:])
        return 1

    ref, _ = load_safetensors(ref_out / "moslora_weights.safetensors")
    got, _ = load_safetensors(out / "moslora_weights.safetensors")
    identical = ref.keys() == got.keys() and all(bool((ref[k] == got[k]).all()) for k in ref)
    checkpoint_bytes = (
        _du(ref_out / f"checkpoint-{args.steps}") if (ref_out / f"checkpoint-{args.steps}").is_dir() else 0
    )
    # The limit keeps `limit` checkpoints; while one is written there are limit + 1 (one as .tmp).
    allowed = (limit + 1) * checkpoint_bytes + sum(p.stat().st_size for p in ref_out.glob("*.safetensors")) + 1_000_000
    result = {
        "steps": args.steps,
        "kills": len(attempts),
        "attempts": attempts,
        "identical_to_uninterrupted": identical,
        "uninterrupted_s": round(ref_seconds, 1),
        "soak_s": round(soak_seconds, 1),
        "lost_to_kills_s": round(soak_seconds - ref_seconds, 1),
        "peak_disk_bytes": max(samples, default=0),
        "uninterrupted_peak_disk_bytes": max(samples_ref, default=0),
        "disk_bound_bytes": allowed,
        "checkpoints_left": sorted(p.name for p in out.glob("checkpoint-*")),
        "leftovers": sorted(p.name for p in out.iterdir() if p.name.startswith(".")),
    }
    md = "\n".join([
        f"# Soak: {args.steps} tiny steps, {len(attempts)} SIGKILLs, checkpoint every {every}, limit {limit}",
        "",
        "| final adapter bit-identical | uninterrupted | with kills | lost to kills | peak disk (soak) | peak disk (uninterrupted) | bound |",
        "|---|---|---|---|---|---|---|",
        f"| {'yes' if identical else 'NO'} | {ref_seconds:.0f} s | {soak_seconds:.0f} s | {soak_seconds - ref_seconds:.0f} s "
        f"| {result['peak_disk_bytes'] / 1e6:.2f} MB | {result['uninterrupted_peak_disk_bytes'] / 1e6:.2f} MB | {allowed / 1e6:.2f} MB |",
        "",
        f"Kill moments (s after each start): {', '.join(str(a['after_s']) for a in attempts)}. "
        f"Checkpoints left: {', '.join(result['checkpoints_left'])}; hidden leftovers: {result['leftovers'] or 'none'}.",
        "",
    ])  # fmt: skip
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "soak_kill_resume.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.results / "soak_kill_resume.md").write_text(md)
    print(md)
    ok = identical and result["peak_disk_bytes"] <= allowed and not result["leftovers"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
