"""Merging into a new checkpoint: every input checked up front (:class:`MergePlan`), then written streaming.

Nothing is written until :meth:`MergePlan.write`; the writers (:mod:`.writers`) produce the output one
tensor at a time, and it appears complete or not at all.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from ..families import family_of_model_dir
from ..fileio import atomic_directory, atomic_path
from ..single_file import original_layout, single_file_components
from .base_weights import ComponentWeights, MergedTensors
from .deltas import AdapterDeltas, first_line, select_components
from .hollow import hollow_pipeline_from_folder
from .specs import AdapterSpec, as_specs
from .writers import write_folder, write_single_file

logger = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclasses.dataclass
class MergeResult:
    """What :func:`merge_checkpoint` wrote."""

    output: Path
    family: str
    adapters: list[AdapterSpec]
    components: list[str]
    tensors_merged: int
    bytes_written: int
    seconds: float

    def summary(self) -> str:
        return (
            f"merged {len(self.adapters)} adapter(s) into {self.tensors_merged} tensors of "
            f"{', '.join(self.components) or 'nothing'}; "
            f"wrote {self.output} ({self.bytes_written / 2**20:.1f} MiB) in {self.seconds:.1f} s"
        )


def merge_checkpoint(
    base: str | os.PathLike,
    adapters: Iterable,
    output: str | os.PathLike,
    *,
    base_config: str | os.PathLike | None = None,
    dtype: str | torch.dtype | None = None,
    components: Sequence[str] | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> MergeResult:
    """Bake ``adapters`` into the pipeline folder ``base`` and write ``output``, streaming.

    ``output`` ending in ``.safetensors`` is a single file in the family's original layout (loadable by
    ``from_single_file`` with ``config=`` a diffusers folder of the same model, and by A1111 / ComfyUI);
    anything else is a diffusers folder (``DiffusionPipeline.from_pretrained``) with a README.md naming
    the base and each adapter with its weight and sha256. ``dtype`` ("fp32", "fp16", "bf16") casts the
    floating-point tensors (default: each keeps the base's dtype); the maths is fp32 either way.
    Every input is checked before anything is written; the output appears complete or not at all.

    ``base`` may also be a single-file ``.safetensors`` checkpoint, completed by ``base_config`` (a diffusers
    folder or hub id of the same family; default the family's reference repository): see
    :mod:`.single_file_base`.
    """
    start = time.perf_counter()
    if Path(base).is_file():
        return _merge_into_single_file(
            Path(base), adapters, Path(output), start, base_config=base_config, dtype=dtype, components=components,
            overwrite=overwrite, progress=progress,
        )  # fmt: skip
    if base_config is not None:
        raise ValueError(f"--base_config completes a single-file --base, but --base {base} is not a file; leave it out")
    plan = MergePlan(base, adapters, output, dtype=dtype, components=components, overwrite=overwrite, progress=progress)
    return _result(plan, plan.write(), plan.merged.merged, start)


def _merge_into_single_file(base: Path, adapters, output: Path, start: float, *, base_config, **options) -> MergeResult:
    from .single_file_base import SingleFileMergePlan, folder_twin

    if output.suffix == ".safetensors":
        plan = SingleFileMergePlan(base, adapters, output, base_config=base_config, **options)
        written = plan.write()
        return _result(plan, written, plan.merged, start)
    check_output(output, base, options["overwrite"])  # before the conversion, which takes a while
    twin = folder_twin(base, base_config, output.parent)
    try:
        plan = MergePlan(twin.folder, adapters, output, source=base, **options)
        return _result(plan, plan.write(), plan.merged.merged, start)
    finally:
        twin.cleanup()


def _result(plan, written: int, merged: int, start: float) -> MergeResult:
    elapsed = time.perf_counter() - start
    result = MergeResult(plan.output, plan.family.name, plan.specs, list(plan.deltas.targets), merged, written, elapsed)
    logger.info(result.summary())
    return result


class MergePlan:
    """Everything a merge needs, checked up front: nothing is written until :meth:`write`."""

    def __init__(self, base, adapters, output, *, dtype, components, overwrite, progress=False, source=None):
        self.base = resolve_base(base)
        self.source = Path(source) if source is not None else self.base  # what the merge record names as the base
        self.family = family_of_model_dir(self.base)
        self.specs = as_specs(adapters)
        self.output = Path(output)
        self.single_file = self.output.suffix == ".safetensors"
        self.overwrite = overwrite
        self.progress = progress
        self.dtype = parse_dtype(dtype)
        check_output(self.output, self.base, overwrite)

        index = json.loads((self.base / "model_index.json").read_text())
        model_components = [
            name for name, spec in index.items()
            if not name.startswith("_") and isinstance(spec, list) and len(spec) == 2
            and spec[0] in ("diffusers", "transformers") and (self.base / name / "config.json").is_file()
        ]  # fmt: skip
        self.components = select_components(self.family, components, model_components)
        if self.single_file:
            wanted = single_file_components(self.family.name)
            missing = [c for c in wanted if c not in model_components]
            if missing:
                raise ValueError(
                    f"a {self.family.name} single file needs {', '.join(missing)}, which the base model lacks"
                )
        self.weights = {
            name: ComponentWeights.find(self.base, name)
            for name in model_components
            if not self.single_file or name in single_file_components(self.family.name)
        }

        self.deltas = AdapterDeltas(hollow_pipeline_from_folder(self.base), self.family, self.specs, self.components)
        self.merged = MergedTensors(self.weights, self.deltas, self.dtype)
        for component, targets in self.deltas.targets.items():
            if component not in self.weights:
                kept = ", ".join(single_file_components(self.family.name))
                raise ValueError(
                    f"the adapters change {component}, but a {self.family.name} single file holds only {kept}: "
                    f"write a diffusers folder (--output DIR), or leave {component} out with --components"
                )
            weights = self.weights[component]
            for key in targets:
                file_key = weights.locate(key)
                if file_key is None:
                    raise ValueError(f"{weights.folder}: the adapters change {key!r}, which the base weights lack")
                shape = weights.tensors[file_key][1].shape
                if tuple(shape) != self.deltas.shapes[component][key]:
                    raise ValueError(
                        f"{weights.folder}: {file_key!r} is {tuple(shape)} in the weights but "
                        f"{self.deltas.shapes[component][key]} "
                        "in the config; the base model folder is inconsistent"
                    )
                self.merged.model_key[(component, file_key)] = key
        if self.single_file:
            self.layout = original_layout(
                self.family.name,
                {c: list(w.tensors) for c, w in self.weights.items()},
                {c: w.config for c, w in self.weights.items()},
            )

    # -- writing (the writers live in writers.py) ------------------------------------------------

    def write(self) -> int:
        # One tensor at a time is memory- and I/O-bound work on small matmuls: a thread pool only adds
        # synchronisation, which on a busy machine made the merge 2-3x slower (benchmarks/bench_merge.py).
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            if self.single_file:
                with atomic_path(self.output) as tmp:
                    return write_single_file(self, tmp)
            with atomic_directory(self.output, overwrite=self.overwrite) as tmp:
                return write_folder(self, tmp)
        finally:
            torch.set_num_threads(threads)
            self.merged.close()


def resolve_base(base: str | os.PathLike) -> Path:
    path = Path(base)
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ValueError(f"--base {path}: not a diffusers pipeline folder (no model_index.json)")
        return path
    if path.exists():
        raise ValueError(f"--base {path}: a file; give a diffusers pipeline folder or a .safetensors single file")
    if re.fullmatch(r"[\w.-]+/[\w.-]+", str(base)):
        try:
            from huggingface_hub import snapshot_download

            patterns = [
                "*.json",
                "*.txt",
                "*.model",
                "*.safetensors",
                "*.md",
                "*/*.json",
                "*/*.txt",
                "*/*.model",
                "*/*.safetensors",
            ]
            return Path(snapshot_download(str(base), allow_patterns=patterns))
        except Exception as err:  # noqa: BLE001 - offline, missing repo, no auth: one line
            raise ValueError(
                f"--base {base}: not a local folder, and the Hub could not provide it ({first_line(err)})"
            ) from None
    raise ValueError(f"--base {base}: no such folder")


def parse_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def check_output(output: Path, base: Path, overwrite: bool) -> None:
    if output.suffix in (".ckpt", ".pt", ".pth", ".bin", ".sft"):
        raise ValueError(f"--output {output}: single files are written as .safetensors only (or give a folder)")
    parent = output.parent
    if not parent.is_dir():
        problem = "is not a folder" if parent.exists() else "does not exist"
        raise ValueError(f"--output {output}: {parent} {problem}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"--output {output}: cannot write in {parent} (permission denied)")
    resolved, base_resolved = output.resolve(), base.resolve()
    if resolved == base_resolved or base_resolved in resolved.parents or resolved in base_resolved.parents:
        raise ValueError(f"--output {output}: overlaps the base model folder {base}; write somewhere else")
    if output.exists() or output.is_symlink():
        if not overwrite:
            raise ValueError(f"--output {output}: already exists; pass --overwrite to replace it")
        single = output.suffix == ".safetensors"
        if single and not output.is_file() or not single and not output.is_dir():
            raise ValueError(
                f"--output {output}: exists and is not a {'file' if single else 'folder'}; remove it first"
            )
