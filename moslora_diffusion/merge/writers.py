"""The merged checkpoint's writers: a diffusers folder (with a README recording the merge) or one single file."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..fileio import SafetensorsReader, write_safetensors_streaming
from ..version import __version__

if TYPE_CHECKING:
    from .base_weights import ComponentWeights, MergedTensors
    from .plan import MergePlan

DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def _progress(plan: MergePlan, total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="tensor", disable=not plan.progress)


def write_folder(plan: MergePlan, out: Path) -> int:
    written = 0
    handled = {p for w in plan.weights.values() for p in [*w.files, *([w.index] if w.index else []), *w.dropped]}
    total = sum(len(w.tensors) for w in plan.weights.values())
    with _progress(plan, total, "merging") as bar:
        for source in sorted(plan.base.rglob("*")):
            relative = source.relative_to(plan.base)
            if source.is_dir() or source in handled or relative.parts[0].startswith("."):
                continue
            target = out / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            if relative == Path("README.md"):
                continue  # written below, with the base's own card kept after the merge record
            if plan.dtype is not None and source.name == "config.json" and relative.parts[0] in plan.weights:
                target.write_text(_with_config_dtype(source.read_text(), plan.dtype))
            else:
                shutil.copy2(source, target)
        for component, weights in plan.weights.items():
            for file in weights.files:
                written += _write_component_file(plan, component, file, out / component / file.name, bar)
            if weights.index is not None:
                _write_index(weights, out / component / weights.index.name, plan.merged)
    (out / "README.md").write_text(merge_readme(plan))
    return written


def _write_component_file(plan: MergePlan, component: str, file: Path, target: Path, bar) -> int:
    weights = plan.weights[component]
    with SafetensorsReader(file) as reader:
        names, metadata = list(reader.tensors), reader.metadata
    entries = [(key, plan.merged.out_dtype(weights.tensors[key][1]), weights.tensors[key][1].shape) for key in names]

    def tensor_for(key):
        bar.update(1)
        return plan.merged.read(component, key)

    return write_safetensors_streaming(target, entries, tensor_for, metadata or {"format": "pt"})


def write_single_file(plan: MergePlan, tmp: Path) -> int:
    entries = []
    for original in plan.layout:
        parts = []
        for component, key in original.sources:
            info = plan.weights[component].tensors[key][1]
            parts.append(torch.empty(info.shape, dtype=plan.merged.out_dtype(info), device="meta"))
        built = original.build(parts)
        entries.append((original.name, built.dtype, tuple(built.shape)))
    layout = {t.name: t for t in plan.layout}
    extra = {}
    scheduler = plan.base / "scheduler" / "scheduler_config.json"
    if scheduler.is_file() and json.loads(scheduler.read_text()).get("prediction_type") == "v_prediction":
        # ComfyUI's marker for v-prediction checkpoints (A1111 and diffusers ignore it).
        extra["v_pred"] = torch.zeros(0)
        entries.append(("v_pred", torch.float32, (0,)))
    with _progress(plan, len(entries), "merging") as bar:

        def tensor_for(name):
            bar.update(1)
            if name in extra:
                return extra[name]
            original = layout[name]
            return original.build([plan.merged.read(c, k) for c, k in original.sources])

        metadata = {"format": "pt", "moslora_merge": json.dumps(merge_record(plan), sort_keys=True)}
        return write_safetensors_streaming(tmp, entries, tensor_for, metadata)


def merge_record(plan: MergePlan) -> dict:
    return {
        "tool": f"moslora-diffusion {__version__}",
        "base": str(plan.source),
        "family": plan.family.name,
        "adapters": [
            {"path": str(s.path), "weight": s.weight, "files": _sha256_of_adapter(s.path)} for s in plan.specs
        ],
        "components": list(plan.deltas.targets),
        "dtype": DTYPE_NAMES.get(plan.dtype, "as the base"),
        "not_carried_over": [str(p.relative_to(plan.base)) for w in plan.weights.values() for p in w.dropped],
    }


def merge_readme(plan: MergePlan) -> str:
    record = merge_record(plan)
    rows = []
    for adapter in record["adapters"]:
        hashes = "<br>".join(f"`{name}`: `{digest}`" for name, digest in adapter["files"].items())
        rows.append(f"| `{adapter['path']}` | {adapter['weight']:g} | {hashes} |")
    text = "\n".join(
        [
            "# Merged model",
            "",
            f"The {record['family']} base model `{record['base']}` with these adapters baked into its weights",
            f"(W = W0 + sum of weight x delta W, in fp32), by `moslora merge` ({record['tool']}):",
            "",
            "| adapter | weight | sha256 |",
            "|---|---|---|",
            *rows,
            "",
            f"Components changed: {', '.join(record['components']) or 'none'}. Weights dtype: {record['dtype']}.",
            *(
                [
                    "Not carried over (unmerged copies of the weights): "
                    + ", ".join(f"`{p}`" for p in record["not_carried_over"])
                    + "."
                ]
                if record["not_carried_over"]
                else []
            ),
            'Load it with `DiffusionPipeline.from_pretrained("<this folder>")`; no adapter loader is needed.',
            "",
        ]
    )
    base_card = plan.base / "README.md"
    if not base_card.is_file():
        return text
    card = base_card.read_text()
    front_matter = ""
    if card.startswith("---\n") and "\n---\n" in card[4:]:
        end = card.index("\n---\n", 4) + len("\n---\n")
        front_matter, card = card[:end] + "\n", card[end:]
    return f"{front_matter}{text}\n## The base model's card\n\n{card}"


def _with_config_dtype(text: str, dtype: torch.dtype) -> str:
    """A component config.json with its recorded dtype (transformers' ``dtype`` / ``torch_dtype``) updated."""
    config = json.loads(text)
    for field in ("dtype", "torch_dtype"):
        if field in config:
            config[field] = DTYPE_NAMES[dtype]
    return json.dumps(config, indent=2, sort_keys=True) + "\n"


def _write_index(weights: ComponentWeights, target: Path, merged: MergedTensors) -> None:
    index = json.loads(weights.index.read_text())
    total = 0
    for file, info in weights.tensors.values():
        numel = math.prod(info.shape)
        total += numel * merged.out_dtype(info).itemsize
    index.setdefault("metadata", {})["total_size"] = total
    target.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _sha256_of_adapter(path: Path) -> dict[str, str]:
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
    digests = {}
    for file in files:
        digest = hashlib.sha256()
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        digests[file.name] = digest.hexdigest()
    return digests
