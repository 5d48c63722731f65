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
from .init_lora import InitLoRA, read_init_lora
from .optimizers import check_optimizer_args, missing_package, parse_optimizer_args
from .quantization import BaseQuantization, resolve_quantization
from .validation import read_prompts_file

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunInputs:
    """What the run's paths and names resolved to."""

    base: BaseModel  # the base pipeline's source and family (weights not loaded yet)
    dataset_specs: tuple  # DatasetSpec per dataset: the flags' one, or --dataset_config's
    images: tuple  # ImageRecord per readable training image (captions, sizes, masks); buckets not chosen yet
    resume_checkpoint: Path | None  # the checkpoint-<step> folder --resume_from_checkpoint names
    init_lora: InitLoRA | None = None  # the LoRA --init_lora names, read and checked against the family
    quantization: BaseQuantization | None = None  # --quantize_base, its backend resolved and installed

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
        base = resolve_base_model(
            config.pretrained_model_name_or_path, revision=config.revision, base_config=config.base_config
        )
    except ValueError as err:
        raise UsageError(str(err)) from None
    vae = config.pretrained_vae_model_name_or_path
    if vae and not (Path(vae).is_dir() or is_hub_id(vae)):
        raise UsageError(f"--pretrained_vae_model_name_or_path '{vae}' does not exist")

    family = base.family
    init_lora = None
    if config.init_lora:
        try:
            init_lora = read_init_lora(config.init_lora, family)
        except ValueError as err:
            raise UsageError(str(err)) from None
        config = _with_init_lora_rank_and_alpha(config, init_lora)
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
    _check_optimizer(config)
    if config.validation_resolution is not None and any(
        side % family.resolution_multiple for side in config.validation_resolution
    ):
        width, height = config.validation_resolution
        raise UsageError(
            f"--validation_resolution {width}x{height}: both sides must be multiples of "
            f"{family.resolution_multiple} for {family.name}"
        )
    validation_prompts = config.validation_prompt
    if config.validation_prompts_file:
        try:
            validation_prompts += read_prompts_file(config.validation_prompts_file)
        except ValueError as err:
            raise UsageError(str(err)) from None
    try:
        quantization = resolve_quantization(
            config.quantize_base, config.quantization_backend, config.quantize_text_encoders, _cuda_available()
        )
    except ValueError as err:
        raise UsageError(str(err)) from None
    if quantization is not None and base.is_gguf:
        if not quantization.text_encoders:
            raise UsageError(
                f"--pretrained_model_name_or_path {base.source} is a GGUF file, quantized already; leave "
                "--quantize_base out (or add --quantize_text_encoders to quantize only the frozen text encoders)"
            )
        # The GGUF denoiser keeps its own blocks; --quantize_base KIND applies to the frozen text encoders.
        quantization = dataclasses.replace(quantization, denoiser=False)
    report_to = config.report_to
    if report_to is None:
        report_to = "tensorboard" if _tensorboard_available() else "none"
    elif report_to == "tensorboard" and not _tensorboard_available():
        raise UsageError("--report_to tensorboard needs tensorboard: pip install tensorboard (or --report_to none)")
    if config.train_text_encoder and not family.trainable_text_encoders:
        logger.warning(
            "--train_text_encoder: %s's text encoders stay frozen, as in diffusers' scripts (none can be trained here)",
            family.name,
        )
    if family.objective == "flow_matching" and (config.snr_gamma or config.noise_offset):
        logger.warning(
            "--snr_gamma and --noise_offset apply to noise prediction; %s trains with flow matching and ignores them",
            family.name,
        )

    if seed is None:
        # Each process draws one; the recipe keeps the main process's (and checkpoints record it).
        seed = secrets.randbelow(2**31)
    if not validation_prompts:  # no --instance_prompt with --dataset_config: the first concept's words
        validation_prompts = (_first_training_caption(images),)
    config = dataclasses.replace(config, seed=seed, report_to=report_to, validation_prompt=validation_prompts)
    return config, RunInputs(
        base, specs, tuple(images), resume_checkpoint, init_lora=init_lora, quantization=quantization
    )


def _first_training_caption(images) -> str:
    """--validation_prompt's default with --dataset_config: the first concept's class_tokens, else a caption."""
    training = [record for record in images if not record.subset.is_reg]
    return next((r.subset.class_tokens for r in training if r.subset.class_tokens), training[0].caption)


def _with_init_lora_rank_and_alpha(config: RunConfig, init_lora: InitLoRA) -> RunConfig:
    """--rank and --lora_alpha from the --init_lora file; given ones must agree with it (the denoiser's most
    common rank, and the alpha of its most common scale at that rank)."""
    for name, value in (("rank", init_lora.rank), ("lora_alpha", init_lora.lora_alpha)):
        given = getattr(config, name)
        if given is not None and float(given) != float(value):
            raise UsageError(
                f"--{name} {given:g} disagrees with --init_lora {config.init_lora}, whose {name} is {value:g}; "
                f"leave --{name} out to train with the file's"
            )
    return dataclasses.replace(config, rank=init_lora.rank, lora_alpha=init_lora.lora_alpha)


def _check_optimizer(config: RunConfig) -> None:
    """The optimizer's package is installed and takes --optimizer_args (UsageError), and Prodigy's LR is near 1."""
    missing = missing_package(config.optimizer)
    if missing:
        raise UsageError(missing)
    try:
        check_optimizer_args(config.optimizer, parse_optimizer_args(config.optimizer_args))
    except ValueError as err:
        raise UsageError(str(err)) from None
    if config.optimizer == "prodigy" and not 0.1 <= config.learning_rate <= 10:
        logger.warning(
            "--optimizer prodigy estimates the step size itself and expects --learning_rate near 1.0 (a multiplier), "
            "got %g: training will barely move (or diverge)",
            config.learning_rate,
        )


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


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _tensorboard_available() -> bool:
    return importlib.util.find_spec("tensorboard") is not None
