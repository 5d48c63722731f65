"""Check a run's inputs against the file system and resolve them, before any model is loaded or file written.

    config = parse_run_config(argv)                  # flags and --config (no file read but the config)
    config, inputs = resolve_run_inputs(config)      # the output folder, the base, the images, the checkpoint

:class:`RunInputs` holds what was resolved (the base and its family, the image list, the checkpoint to
resume); the returned :class:`RunConfig` is the given one with what the inputs fix filled in (the seed of
a resumed run, the logger). Every failure is a :class:`UsageError` with one line, and nothing is written.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import secrets
from dataclasses import dataclass
from pathlib import Path

from .base_model import BaseModel, resolve_base_model
from .checkpoints import read_training_state, resolve_resume_checkpoint
from .config import DEFAULT_PROG, RunConfig, UsageError, is_hub_id, parse_run_config
from .data import read_training_images
from .guards import LOCK_NAME, refuse_earlier_run_outputs

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunInputs:
    """What the run's paths and names resolved to."""

    base: BaseModel  # the base pipeline's source and family (weights not loaded yet)
    dataset_specs: tuple  # DatasetSpec per dataset: the flags' one, or --dataset_config's
    images: tuple  # ImageRecord per readable training image (captions, sizes, masks); buckets not chosen yet
    resume_checkpoint: Path | None  # the checkpoint-<step> folder --resume_from_checkpoint names

    @property
    def instance_images(self) -> tuple[Path, ...]:
        """The training (not prior-preservation) images, in dataset order."""
        return tuple(record.path for record in self.images if not record.subset.is_reg)


def parse_run(argv: list[str] | None = None, prog: str = DEFAULT_PROG) -> tuple[RunConfig, RunInputs]:
    """Flags, --config and every input checked: what the recipe runs on. Raises UsageError; writes nothing."""
    return resolve_run_inputs(parse_run_config(argv, prog))


def resolve_run_inputs(config: RunConfig) -> tuple[RunConfig, RunInputs]:
    """Check the output folder, find the resume checkpoint, resolve the base (its family), list the images."""
    _check_output_dir_is_a_folder(config.output_dir)
    resume_checkpoint, seed = None, config.seed
    if config.resume_from_checkpoint:
        try:
            resume_checkpoint = resolve_resume_checkpoint(config.output_dir, config.resume_from_checkpoint)
        except ValueError as err:
            raise UsageError(str(err)) from None
        if seed is None:
            seed = read_training_state(resume_checkpoint).get("seed")
    if not may_replace_earlier_run(config, resume_checkpoint) and not (Path(config.output_dir) / LOCK_NAME).exists():
        # At once, not after seconds of imports; a locked folder is the lock's to refuse (another run is live).
        try:
            refuse_earlier_run_outputs(config.output_dir)
        except ValueError as err:
            raise UsageError(str(err)) from None

    try:
        base = resolve_base_model(config.pretrained_model_name_or_path, revision=config.revision)
    except ValueError as err:
        raise UsageError(str(err)) from None
    vae = config.pretrained_vae_model_name_or_path
    if vae and not (Path(vae).is_dir() or is_hub_id(vae)):
        raise UsageError(f"--pretrained_vae_model_name_or_path '{vae}' does not exist")

    family = base.family
    if config.resolution is not None and config.resolution % family.resolution_multiple:
        raise UsageError(
            f"--resolution {config.resolution} must be a multiple of {family.resolution_multiple} for {family.name}"
        )
    specs, images = read_training_images(config, family)
    if config.with_prior_preservation:
        if Path(config.class_data_dir).exists() and not Path(config.class_data_dir).is_dir():
            raise UsageError(f"--class_data_dir '{config.class_data_dir}' is not a folder")
    elif config.class_data_dir or config.class_prompt:
        logger.warning("--class_data_dir / --class_prompt are ignored without --with_prior_preservation")
    if config.use_8bit_adam and importlib.util.find_spec("bitsandbytes") is None:
        raise UsageError("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes (or drop the flag)")
    report_to = config.report_to
    if report_to is None:
        report_to = "tensorboard" if _tensorboard_available() else "none"
    elif report_to == "tensorboard" and not _tensorboard_available():
        raise UsageError("--report_to tensorboard needs tensorboard: pip install tensorboard (or --report_to none)")
    if family.objective == "flow_matching" and (config.snr_gamma or config.noise_offset):
        logger.warning(
            "--snr_gamma and --noise_offset apply to noise prediction; %s trains with flow matching and ignores them",
            family.name,
        )

    if seed is None:
        # Each process draws one; the recipe keeps the main process's (and checkpoints record it).
        seed = secrets.randbelow(2**31)
    validation_prompt = config.validation_prompt or _first_training_caption(images)
    config = dataclasses.replace(config, seed=seed, report_to=report_to, validation_prompt=validation_prompt)
    return config, RunInputs(base, specs, tuple(images), resume_checkpoint)


def _first_training_caption(images) -> str:
    """--validation_prompt's default with --dataset_config: the first concept's class_tokens, else a caption."""
    training = [record for record in images if not record.subset.is_reg]
    return next((r.subset.class_tokens for r in training if r.subset.class_tokens), training[0].caption)


def may_replace_earlier_run(config: RunConfig, resume_checkpoint: Path | None) -> bool:
    """Whether the run may write over what an earlier run left in --output_dir: it continues that run, or
    --overwrite_output_dir says so."""
    return config.overwrite_output_dir or resume_checkpoint is not None


def _check_output_dir_is_a_folder(output_dir: str) -> None:
    """An --output_dir that is a file (or lies under one) fails here, in one line, not at the first write."""
    path = Path(output_dir)
    for existing in (path, *path.parents):
        if existing.exists():
            if existing.is_dir():
                return
            where = "is a file" if existing == path else f"lies under a file ('{existing}')"
            raise UsageError(
                f"--output_dir '{output_dir}' {where}; give a folder (a new one, or an earlier run's to resume)"
            )


def _tensorboard_available() -> bool:
    return importlib.util.find_spec("tensorboard") is not None
