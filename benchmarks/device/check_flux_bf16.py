"""Does tiny Flux trained in bf16 end with finite adapters? An earlier GPU report said it did not.

The real trainer (``python -m moslora_diffusion train``) on ``tiny:flux`` at 32 px, the same seed and steps,
under fp32, bf16, and bf16 with gradient checkpointing; for each run: the losses from
``logs/train_log.jsonl`` (first, last, the first non-finite step) and whether every tensor of the saved
``moslora_weights.safetensors`` is finite. Writes ``OUT.md`` and ``OUT.json``; exit status 1 when any run
ends non-finite, so the device script's log shows it.

    python benchmarks/device/check_flux_bf16.py --steps 100 --out /tmp/gpu-out/flux_bf16
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SUBJECT = REPO / "samples" / "subject"
RUNS = {"fp32": ["--mixed_precision", "no"], "bf16": ["--mixed_precision", "bf16"],
        "bf16 + checkpointing": ["--mixed_precision", "bf16", "--gradient_checkpointing"]}  # fmt: skip


def train(output_dir: Path, steps: int, learning_rate: float, extra: list[str]) -> subprocess.CompletedProcess:
    argv = [
        sys.executable, "-m", "moslora_diffusion", "train",
        "--pretrained_model_name_or_path", "tiny:flux", "--instance_data_dir", str(SUBJECT),
        "--instance_prompt", "a photo of sks cross", "--output_dir", str(output_dir), "--resolution", "32",
        "--max_train_steps", str(steps), "--learning_rate", str(learning_rate), "--num_validation_images", "1",
        "--num_inference_steps", "2", "--report_to", "none", "--seed", "0", *extra,
    ]  # fmt: skip
    return subprocess.run(argv, capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})


def summarise(name: str, output_dir: Path, result: subprocess.CompletedProcess) -> dict:
    from safetensors.torch import load_file

    row = {"run": name, "exit": result.returncode}
    log = output_dir / "logs" / "train_log.jsonl"
    losses = [json.loads(line)["loss"] for line in log.read_text().splitlines()] if log.is_file() else []
    bad = [i + 1 for i, loss in enumerate(losses) if not math.isfinite(loss)]
    row.update(first_loss=losses[0] if losses else None, last_loss=losses[-1] if losses else None,
               first_nonfinite_step=bad[0] if bad else None, steps_logged=len(losses))  # fmt: skip
    weights = output_dir / "moslora_weights.safetensors"
    if weights.is_file():
        tensors = load_file(str(weights))
        nonfinite = sorted(k for k, t in tensors.items() if not t.float().isfinite().all())
        row.update(
            tensors=len(tensors), nonfinite_tensors=len(nonfinite), first_nonfinite_tensor=next(iter(nonfinite), None)
        )
    else:
        row.update(tensors=0, error=" ".join(result.stderr.strip().splitlines()[-1:]))
    row["finite"] = result.returncode == 0 and not bad and row.get("nonfinite_tensors") == 0
    return row


def _loss(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def markdown(rows: list[dict], steps: int, learning_rate: float, device: str) -> str:
    out = [f"# tiny:flux, {steps} steps at learning rate {learning_rate:g}, 32 px, seed 0 ({device})", "",
           "| run | exit | first loss | last loss | first non-finite step | non-finite tensors | finite |",
           "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        out.append(
            f"| {r['run']} | {r['exit']} | {_loss(r['first_loss'])} | {_loss(r['last_loss'])} | "
            f"{r['first_nonfinite_step'] or '-'} | "
            f"{r.get('nonfinite_tensors', '-')} of {r['tensors']} | {'yes' if r['finite'] else 'NO'} |"
        )
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "flux_bf16_finite"))
    args = parser.parse_args(argv)
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name in args.runs:
            output_dir = Path(folder) / name.replace(" ", "_").replace("+", "")
            rows.append(summarise(name, output_dir, train(output_dir, args.steps, args.learning_rate, RUNS[name])))
            print(json.dumps(rows[-1]), flush=True)
    text = markdown(rows, args.steps, args.learning_rate, device)
    print(text)
    Path(args.out).with_suffix(".md").write_text(text)
    Path(args.out).with_suffix(".json").write_text(json.dumps(rows, indent=1))
    return 0 if all(r["finite"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
