"""The long fuzzing campaign over every adapter loader: tests/test_fuzz_loaders.py with thousands of cases.

    python benchmarks/fuzz_loaders.py                       # 2,400 cases (random, a new sample each run)
    python benchmarks/fuzz_loaders.py --examples 10000 --output fuzz.md

CI runs the same tests with about 330 fixed (derandomized) cases. Each case mutates a real adapter file
and must either load correctly or fail with one ValueError naming the file; any other outcome fails the
run, with Hypothesis's minimal failing example. Prints (and with --output writes) per-loader counts of
cases that loaded and cases that were refused. Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LOADERS = {
    "read": "formats.read_adapter_file (validation, format detection, parsing)",
    "stream": "fileio.SafetensorsReader (merge's reader of base checkpoints), every tensor read",
    "inspect": "moslora inspect [--json], in-process",
    "export": "moslora export (--to diffusers, kohya or both), outputs read back and compared",
    "load": "load_moslora_weights on a tiny SD 1.5 pipeline (folded, or trainable=True)",
    "merge": "merge_adapters on a tiny SD 1.5 pipeline, merged weights compared",
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=2400, help="cases over all loaders (default 2400)")
    parser.add_argument("--output", type=Path, help="also write the table (Markdown) here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        env = {
            **os.environ,
            "MOSLORA_FUZZ_EXAMPLES": str(args.examples),
            "MOSLORA_FUZZ_REPORT": str(report),
            "OMP_NUM_THREADS": "1",
        }
        command = [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            str(REPO / "tests" / "test_fuzz_loaders.py"),
        ]
        started = time.monotonic()
        result = subprocess.run(command, cwd=REPO, env=env)
        seconds = time.monotonic() - started
        counts = json.loads(report.read_text())["counts"] if report.is_file() else {}

    rows = ["| loader | cases | loaded | refused (ValueError naming the file) |", "|---|---|---|---|"]
    total = 0
    for name, description in LOADERS.items():
        loaded, refused = counts.get(f"{name}/loaded", 0), counts.get(f"{name}/refused", 0)
        total += loaded + refused
        rows.append(f"| {description} | {loaded + refused} | {loaded} | {refused} |")
    verdict = (
        "every case loaded correctly or was refused with one ValueError naming the file"
        if result.returncode == 0
        else "FAILED (see above)"
    )
    table = "\n".join([*rows, "", f"{total} cases in {seconds:.0f} s: {verdict}."])
    print(table)
    if args.output:
        args.output.write_text(table + "\n")
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
