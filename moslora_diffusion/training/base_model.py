"""The base pipeline to train on: a diffusers folder, a hub id, a single-file ``.safetensors`` checkpoint
(with ``--base_config``), or ``tiny:<family>`` (offline smoke base).

:func:`resolve_base_model` only reads model_index.json, or a single file's header (to check the path and
find the family), so bad input fails before anything is loaded or written; :meth:`BaseModel.load_components`
loads the weights.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..families import FAMILIES, Family, family_of_model_dir, family_of_model_index, get_family
from .config import is_hub_id

TINY_PREFIX = "tiny:"
_FLAG = "--pretrained_model_name_or_path"
_HUB_TIMEOUT_S = 10  # one request, no retries: a mistyped id must not wait through huggingface_hub's backoff


@dataclass
class BaseModel:
    source: str  # as given: folder, hub id, or tiny:<family>
    family: type[Family]
    model_index: dict = field(default_factory=dict)  # model_index.json ({} for a tiny base)
    # A single-file base: the diffusers folder or hub id supplying its configs, tokenizers and other components.
    base_config: str | None = None

    @property
    def is_tiny(self) -> bool:
        return self.source.startswith(TINY_PREFIX)

    @property
    def is_single_file(self) -> bool:
        return self.base_config is not None

    @property
    def is_gguf(self) -> bool:
        """A ``.gguf`` denoiser: quantized in its file already (:mod:`moslora_diffusion.gguf_bases`)."""
        from ..gguf_bases import is_gguf_file

        return self.is_single_file and is_gguf_file(self.source)

    def default_resolution(self, components: dict[str, Any]) -> int:
        """The base's own training resolution (what --resolution defaults to)."""
        if self.is_tiny:
            from ..tiny import default_tiny_resolution

            return default_tiny_resolution(self.family.name)
        return self.family.native_resolution(components)

    def load_components(
        self,
        *,
        revision=None,
        variant=None,
        vae_source=None,
        quantization=None,
        torch_dtype=None,
        trained_text_encoders=(),
    ) -> dict[str, Any]:
        """Every component training and sampling need (tokenizers, text encoders, VAE, denoiser, scheduler).

        ``quantization`` (a :class:`~.quantization.BaseQuantization`) loads the denoiser (and frozen text
        encoders) quantized, their other weights in ``torch_dtype``.

        A single-file base's components come from the file where it holds them, the others (and every config
        and tokenizer) from ``base_config``; ValueError with one line if they cannot be fetched or built. A GGUF
        denoiser keeps its quantized blocks and computes in ``torch_dtype``.
        """
        if self.is_tiny or self.is_single_file:
            if self.is_tiny:
                from ..tiny import make_tiny_pipeline

                components = dict(make_tiny_pipeline(self.family.name).components)
            else:
                from ..single_file_bases import base_config_folder, load_single_file_components

                folder = base_config_folder(self.base_config, self.source, revision=revision)
                _, components, _ = load_single_file_components(self.source, folder, compute_dtype=torch_dtype)
            if vae_source:
                from diffusers import AutoencoderKL

                components["vae"] = AutoencoderKL.from_pretrained(vae_source, revision=revision, use_safetensors=True)
            if quantization is not None:
                _quantize_in_memory(components, self.family, quantization, torch_dtype, trained_text_encoders)
        else:
            components = self.family.load_components(
                self.source,
                self.model_index,
                revision=revision,
                variant=variant,
                vae_source=vae_source,
                component_kwargs=quantized_load_kwargs(
                    self.family, self.model_index, quantization, torch_dtype, trained_text_encoders
                ),
            )
        if self.is_gguf:
            from ..gguf_bases import dequantize_again_in_backward

            dequantize_again_in_backward(components[self.family.denoiser])
        if quantization is not None and quantization.backend == "quanto":
            from .quantization import contiguous_quanto_inputs

            for model in components.values():
                contiguous_quanto_inputs(model)
        return components

    def build_pipeline(self, components: dict[str, Any]):
        return self.family.build_pipeline(components, self.model_index)


def quantized_load_kwargs(family, model_index: dict, quantization, torch_dtype, trained_text_encoders) -> dict:
    """``from_pretrained`` keyword arguments per component for a quantized base ({} without quantization)."""
    if quantization is None:
        return {}
    import importlib

    kwargs = {}
    for name in quantization.components(family, trained_text_encoders, list(model_index)):
        library, class_name = model_index[name]
        model_cls = getattr(importlib.import_module(library), class_name)
        config = quantization.config_for(model_cls, torch_dtype)
        kwargs[name] = {"quantization_config": config, "torch_dtype": torch_dtype}
    return kwargs


def _quantize_in_memory(components: dict, family, quantization, torch_dtype, trained_text_encoders) -> None:
    """A tiny base quantized as a real one is: each chosen model saved and loaded back with its config."""
    import tempfile

    present = [name for name, model in components.items() if model is not None]
    with tempfile.TemporaryDirectory() as folder:
        for name in quantization.components(family, trained_text_encoders, present):
            model = components[name]
            model.save_pretrained(f"{folder}/{name}")
            config = quantization.config_for(type(model), torch_dtype)
            components[name] = type(model).from_pretrained(
                f"{folder}/{name}", quantization_config=config, torch_dtype=torch_dtype
            )


