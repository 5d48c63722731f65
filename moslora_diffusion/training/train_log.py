"""``output_dir/logs/train_log.jsonl``: one JSON object per optimizer step, readable without TensorBoard.

    {"step": 12, "loss": 0.0831, "lr": 0.0001, "seconds": 4.71}

``seconds`` is the wall-clock time since training began (model loading not counted, validation counted),
summed over the runs that resumed one another. A resumed run keeps the lines up to its
checkpoint's step and appends from there, so lines that a killed run wrote after its last checkpoint do
not appear twice; a new run starts the file afresh. Only the main process writes it.

    import json, matplotlib.pyplot as plt
    rows = [json.loads(line) for line in open("out/logs/train_log.jsonl")]
    plt.plot([r["step"] for r in rows], [r["loss"] for r in rows])
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..fileio import atomic_path

LOG_NAME = "train_log.jsonl"


def read_train_log(path: str | Path) -> list[dict]:
    """The records of a train log (none if it does not exist)."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class TrainLog:
    """Appends one line per step to ``path``; created at the first :meth:`write`, so a run that stops before
    its first step leaves no file."""

    def __init__(self, path: str | Path, start_step: int):
        self.path = Path(path)
        rows = self._readable_rows() if start_step else []
        kept = [row for row in rows if row.get("step", 0) <= start_step]
        # What the file must hold before the first new line; None: it already does (a clean resume).
        self._rewrite_to = kept if start_step == 0 or kept != rows else None
        self._offset = float(kept[-1].get("seconds", 0.0)) if kept else 0.0
        self._started = time.monotonic()

    def _readable_rows(self) -> list[dict]:
        """The records already there; a line a killed run cut short is skipped."""
        if not self.path.is_file():
            return []
        rows = []
        for line in self.path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
        return [row for row in rows if isinstance(row, dict)]

    def write(self, step: int, loss: float, lr: float) -> None:
        if self._rewrite_to is not None:
            if self._rewrite_to or self.path.exists():
                with atomic_path(self.path) as tmp:
                    tmp.write_text("".join(json.dumps(row) + "\n" for row in self._rewrite_to))
            self._rewrite_to = None
        seconds = self._offset + time.monotonic() - self._started
        record = {"step": step, "loss": loss, "lr": lr, "seconds": round(seconds, 3)}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Appended, not rewritten through fileio.atomic_path: a line per step must stay cheap; a killed run
        # loses at most its last line, which the resumed run writes again.
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
