"""Merging into a single-file base (``moslora merge --base FILE.safetensors [--base_config DIR_OR_ID]``).

Into a single file: the base file is streamed tensor by tensor and written in its own layout (its names,
its prefix, every tensor it holds, its metadata plus the merge record). A tensor an adapted module lands
in gets the adapters' deltas in that layout, built by the single-file writer's plan
(:func:`moslora_diffusion.single_file.original_layout`), which is linear (renames, q/k/v concatenation,
reshapes, transposes, half swaps):

    W_file + build(delta_q, delta_k, delta_v, ...)  ==  build(W_q + delta_q, W_k + delta_k, ...)

so the result equals merging into the file's diffusers twin and writing that as a single file.

Into a diffusers folder: the file's components are loaded (:mod:`moslora_diffusion.single_file_bases`),
saved as a temporary diffusers folder beside the output, and merged as a folder base.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path

import torch

from ..families import Family, family_of_model_dir, get_family
from ..fileio import SafetensorsReader, TensorInfo, atomic_path, write_safetensors_streaming
from ..gguf_bases import refuse_merge_into_gguf
from ..single_file import OriginalTensor, original_layout
from ..single_file_bases import (
    DENOISER_PREFIX,
    base_config_folder,
    load_single_file_components,
    read_single_file_family,
    single_file_components_held,
)
from .deltas import AdapterDeltas, select_components
from .hollow import hollow_pipeline_from_folder
from .specs import as_specs


def single_file_family_and_config(base: Path, base_config: str | None, *, weights: bool) -> tuple[type[Family], Path]:
    """The family of a single-file ``--base`` and the local diffusers folder of its configs (``--base_config``,
    default the family's reference hub repository); ValueError with one line. A GGUF base refuses."""
    refuse_merge_into_gguf(base)
    try:
        family = get_family(read_single_file_family(base)[0])
    except ValueError as err:
        raise ValueError(f"--base {err}") from None
    source = base_config or family.reference_repository
    config_dir = base_config_folder(source, base, weights=weights)
    config_family = family_of_model_dir(config_dir)
    if config_family is not family:
        raise ValueError(
            f"--base {base} is a {family.name} checkpoint but --base_config {source} is a {config_family.name} model; "
            f"give a {family.name} folder or hub id"
        )
    return family, config_dir


class SingleFileMergePlan:
    """A merge into a single-file base written as a single file, every input checked before :meth:`write`."""

    def __init__(self, base, adapters, output, *, base_config, dtype, components, overwrite, progress=False):
        from .plan import check_output, parse_dtype

        self.base, self.output = Path(base), Path(output)
        self.source, self.weights = self.base, {}  # as merge_record reads a MergePlan: no component folders
        self.family, config_dir = single_file_family_and_config(self.base, base_config, weights=False)
        self.specs = as_specs(adapters)
        self.dtype = parse_dtype(dtype)
        self.progress = progress
        check_output(self.output, self.base, overwrite)
        held = single_file_components_held(self.base)
        self.components = select_components(self.family, components, held)

        hollow = hollow_pipeline_from_folder(config_dir)
        # The layout's names come from the models' own tensor names, read before adapters wrap any layer.
        shapes = {c: {k: tuple(v.shape) for k, v in getattr(hollow, c).state_dict().items()} for c in held}
        configs = {c: dict(getattr(hollow, c).config) for c in held if hasattr(getattr(hollow, c).config, "keys")}
        layout = original_layout(self.family.name, {c: list(s) for c, s in shapes.items()}, configs)
        self.deltas = AdapterDeltas(hollow, self.family, self.specs, self.components)
        for component in self.deltas.targets:
            if component not in held:
                raise ValueError(
                    f"the adapters change {component}, but {self.base} holds only {', '.join(held)}: "
                    f"leave {component} out with --components, or write a diffusers folder (--output DIR)"
                )

        with SafetensorsReader(self.base) as reader:
            self.tensors: dict[str, TensorInfo] = dict(reader.tensors)
            self.metadata = dict(reader.metadata or {})
        self.updates: dict[str, tuple[OriginalTensor, list[tuple[int, ...]]]] = {}
        placed = set()
        for original in layout:
            if not any(key in self.deltas.targets.get(c, {}) for c, key in original.sources):
                continue
            file_key = self._name_in_file(original.name)
            source_shapes = [shapes[c][key] for c, key in original.sources]
            built = original.build([torch.empty(s, device="meta") for s in source_shapes])
            if tuple(built.shape) != tuple(self.tensors[file_key].shape):
                raise ValueError(
                    f"--base {self.base}: {file_key!r} is {tuple(self.tensors[file_key].shape)}, but the "
                    f"--base_config model's is {tuple(built.shape)}: the config folder is not this checkpoint's model"
                )
            self.updates[file_key] = (original, source_shapes)
            placed.update(original.sources)
        for component, targets in self.deltas.targets.items():
            for key in targets:
                if (component, key) not in placed:
                    raise ValueError(f"--base {self.base}: no tensor of the single file holds {component}.{key}")
        self.merged = 0

    def _name_in_file(self, name: str) -> str:
        """The file's name for a layout name: Flux and SD3 transformers come bare or under model.diffusion_model."""
        for candidate in (name, DENOISER_PREFIX + name, name.removeprefix(DENOISER_PREFIX)):
            if candidate in self.tensors:
                return candidate
        raise ValueError(f"--base {self.base}: the adapters change {name!r}, which the single file lacks")

    def _out_dtype(self, info: TensorInfo) -> torch.dtype:
        return self.dtype if self.dtype is not None and info.dtype.is_floating_point else info.dtype

    def write(self) -> int:
        from tqdm.auto import tqdm

        from .writers import merge_record

        entries = [(name, self._out_dtype(info), tuple(info.shape)) for name, info in self.tensors.items()]
        record = merge_record(self)
        metadata = {**self.metadata, "moslora_merge": json.dumps(record, sort_keys=True)}
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as MergePlan.write: one tensor at a time is memory-bound
        try:
            with (
                SafetensorsReader(self.base) as reader,
                tqdm(total=len(entries), desc="merging", unit="tensor", disable=not self.progress) as bar,
            ):

                def tensor_for(name: str) -> torch.Tensor:
                    bar.update(1)
                    tensor = reader.read(name)
                    if name in self.updates:
                        original, source_shapes = self.updates[name]
                        parts = [
                            self.deltas.delta(c, key) if key in self.deltas.targets.get(c, {}) else torch.zeros(shape)
                            for (c, key), shape in zip(original.sources, source_shapes)
                        ]
                        tensor = tensor.float() + original.build(parts)
                        self.merged += 1
                    return tensor.to(self._out_dtype(self.tensors[name]))

                with atomic_path(self.output) as tmp:
                    return write_safetensors_streaming(tmp, entries, tensor_for, metadata)
        finally:
            torch.set_num_threads(threads)


@dataclasses.dataclass
class FolderTwin:
    """A single-file base saved as a temporary diffusers folder (removed by :meth:`cleanup`)."""

    folder: Path
    _tmp: tempfile.TemporaryDirectory

    def cleanup(self) -> None:
        self._tmp.cleanup()


def folder_twin(base: Path, base_config: str | None, beside: Path) -> FolderTwin:
    """Load the single file's components (the others from --base_config) and save them as a diffusers folder
    in a temporary folder beside ``beside`` (the output's folder: the same disk)."""
    family, config_dir = single_file_family_and_config(base, base_config, weights=True)
    _, components, model_index = load_single_file_components(base, config_dir)
    tmp = tempfile.TemporaryDirectory(prefix=".moslora-base-", dir=beside)
    folder = Path(tmp.name) / "base"
    family.build_pipeline(components, model_index).save_pretrained(folder, safe_serialization=True)
    return FolderTwin(folder, tmp)
