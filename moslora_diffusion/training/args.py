"""Command-line flags of the DreamBooth trainer (named as in diffusers' train_dreambooth_lora_*.py), the
``--config FILE`` merge, and the checks that run before anything is written.

A config file (TOML or YAML) holds the same keys as the flags, without the dashes; flags given on the
command line override it. Input paths in a config file (data folders, a base-model folder) are relative
to the file, so ``--config samples/dreambooth_tiny.toml`` works from any folder; ``output_dir`` is
relative to the current folder, like the flag.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import re
import secrets
import sys
from pathlib import Path

from ..choices import MIXER_INITS, WEIGHTING_SCHEMES
from ..targets import PRESET_NAMES, parse_target_modules

# Only light modules are imported here: --help and flag errors answer before torch loads. check_args
# imports what reads the base model, the images and checkpoints.

logger = logging.getLogger(__name__)


class UsageError(ValueError):
    """Bad input from the user: the trainer prints the one-line message and exits with status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of argparse's usage block and sys.exit
        raise UsageError(f"{message} (see --help)")


_BOOL = argparse.BooleanOptionalAction


def build_parser(prog: str = "train_dreambooth_moslora.py") -> argparse.ArgumentParser:
    parser = _Parser(
        prog=prog,
        description="DreamBooth training of a MoSLoRA adapter for SD 1.x, SD 2.x, SDXL, SD3 or Flux; "
        "writes the adapter as native MoSLoRA, plain diffusers LoRA and kohya LoRA files.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add("--config", default=None, help="TOML or YAML file with the same keys as these flags; flags override it.")

    group = parser.add_argument_group("base model")
    add = group.add_argument
    add("--pretrained_model_name_or_path", default=None,
        help="Diffusers pipeline folder or hub id (family read from model_index.json), or tiny:<sd15|sd2|sdxl|sd3|flux> "
        "for a tiny random offline pipeline (smoke runs).")
    add("--pretrained_vae_model_name_or_path", default=None, help="A standalone VAE to use instead of the pipeline's (e.g. SDXL's fp16 fix).")
    add("--revision", default=None, help="Hub revision of the base model.")
    add("--variant", default=None, help="Weight variant of the base model files, e.g. fp16.")

    group = parser.add_argument_group("data")
    add = group.add_argument
    add("--instance_data_dir", default=None, help="Folder with the images of your subject.")
    add("--instance_prompt", default=None, help="Prompt naming the subject with its identifier, e.g. 'a photo of sks dog'.")
    add("--class_data_dir", default=None, help="Folder of class images for prior preservation (missing ones are generated).")
    add("--class_prompt", default=None, help="Prompt for the class images, e.g. 'a photo of a dog'.")
    add("--with_prior_preservation", action=_BOOL, default=False, help="Add the prior-preservation loss on class images.")
    add("--prior_loss_weight", type=float, default=1.0, help="Weight of the prior-preservation loss.")
    add("--num_class_images", type=int, default=100, help="Class images to have in --class_data_dir; missing ones are generated.")
    add("--sample_batch_size", type=int, default=4, help="Batch size when generating class images.")
    add("--resolution", type=int, default=None, help="Training resolution (square); default: the base's own (512 for SD 1.5, 1024 for SDXL, ...).")
    add("--center_crop", action=_BOOL, default=False, help="Crop the centre instead of a random square.")
    add("--random_flip", action=_BOOL, default=False, help="Flip images horizontally at random.")
    add("--cache_latents", action=_BOOL, default=False, help="Encode the images with the VAE once (the posterior, sampled per step).")
    add("--dataloader_num_workers", type=int, default=0, help="Data loading worker processes (0: in the main process).")

    group = parser.add_argument_group("adapter (MoSLoRA)")
    add = group.add_argument
    add("--rank", type=int, default=4, help="LoRA rank r (the mixer is r x r).")
    add("--lora_alpha", type=float, default=None, help="LoRA alpha; scale s = alpha / r. Default: the rank (s = 1).")
    add("--lora_dropout", type=float, default=0.0, help="Dropout on the adapter input.")
    add("--use_rslora", action=_BOOL, default=False, help="Rank-stabilised scaling s = alpha / sqrt(r).")
    add("--mixer_init", choices=MIXER_INITS, default="kaiming", help="Initialisation of the r x r mixer M.")
    add("--freeze_mixer", action=_BOOL, default=False, help="Keep M fixed (identity + frozen is plain LoRA, the baseline).")
    add("--target_modules", default="attention",
        help=f"Denoiser modules to adapt: a preset ({', '.join(PRESET_NAMES)}) or comma-separated module names.")
    add("--text_encoder_target_modules", default=None,
        help="Text-encoder modules with --train_text_encoder: a preset or names. Default: --target_modules if it is a preset, else 'attention'.")

    group = parser.add_argument_group("training")
    add = group.add_argument
    add("--output_dir", default="moslora-dreambooth-model", help="Where checkpoints, adapter files, images and the model card go.")
    add("--seed", type=int, default=None, help="Seed for a reproducible run (default: random, recorded in checkpoints).")
    add("--train_text_encoder", action=_BOOL, default=False, help="Also train adapters on the CLIP text encoder(s).")
    add("--train_batch_size", type=int, default=1, help="Instance images per step and process (class images come on top).")
    add("--max_train_steps", type=int, default=None, help="Optimizer steps; overrides --num_train_epochs.")
    add("--num_train_epochs", type=int, default=1, help="Epochs, when --max_train_steps is not given.")
    add("--gradient_accumulation_steps", type=int, default=1, help="Batches per optimizer step.")
    add("--gradient_checkpointing", action=_BOOL, default=False, help="Recompute activations in the backward pass to save memory.")
    add("--learning_rate", type=float, default=1e-4, help="Learning rate of the denoiser's adapter.")
    add("--text_encoder_lr", type=float, default=5e-6, help="Learning rate of the text encoders' adapters.")
    add("--scale_lr", action=_BOOL, default=False, help="Multiply learning rates by batch size, accumulation steps and processes.")
    add("--lr_scheduler", default="constant",
        choices=["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"], help="LR schedule.")
    add("--lr_warmup_steps", type=int, default=0, help="Warm-up steps of the LR schedule.")
    add("--lr_num_cycles", type=int, default=1, help="Cycles of cosine_with_restarts.")
    add("--lr_power", type=float, default=1.0, help="Power of the polynomial schedule.")
    add("--use_8bit_adam", action=_BOOL, default=False, help="8-bit AdamW from bitsandbytes (must be installed).")
    add("--adam_beta1", type=float, default=0.9)
    add("--adam_beta2", type=float, default=0.999)
    add("--adam_weight_decay", type=float, default=1e-4, help="Weight decay of the denoiser's adapter.")
    add("--adam_weight_decay_text_encoder", type=float, default=1e-3, help="Weight decay of the text encoders' adapters.")
    add("--adam_epsilon", type=float, default=1e-8)
    add("--max_grad_norm", type=float, default=1.0, help="Gradient clipping norm.")
    add("--mixed_precision", choices=["no", "fp16", "bf16"], default=None,
        help="Frozen weights in this precision, adapters in fp32 (default: accelerate's config).")
    add("--allow_tf32", action=_BOOL, default=False, help="Allow TF32 matmuls on Ampere GPUs.")
    add("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # torch.distributed.launch passes it

    group = parser.add_argument_group("objective")
    add = group.add_argument
    add("--snr_gamma", type=float, default=None, help="Min-SNR weighting gamma (epsilon / v-prediction families; 5.0 is usual).")
    add("--noise_offset", type=float, default=0.0, help="Noise offset (epsilon / v-prediction families).")
    add("--weighting_scheme", choices=WEIGHTING_SCHEMES, default=None,
        help="Flow matching (SD3/Flux) timestep density and loss weighting; default as diffusers' scripts (SD3 logit_normal, Flux none).")
    add("--logit_mean", type=float, default=0.0, help="Mean of logit_normal timestep sampling.")
    add("--logit_std", type=float, default=1.0, help="Std of logit_normal timestep sampling.")
    add("--mode_scale", type=float, default=1.29, help="Scale of mode timestep sampling.")
    add("--precondition_outputs", action=_BOOL, default=False, help="Flow matching: regress x_0 from preconditioned outputs (SD3 paper).")
    add("--guidance_scale", type=float, default=3.5, help="Flux: the guidance value fed to a guidance-distilled transformer.")
    add("--max_sequence_length", type=int, default=None, help="T5 prompt length (SD3 77, Flux 512, capped by the tokenizer).")

    group = parser.add_argument_group("validation, checkpoints and logging")
    add = group.add_argument
    add("--validation_prompt", default=None, help="Prompt of the validation images (default: --instance_prompt).")
    add("--num_validation_images", type=int, default=4, help="Validation images per validation run.")
    add("--validation_steps", type=int, default=100, help="Validate every this many steps (and always at the end).")
    add("--validation_at_start", action=_BOOL, default=False,
        help="Also validate before the first step (validation/step_000000.png: the base alone), for a before/after pair.")
    add("--num_inference_steps", type=int, default=None, help="Sampling steps for validation and class images (default: the pipeline's).")
    add("--checkpointing_steps", type=int, default=500, help="Save a resumable checkpoint every this many steps.")
    add("--checkpoints_total_limit", type=int, default=None, help="Keep at most this many checkpoints (oldest deleted).")
    add("--resume_from_checkpoint", default=None, help="'latest', or a checkpoint-<step> folder, to continue a run exactly.")
    add("--report_to", default=None, choices=["tensorboard", "none"],
        help="Where to log losses and images (default: tensorboard when installed).")
    add("--logging_dir", default="logs", help="TensorBoard folder, relative to --output_dir.")
    return parser


_INPUT_PATH_KEYS = ("instance_data_dir", "class_data_dir", "pretrained_model_name_or_path", "pretrained_vae_model_name_or_path")


def load_config_file(path: str | os.PathLike) -> dict:
    """The flags set in a TOML or YAML file, as a dict keyed by flag name."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--config '{path}': no such file")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib
            values = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            import yaml

            values = yaml.safe_load(text) or {}
        else:
            raise UsageError(f"--config '{path}': expected a .toml, .yaml or .yml file")
    except UsageError:
        raise
    except Exception as err:  # tomllib.TOMLDecodeError, yaml.YAMLError
        raise UsageError(f"--config '{path}': cannot parse ({' '.join(str(err).split())})") from None
    if not isinstance(values, dict):
        raise UsageError(f"--config '{path}': expected keys and values at the top level")
    return {str(key).replace("-", "_"): value for key, value in values.items()}


def _config_to_argv(parser: argparse.ArgumentParser, values: dict, config_path: Path) -> list[str]:
    actions = {action.dest: action for action in parser._actions if action.option_strings}
    argv: list[str] = []
    for key, value in values.items():
        if key not in actions or key == "config":
            close = difflib.get_close_matches(key, list(actions), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise UsageError(f"--config '{config_path}': unknown key '{key}'{hint}")
        if value is None:
            continue
        if key in _INPUT_PATH_KEYS and isinstance(value, str) and not value.startswith("tiny:") and not Path(value).is_absolute():
            relative = config_path.parent / value
            # Data folders are always relative to the file; a base model only if it is there (else a hub id).
            if key.endswith("data_dir") or relative.exists():
                value = str(relative)
        if isinstance(actions[key], argparse.BooleanOptionalAction):
            if not isinstance(value, bool):
                raise UsageError(f"--config '{config_path}': '{key}' must be true or false, got {value!r}")
            argv.append(f"--{key}" if value else f"--no-{key}")
        elif isinstance(value, (list, tuple)):
            argv += [f"--{key}", ",".join(str(v) for v in value)]
        else:
            argv += [f"--{key}", str(value)]
    return argv


def parse_args(argv: list[str] | None = None, prog: str = "train_dreambooth_moslora.py") -> argparse.Namespace:
    """Parse flags (merged over ``--config``), check every input, and resolve defaults. Writes nothing.

    Raises :class:`UsageError` with a one-line message for anything a user has to fix.
    """
    parser = build_parser(prog)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    config_argv = []
    if known.config:
        config_argv = _config_to_argv(parser, load_config_file(known.config), Path(known.config))
    args = parser.parse_args(config_argv + list(argv if argv is not None else sys.argv[1:]))
    check_args(args)
    return args


def _require(args, name: str, why: str) -> None:
    if getattr(args, name) in (None, ""):
        raise UsageError(f"--{name} is required ({why})")


def _positive(args, *names: str) -> None:
    for name in names:
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise UsageError(f"--{name} must be positive, got {value}")


def check_args(args: argparse.Namespace) -> None:
    """Validate and complete ``args`` in place: every failure is a UsageError, and nothing is written."""
    _require(args, "pretrained_model_name_or_path", "a diffusers pipeline folder, hub id, or tiny:sd15 for a smoke run")
    _require(args, "instance_data_dir", "the folder with your subject's images")
    _require(args, "instance_prompt", "the prompt naming your subject, e.g. 'a photo of sks dog'")
    _positive(args, "rank", "train_batch_size", "sample_batch_size", "gradient_accumulation_steps", "max_train_steps",
              "num_train_epochs", "checkpointing_steps", "validation_steps", "num_class_images", "resolution",
              "num_inference_steps", "checkpoints_total_limit", "max_sequence_length")
    if args.num_validation_images < 0 or args.dataloader_num_workers < 0 or args.lr_warmup_steps < 0:
        raise UsageError("--num_validation_images, --dataloader_num_workers and --lr_warmup_steps cannot be negative")
    if not 0.0 <= args.lora_dropout < 1.0:
        raise UsageError(f"--lora_dropout must be in [0, 1), got {args.lora_dropout}")

    from .base_model import resolve_base_model
    from .checkpoints import read_training_state, resolve_resume_checkpoint
    from .data import ImageFolderError, image_files

    try:
        args.target_modules = parse_target_modules(str(args.target_modules))
        te_targets = args.text_encoder_target_modules
        if te_targets is None:
            te_targets = args.target_modules if args.target_modules in PRESET_NAMES else "attention"
        args.text_encoder_target_modules = parse_target_modules(str(te_targets))
        args.base = resolve_base_model(args.pretrained_model_name_or_path, revision=args.revision)
        args.instance_images = image_files(args.instance_data_dir, "--instance_data_dir")
    except (ValueError, ImageFolderError) as err:
        raise UsageError(str(err)) from None
    if args.pretrained_vae_model_name_or_path and not (
        Path(args.pretrained_vae_model_name_or_path).is_dir() or re.fullmatch(r"[\w.-]+/[\w.-]+", args.pretrained_vae_model_name_or_path)
    ):
        raise UsageError(f"--pretrained_vae_model_name_or_path '{args.pretrained_vae_model_name_or_path}' does not exist")

    family = args.base.family
    if args.resolution is not None and args.resolution % family.resolution_multiple:
        raise UsageError(f"--resolution {args.resolution} must be a multiple of {family.resolution_multiple} for {family.name}")

    if args.with_prior_preservation:
        _require(args, "class_prompt", "prior preservation generates and trains on images of the class, e.g. 'a photo of a dog'")
        _require(args, "class_data_dir", "prior preservation keeps its class images there")
        if Path(args.class_data_dir).exists() and not Path(args.class_data_dir).is_dir():
            raise UsageError(f"--class_data_dir '{args.class_data_dir}' is not a folder")
    elif args.class_data_dir or args.class_prompt:
        logger.warning("--class_data_dir / --class_prompt are ignored without --with_prior_preservation")

    if args.use_8bit_adam:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise UsageError("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes (or drop the flag)") from None
    if args.report_to is None:
        args.report_to = "tensorboard" if _tensorboard_available() else "none"
    elif args.report_to == "tensorboard" and not _tensorboard_available():
        raise UsageError("--report_to tensorboard needs tensorboard: pip install tensorboard (or --report_to none)")
    if family.objective == "flow_matching" and (args.snr_gamma or args.noise_offset):
        logger.warning("--snr_gamma and --noise_offset apply to noise prediction; %s trains with flow matching and ignores them", family.name)

    args.resume_checkpoint = None
    if args.resume_from_checkpoint:
        try:
            args.resume_checkpoint = resolve_resume_checkpoint(args.output_dir, args.resume_from_checkpoint)
        except ValueError as err:
            raise UsageError(str(err)) from None
        if args.seed is None:
            args.seed = read_training_state(args.resume_checkpoint).get("seed")
    if args.seed is None:
        # Each process draws one; the trainer keeps the main process's (and checkpoints record it).
        args.seed = secrets.randbelow(2**31)
    if args.lora_alpha is None:
        args.lora_alpha = args.rank
    if args.validation_prompt is None:
        args.validation_prompt = args.instance_prompt


def _tensorboard_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None