def resolve_base_model(value: str, revision: str | None = None, base_config: str | None = None) -> BaseModel:
    """Check ``--pretrained_model_name_or_path`` (and ``--base_config``) and find the family; ValueError with a
    one-line reason."""
    path = Path(value).expanduser()
    if path.is_file():
        return _resolve_single_file(value, base_config, revision)
    if base_config is not None:
        raise ValueError(
            f"--base_config completes a single-file checkpoint, but {_FLAG} '{value}' is not a file; "
            "leave --base_config out"
        )
    if value.startswith(TINY_PREFIX):
        name = value[len(TINY_PREFIX) :]
        if name not in FAMILIES:
            choices = ", ".join(f"{TINY_PREFIX}{family}" for family in FAMILIES)
            raise ValueError(f"{_FLAG} '{value}': no tiny pipeline of that family; choose {choices}")
        return BaseModel(value, get_family(name))
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ValueError(f"{_FLAG} '{value}' is not a diffusers pipeline folder (no model_index.json)")
        try:
            family = family_of_model_dir(path)
        except ValueError as err:
            raise ValueError(f"{_FLAG} '{value}': {err}") from None
        return BaseModel(str(path), family, json.loads((path / "model_index.json").read_text()))
    if not is_hub_id(value):
        raise ValueError(f"{_FLAG} '{value}' does not exist (give a diffusers pipeline folder, a hub id or tiny:sd15)")
    return _resolve_hub_model(value, revision)


def _resolve_single_file(value: str, base_config: str | None, revision: str | None) -> BaseModel:
    """A single-file checkpoint: its family from the tensor names (header only), and a --base_config of that
    family (given, or the family's reference hub repository)."""
    from ..single_file_bases import read_single_file_family

    try:
        family = get_family(read_single_file_family(value)[0])
    except ValueError as err:
        raise ValueError(f"{_FLAG} {err}") from None
    source = base_config or family.reference_repository
    config_path = Path(source).expanduser()
    if config_path.is_dir():
        if not (config_path / "model_index.json").is_file():
            raise ValueError(f"--base_config '{source}' is not a diffusers pipeline folder (no model_index.json)")
        try:
            config_family = family_of_model_dir(config_path)
        except ValueError as err:
            raise ValueError(f"--base_config '{source}': {err}") from None
        model_index = json.loads((config_path / "model_index.json").read_text())
    elif config_path.exists() or not is_hub_id(source):
        raise ValueError(
            f"--base_config '{source}' is neither a diffusers pipeline folder nor a hub id; give a {family.name} one"
        )
    else:
        try:
            hub = _resolve_hub_model(source, revision, flag="--base_config")
        except ValueError:
            if base_config is not None:
                raise
            raise ValueError(
                f"{_FLAG} '{value}' is a {family.name} single file; its configs and tokenizers come from "
                f"--base_config, by default the hub repository {source}, which could not be fetched (offline, "
                f"or a gated repository): pass --base_config DIR, a local {family.name} diffusers folder"
            ) from None
        config_family, model_index = hub.family, hub.model_index
    if config_family is not family:
        raise ValueError(
            f"{_FLAG} '{value}' is a {family.name} checkpoint but --base_config '{source}' is a "
            f"{config_family.name} model; give a {family.name} folder or hub id"
        )
    return BaseModel(str(Path(value).expanduser()), family, model_index, base_config=source)


def _resolve_hub_model(repo_id: str, revision: str | None, flag: str = _FLAG) -> BaseModel:
    """A hub pipeline's family, from its cached model_index.json, else after one quick check that the
    repository can be reached (huggingface_hub's downloads retry five times over half a minute)."""
    if _hub_download(repo_id, "model_index.json", revision, local_files_only=True) is None:
        _check_hub_repository(repo_id, revision, flag)
    try:
        index = json.loads(_hub_download(repo_id, "model_index.json", revision).read_text())
        unet_config = None
        if "unet" in index:
            unet_config = json.loads(_hub_download(repo_id, "unet/config.json", revision).read_text())
        family = family_of_model_index(index, unet_config)
    except ValueError as err:
        raise ValueError(f"{flag} '{repo_id}': {err}") from None
    except Exception as err:  # noqa: BLE001 - huggingface_hub has many error types (gated model, missing file)
        reason = _one_line(err)
        raise ValueError(
            f"{flag} '{repo_id}': a hub pipeline whose model_index.json cannot be read ({reason})"
        ) from None
    return BaseModel(repo_id, family, index)


def _hub_download(repo_id: str, filename: str, revision: str | None, local_files_only: bool = False) -> Path | None:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision, local_files_only=local_files_only))
    except LocalEntryNotFoundError:
        if local_files_only:
            return None
        raise


def _check_hub_repository(repo_id: str, revision: str | None, flag: str = _FLAG) -> None:
    """ValueError at once if ``repo_id`` cannot be fetched: offline mode, no network, or no such repository."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    missing = f"{flag} '{repo_id}' is neither a local folder nor a file, and as a Hub id it could not be fetched"
    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        raise ValueError(f"{missing} (offline: HF_HUB_OFFLINE is set and it is not in the local cache)")
    try:
        HfApi().model_info(repo_id, revision=revision, timeout=_HUB_TIMEOUT_S)
    except RevisionNotFoundError:
        raise ValueError(f"{missing} (no revision '{revision}' in that repository)") from None
    except RepositoryNotFoundError:
        raise ValueError(
            f"{missing} (no such repository, or a private one: check the name, or log in with `hf auth login`)"
        ) from None
    except Exception as err:  # noqa: BLE001 - no network, a timeout, a proxy error
        raise ValueError(f"{missing} (offline, or no such repository: {_one_line(err)})") from None


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())[:200] or type(err).__name__
