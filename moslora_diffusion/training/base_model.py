"""The base pipeline to train on: a diffusers folder, a hub id, or ``tiny:<family>`` (offline smoke base).

:func:`resolve_base_model` only reads model_index.json (to check the path and find the family), so bad
input fails before anything is loaded or written; :meth:`BaseModel.load_components` loads the weights.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..families import Family, family_of_model_dir, family_of_model_index, get_family

TINY_PREFIX = "tiny:"
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


@dataclass
class BaseModel:
    source: str  # as given: folder, hub id, or tiny:<family>
    family: type[Family]
    model_index: dict = field(default_factory=dict)  # model_index.json ({} for a tiny base)

    @property
    def is_tiny(self) -> bool:
        return self.source.startswith(TINY_PREFIX)

    def default_resolution(self, components: dict[str, Any]) -> int:
        """The base's own training resolution (what --resolution defaults to)."""
        if self.is_tiny:
            from ..testing import default_tiny_resolution

            return default_tiny_resolution(self.family.name)
        return self.family.native_resolution(components)

    def load_components(self, *, revision=None, variant=None, vae_source=None) -> dict[str, Any]:
        """Every component training and sampling need (tokenizers, text encoders, VAE, denoiser, scheduler)."""
        if self.is_tiny:
            from diffusers import AutoencoderKL

            from ..testing import make_tiny_pipeline

            components = dict(make_tiny_pipeline(self.family.name).components)
            if vae_source:
                components["vae"] = AutoencoderKL.from_pretrained(vae_source, revision=revision, use_safetensors=True)
            return components
        return self.family.load_components(self.source, self.model_index, revision=revision, variant=variant, vae_source=vae_source)

    def build_pipeline(self, components: dict[str, Any]):
        return self.family.build_pipeline(components, self.model_index)


def resolve_base_model(value: str, revision: str | None = None) -> BaseModel:
    """Check ``--pretrained_model_name_or_path`` and find its family; ValueError with a one-line reason."""
    flag = "--pretrained_model_name_or_path"
    if value.startswith(TINY_PREFIX):
        from ..testing import FAMILIES

        name = value[len(TINY_PREFIX) :]
        if name not in FAMILIES:
            raise ValueError(f"{flag} '{value}': no tiny pipeline of that family; choose tiny:{', tiny:'.join(FAMILIES)}")
        return BaseModel(value, get_family(name))
    path = Path(value).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ValueError(f"{flag} '{value}' is not a diffusers pipeline folder (no model_index.json)")
        try:
            family = family_of_model_dir(path)
        except ValueError as err:
            raise ValueError(f"{flag} '{value}': {err}") from None
        return BaseModel(str(path), family, json.loads((path / "model_index.json").read_text()))
    if path.exists():
        raise ValueError(f"{flag} '{value}' is a file; give a diffusers pipeline folder (single-file checkpoints are not supported)")
    if not _HUB_ID.fullmatch(value):
        raise ValueError(f"{flag} '{value}' does not exist (give a diffusers pipeline folder, a hub id or tiny:sd15)")
    return _resolve_hub_model(value, revision)


def _resolve_hub_model(repo_id: str, revision: str | None) -> BaseModel:
    from huggingface_hub import hf_hub_download

    try:
        index_path = Path(hf_hub_download(repo_id, "model_index.json", revision=revision))
        index = json.loads(index_path.read_text())
        unet_config = None
        if "unet" in index:
            unet_config = json.loads(Path(hf_hub_download(repo_id, "unet/config.json", revision=revision)).read_text())
        family = family_of_model_index(index, unet_config)
    except ValueError as err:
        raise ValueError(f"--pretrained_model_name_or_path '{repo_id}': {err}") from None
    except Exception as err:  # offline, missing repo, gated model: huggingface_hub has many error types
        reason = " ".join(str(err).split())[:200]
        raise ValueError(
            f"--pretrained_model_name_or_path '{repo_id}' is neither a local folder nor a reachable hub pipeline ({reason})"
        ) from None
    return BaseModel(repo_id, family, index)
