"""The trainer's run configuration: one frozen dataclass whose fields are the command-line flags.

Each field of :class:`RunConfig` carries its own help text, group, choices and value check (``flag(...)``,
as PEFT's and transformers' HfArgumentParser dataclasses do); the argparse parser, the ``--config FILE``
key check and the checks of single values are generated from it, so a new flag is one field here.

A config file (TOML or YAML) holds the same keys as the flags, without the dashes; flags given on the
command line override it. Input paths in a config file (data folders, a base-model folder) are relative
to the file, so ``--config samples/dreambooth_tiny.toml`` works from any folder; ``output_dir`` is
relative to the current folder, like the flag.

Only light modules are imported here: --help and flag errors answer before torch loads. What needs the
file system (the base, the images, the output folder, a checkpoint) is checked in :mod:`.run_inputs`.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import re
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..choices import MIXER_INITS, OPTIMIZERS, QUANTIZATION_BACKENDS, QUANTIZATIONS, WEIGHTING_SCHEMES
from ..targets import PRESET_NAMES, parse_target_modules

DEFAULT_PROG = "train_dreambooth_moslora.py"
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")


class UsageError(ValueError):
    """Bad input from the user: the trainer prints the one-line message and exits with status 2."""


def flag(
    default: Any,
    help: str,
    *,
    group: str,
    choices: tuple | None = None,
    check: str | None = None,
    type: typing.Callable | None = None,
    nargs: str | int | None = None,
) -> Any:
    """A RunConfig field that is also a command-line flag.

    ``check``: "positive" (> 0) or "non_negative" (>= 0), enforced when given. ``type``: how argparse reads
    the value when the field's annotation does not say it (e.g. a value parsed further after argparse).
    ``nargs``: the flag collects values (a tuple field, default None): each use adds its ``nargs`` values, and a
    config file gives a list.
    """
    metadata = {"help": help, "group": group, "choices": choices, "check": check, "type": type, "nargs": nargs}
    return dataclasses.field(default=default, metadata=metadata)


def parse_size(value: str) -> tuple[int, int]:
    """``"768x512"`` -> (768, 512) (width, height); ``"512"`` -> (512, 512); else an ArgumentTypeError."""
    parts = str(value).lower().replace(" ", "").split("x")
    if len(parts) not in (1, 2) or not all(part.isdigit() and int(part) > 0 for part in parts):
        raise argparse.ArgumentTypeError(f"expected WxH in pixels, e.g. 768x512 (or one number), got '{value}'")
    width, height = int(parts[0]), int(parts[-1])
    return width, height


_BASE, _DATA, _ADAPTER, _TRAINING = "base model", "data", "adapter (MoSLoRA)", "training"
_OBJECTIVE, _OUTPUTS = "objective", "validation, checkpoints and logging"
_OPTIMIZER, _SPEED = "optimizer, learning rates by role, EMA", "speed"
_MEMORY = "memory"


@dataclass(frozen=True)
class RunConfig:
    """Every setting of a DreamBooth run, as given (flags over --config) and completed by the checks.

    After :func:`parse_run_config`: ``rank``, ``lora_alpha``, both target-module fields, both learning rates
    (per --optimizer) and ``optimizer`` (--use_8bit_adam folded in) are resolved (never None), and
    ``validation_prompt`` is a tuple of prompts; after :func:`.run_inputs.resolve_run_inputs`: ``seed`` and
    ``report_to`` too, and ``validation_prompt`` holds those of --validation_prompts_file as well. With
    ``--init_lora``, ``rank`` and ``lora_alpha`` not given come from the file in resolve_run_inputs, and
    ``target_modules`` not given stays None (the file's modules, known once the base is loaded).
    Values that need the loaded base (the default resolution, the number of steps of an epoch-based run,
    learning rates under --scale_lr) are the recipe's own local values, never written back here.
    """

    # ---------------------------------------------------------------- base model
    pretrained_model_name_or_path: str | None = flag(
        None,
        "Diffusers pipeline folder or hub id (family read from model_index.json), a single-file .safetensors "
        "checkpoint (family read from its tensor names; see --base_config), a .gguf transformer (Flux, SD3, "
        "Chroma, ...; kept block-quantized, the rest from --base_config), or "
        "tiny:<family> (sd15, sdxl, flux, ...) for a tiny random offline pipeline (smoke runs).",
        group=_BASE,
    )
    pretrained_vae_model_name_or_path: str | None = flag(
        None, "A standalone VAE to use instead of the pipeline's (e.g. SDXL's fp16 fix).", group=_BASE
    )
    revision: str | None = flag(None, "Hub revision of the base model.", group=_BASE)
    variant: str | None = flag(None, "Weight variant of the base model files, e.g. fp16.", group=_BASE)
    base_config: str | None = flag(
        None,
        "With a single-file base: a diffusers folder or hub id of the same family supplying the configs, "
        "tokenizers and the components the file lacks (default: the family's reference hub repository; "
        "a local folder needs no network).",
        group=_BASE,
    )

    # ---------------------------------------------------------------- data
    instance_data_dir: str | None = flag(None, "Folder with the images of your subject.", group=_DATA)
    instance_prompt: str | None = flag(
        None, "Prompt naming the subject with its identifier, e.g. 'a photo of sks dog'.", group=_DATA
    )
    class_data_dir: str | None = flag(
        None, "Folder of class images for prior preservation (missing ones are generated).", group=_DATA
    )
    class_prompt: str | None = flag(None, "Prompt for the class images, e.g. 'a photo of a dog'.", group=_DATA)
    with_prior_preservation: bool = flag(False, "Add the prior-preservation loss on class images.", group=_DATA)
    prior_loss_weight: float = flag(1.0, "Weight of the prior-preservation loss.", group=_DATA)
    num_class_images: int = flag(
        100, "Class images to have in --class_data_dir; missing ones are generated.", group=_DATA, check="positive"
    )
    sample_batch_size: int = flag(4, "Batch size when generating class images.", group=_DATA, check="positive")
    resolution: int | None = flag(
        None,
        "Training resolution (square); default: the base's own (512 for SD 1.5, 1024 for SDXL, ...).",
        group=_DATA,
        check="positive",
    )
    center_crop: bool = flag(False, "Crop the centre instead of a random square.", group=_DATA)
    random_flip: bool = flag(False, "Flip images horizontally at random.", group=_DATA)
    cache_latents: bool = flag(
        False, "Encode the images with the VAE once (the posterior, sampled per step).", group=_DATA
    )
    dataloader_num_workers: int = flag(
        0, "Data loading worker processes (0: in the main process).", group=_DATA, check="non_negative"
    )
    dataset_config: str | None = flag(
        None,
        "A kohya dataset TOML ([general], [[datasets]], [[datasets.subsets]]): several image folders, each with its "
        "caption extension, class_tokens, num_repeats, is_reg, buckets; replaces --instance_data_dir. Data flags "
        "below fill in what the file leaves out.",
        group=_DATA,
    )
    caption_extension: str | None = flag(
        None,
        "Caption file beside each image, <stem><ext>; images without one (and without a metadata.jsonl/.csv "
        "entry) train on --instance_prompt. Default .txt (.caption inside a --dataset_config file, as kohya).",
        group=_DATA,
    )
    dataset_name: str | None = flag(
        None,
        "A Hugging Face dataset instead of --instance_data_dir: a Hub id, a local dataset folder (e.g. images with a "
        "metadata.jsonl), or a save_to_disk folder; its train split, read with --image_column and --caption_column. "
        "Needs pip install datasets.",
        group=_DATA,
    )
    dataset_config_name: str | None = flag(
        None, "The configuration of --dataset_name (load_dataset's second argument).", group=_DATA
    )
    image_column: str = flag("image", "The image column of --dataset_name.", group=_DATA)
    caption_column: str | None = flag(
        None,
        "The caption column: of --dataset_name (default: 'text' where it has one, else --instance_prompt for every "
        "image), or of a folder's metadata.jsonl / metadata.csv beside a file_name column (default: 'text').",
        group=_DATA,
    )
    cache_dir: str | None = flag(
        None,
        "Where --dataset_name's downloads and Arrow files go (default: Hugging Face's, ~/.cache/huggingface).",
        group=_DATA,
    )
    caption_dropout_rate: float = flag(
        0.0, "Probability of training a sample on the empty prompt (for classifier-free guidance).", group=_DATA
    )
    shuffle_caption: bool = flag(
        False, "Shuffle a caption's comma-separated tokens each time it is used (kohya).", group=_DATA
    )
    keep_tokens: int = flag(
        0,
        "With --shuffle_caption: the first N tokens (e.g. the trigger word) stay first.",
        group=_DATA,
        check="non_negative",
    )
    enable_bucket: bool = flag(
        False,
        "Aspect-ratio buckets of about --resolution's area: portrait and landscape photos stay whole.",
        group=_DATA,
    )
    min_bucket_reso: int = flag(256, "Smallest bucket side in pixels.", group=_DATA, check="positive")
    max_bucket_reso: int = flag(1024, "Largest bucket side in pixels.", group=_DATA, check="positive")
    bucket_reso_steps: int = flag(
        64,
        "Bucket sides are multiples of this (of 16 for SD3 and Flux, 8 for the others).",
        group=_DATA,
        check="positive",
    )
    bucket_no_upscale: bool = flag(
        False, "Never enlarge an image: one smaller than the area keeps its size, sides rounded down.", group=_DATA
    )
    masked_loss: bool = flag(
        False, "Weight the loss per latent pixel by the image's mask (white: train, black: ignore).", group=_DATA
    )
    alpha_mask: bool = flag(False, "With --masked_loss: the mask is the image's alpha channel.", group=_DATA)
    mask_data_dir: str | None = flag(
        None, "With --masked_loss: a folder of masks named like the images (same stem).", group=_DATA
    )
    cache_latents_to_disk: bool = flag(
        False,
        "Keep the cached latents (implies --cache_latents) on disk, keyed by image bytes, VAE weights and crop, so "
        "later runs encode nothing: $MOSLORA_CACHE_DIR, else ~/.cache/moslora.",
        group=_DATA,
    )
    cache_text_encoder_outputs: bool = flag(
        False,
        "Encode every caption once, then move the text encoders off the accelerator (not with "
        "--train_text_encoder or --shuffle_caption).",
        group=_DATA,
    )
    cache_text_encoder_outputs_to_disk: bool = flag(
        False,
        "Keep them on disk for later runs, beside the latents (implies --cache_text_encoder_outputs).",
        group=_DATA,
    )

    # ---------------------------------------------------------------- adapter
    rank: int | None = flag(
        None,
        "LoRA rank r (the mixer is r x r). Default: 4, or the --init_lora file's.",
        group=_ADAPTER,
        check="positive",
    )
    lora_alpha: float | None = flag(
        None,
        "LoRA alpha; scale s = alpha / r. Default: the rank (s = 1). With --init_lora: the file's.",
        group=_ADAPTER,
    )
    lora_dropout: float = flag(0.0, "Dropout on the adapter input, in [0, 1).", group=_ADAPTER)
    use_rslora: bool = flag(False, "Rank-stabilised scaling s = alpha / sqrt(r).", group=_ADAPTER)
    mixer_init: str = flag("kaiming", "Initialisation of the r x r mixer M.", group=_ADAPTER, choices=MIXER_INITS)
    freeze_mixer: bool = flag(False, "Keep M fixed (identity + frozen is plain LoRA, the baseline).", group=_ADAPTER)
    target_modules: str | tuple[str, ...] | None = flag(
        None,
        f"Denoiser modules to adapt: a preset ({', '.join(PRESET_NAMES)}) or comma-separated module names. "
        "Default: attention, or the --init_lora file's modules.",
        group=_ADAPTER,
        type=str,
    )
    text_encoder_target_modules: str | tuple[str, ...] | None = flag(
        None,
        "Text-encoder modules with --train_text_encoder: a preset or names. "
        "Default: --target_modules if it is a preset, else 'attention'.",
        group=_ADAPTER,
        type=str,
    )
    train_mixer_only: bool = flag(
        False,
        "Train only the mixers M (r x r per layer); A and B stay as --init_lora's file has them. Re-targets an "
        "existing LoRA to a new subject with r^2 parameters per layer (needs --init_lora and a trainable mixer).",
        group=_ADAPTER,
    )
    init_lora: str | None = flag(
        None,
        "Start from an existing LoRA file or folder (diffusers, kohya, native MoSLoRA, ...): its ranks, alphas "
        "and modules, A and B copied, M = identity, so step 0 is that LoRA exactly. Its text-encoder layers "
        "train with --train_text_encoder, else they stay as in the file.",
        group=_ADAPTER,
    )

    # ---------------------------------------------------------------- training
    output_dir: str = flag(
        "moslora-dreambooth-model",
        "Where checkpoints, adapter files, images, logs and the model card go.",
        group=_TRAINING,
    )
    overwrite_output_dir: bool = flag(
        False,
        "Train into an --output_dir that already holds adapter files or checkpoints of an earlier run "
        "(they are replaced); without it such a folder is refused, unless the run resumes.",
        group=_TRAINING,
    )
    seed: int | None = flag(
        None, "Seed for a reproducible run (default: random, recorded in checkpoints).", group=_TRAINING
    )
    train_text_encoder: bool = flag(False, "Also train adapters on the CLIP text encoder(s).", group=_TRAINING)
    train_batch_size: int = flag(
        1, "Instance images per step and process (class images come on top).", group=_TRAINING, check="positive"
    )
    max_train_steps: int | None = flag(
        None, "Optimizer steps; overrides --num_train_epochs.", group=_TRAINING, check="positive"
    )
    num_train_epochs: int = flag(1, "Epochs, when --max_train_steps is not given.", group=_TRAINING, check="positive")
    gradient_accumulation_steps: int = flag(1, "Batches per optimizer step.", group=_TRAINING, check="positive")
    gradient_checkpointing: bool = flag(
        False, "Recompute activations in the backward pass to save memory.", group=_TRAINING
    )
    learning_rate: float | None = flag(
        None, "Learning rate of the denoiser's adapter (default: 1e-4; 1.0 with --optimizer prodigy).", group=_TRAINING
    )
    text_encoder_lr: float | None = flag(
        None,
        "Learning rate of the text encoders' adapters (default: 5e-6; with --optimizer prodigy the --learning_rate).",
        group=_TRAINING,
    )
    scale_lr: bool = flag(
        False, "Multiply learning rates by batch size, accumulation steps and processes.", group=_TRAINING
    )
    lr_scheduler: str = flag("constant", "LR schedule.", group=_TRAINING, choices=LR_SCHEDULERS)
    lr_warmup_steps: int = flag(0, "Warm-up steps of the LR schedule.", group=_TRAINING, check="non_negative")
    lr_num_cycles: int = flag(1, "Cycles of cosine_with_restarts.", group=_TRAINING)
    lr_power: float = flag(1.0, "Power of the polynomial schedule.", group=_TRAINING)
    use_8bit_adam: bool = flag(False, "The same as --optimizer adamw8bit (diffusers' name).", group=_TRAINING)
    adam_beta1: float = flag(0.9, "AdamW's beta1 (decay of the gradient's running mean).", group=_TRAINING)
    adam_beta2: float = flag(0.999, "AdamW's beta2 (decay of the squared gradient's running mean).", group=_TRAINING)
    adam_weight_decay: float = flag(1e-4, "Weight decay of the denoiser's adapter.", group=_TRAINING)
    adam_weight_decay_text_encoder: float = flag(1e-3, "Weight decay of the text encoders' adapters.", group=_TRAINING)
    adam_epsilon: float = flag(1e-8, "AdamW's epsilon (added to the denominator for stability).", group=_TRAINING)

    # ---------------------------------------------------------------- optimizer, learning rates by role, EMA
    optimizer: str = flag(
        "adamw",
        "adamw (torch), adamw8bit (bitsandbytes), prodigy (prodigyopt; learning rates near 1.0), adafactor "
        "(transformers), adamw_schedulefree (schedulefree; constant LR schedule). Betas, epsilon and weight decay "
        "come from the --adam_* flags where the optimizer takes them.",
        group=_OPTIMIZER,
        choices=OPTIMIZERS,
    )
    optimizer_args: tuple[str, ...] | None = flag(
        None,
        "More keyword arguments of the optimizer as key=value (kohya's flag), e.g. d_coef=2 betas=0.9,0.99; "
        "values are Python literals, else strings. They override the defaults listed in docs/training.md.",
        group=_OPTIMIZER,
        type=str,
        nargs="+",
    )
    loraplus_lr_ratio: float = flag(
        1.0,
        "LoRA+ (kohya's flag): B (lora_B / lora_up) learns at this times the learning rate of A; 16 is usual.",
        group=_OPTIMIZER,
        check="positive",
    )
    mixer_lr: float | None = flag(
        None,
        "Learning rate of the denoiser's mixers M (default: --learning_rate); the text encoders' mixers learn at "
        "--text_encoder_lr times the same ratio. 0 keeps every M at its initial value (as --freeze_mixer).",
        group=_OPTIMIZER,
        check="non_negative",
    )
    use_ema: bool = flag(
        False,
        "Keep an exponential moving average of the adapter weights (diffusers' EMAModel), saved in checkpoints; "
        "the adapter files then hold the EMA weights. Validation during training uses the live weights.",
        group=_OPTIMIZER,
    )
    ema_decay: float = flag(
        0.9999,
        "Largest EMA decay (diffusers' EMAModel default); it warms up as (1 + t) / (10 + t) over step t.",
        group=_OPTIMIZER,
        check="positive",
    )

    # ---------------------------------------------------------------- speed
    compile: bool = flag(
        False,
        "torch.compile the denoiser for training (the first steps compile: seconds to minutes; then faster).",
        group=_SPEED,
    )
    compile_backend: str = flag("inductor", argparse.SUPPRESS, group=_SPEED)  # tests compile with "eager"
    max_grad_norm: float = flag(1.0, "Gradient clipping norm.", group=_TRAINING)
    mixed_precision: str | None = flag(
        None,
        "Frozen weights in this precision, adapters in fp32 (default: accelerate's config).",
        group=_TRAINING,
        choices=("no", "fp16", "bf16"),
    )
    allow_tf32: bool = flag(False, "Allow TF32 matmuls on Ampere GPUs.", group=_TRAINING)
    local_rank: int = flag(-1, argparse.SUPPRESS, group=_TRAINING)  # torch.distributed.launch passes it
    ddp_timeout: int | None = flag(
        None,
        "Minutes a collective of a several-process run waits for every process before it fails (default: torch's, "
        "10 for NCCL and 30 for gloo). A process that dies is noticed at once over gloo; NCCL may wait this long, "
        "so lower it for multi-node runs where a lost node would otherwise hang the others.",
        group=_TRAINING,
        check="positive",
    )

    # ---------------------------------------------------------------- memory
    quantize_base: str | None = flag(
        None,
        "Load the frozen denoiser's linear layers quantized (weights only; the adapter stays full precision "
        "and its files do not depend on it). nf4 needs CUDA.",
        group=_MEMORY,
        choices=QUANTIZATIONS,
    )
    quantization_backend: str = flag(
        "auto",
        "Backend of --quantize_base. auto: on CUDA bitsandbytes (int8, nf4) or torchao (fp8); "
        "on CPU torchao (int8) or optimum-quanto (fp8).",
        group=_MEMORY,
        choices=QUANTIZATION_BACKENDS,
    )
    quantize_text_encoders: bool = flag(
        False,
        "Also quantize the frozen text encoders (e.g. T5-XXL) with --quantize_base. Over a .gguf denoiser "
        "(quantized in its file) --quantize_base KIND --quantize_text_encoders quantizes the text encoders only.",
        group=_MEMORY,
    )

    # ---------------------------------------------------------------- objective
    snr_gamma: float | None = flag(
        None, "Min-SNR weighting gamma (epsilon / v-prediction families; 5.0 is usual).", group=_OBJECTIVE
    )
    noise_offset: float = flag(0.0, "Noise offset (epsilon / v-prediction families).", group=_OBJECTIVE)
    weighting_scheme: str | None = flag(
        None,
        "Flow matching (SD3/Flux) timestep density and loss weighting; default as diffusers' scripts "
        "(SD3 logit_normal, Flux none).",
        group=_OBJECTIVE,
        choices=WEIGHTING_SCHEMES,
    )
    logit_mean: float = flag(0.0, "Mean of logit_normal timestep sampling.", group=_OBJECTIVE)
    logit_std: float = flag(1.0, "Std of logit_normal timestep sampling.", group=_OBJECTIVE)
    mode_scale: float = flag(1.29, "Scale of mode timestep sampling.", group=_OBJECTIVE)
    precondition_outputs: bool = flag(
        False, "Flow matching: regress x_0 from preconditioned outputs (SD3 paper).", group=_OBJECTIVE
    )
    guidance_scale: float = flag(
        3.5, "Flux: the guidance value fed to a guidance-distilled transformer.", group=_OBJECTIVE
    )
    max_sequence_length: int | None = flag(
        None, "T5 prompt length (SD3 77, Flux 512, capped by the tokenizer).", group=_OBJECTIVE, check="positive"
    )

    # ---------------------------------------------------------------- validation, checkpoints, logging
    validation_prompt: tuple[str, ...] | None = flag(
        None,
        "Prompt of the validation images; repeat the flag for several, one grid row each (default: --instance_prompt).",
        group=_OUTPUTS,
        type=str,
        nargs=1,
    )
    num_validation_images: int = flag(4, "Validation images per validation run.", group=_OUTPUTS, check="non_negative")
    validation_steps: int = flag(
        100, "Validate every this many steps (and always at the end).", group=_OUTPUTS, check="positive"
    )
    validation_at_start: bool = flag(
        False,
        "Also validate before the first step (validation/step_000000.png: the base alone), for a before/after pair.",
        group=_OUTPUTS,
    )
    num_inference_steps: int | None = flag(
        None,
        "Sampling steps for validation and class images (default: the pipeline's).",
        group=_OUTPUTS,
        check="positive",
    )
    validation_prompts_file: str | None = flag(
        None,
        "Text file of validation prompts, one a line (blank lines skipped), after any --validation_prompt.",
        group=_OUTPUTS,
    )
    validation_negative_prompt: str | None = flag(
        None, "Negative prompt of the validation images (families that take one).", group=_OUTPUTS
    )
    validation_guidance_scale: float | None = flag(
        None, "Guidance scale of the validation images (default: the pipeline's).", group=_OUTPUTS, check="non_negative"
    )
    validation_num_inference_steps: int | None = flag(
        None,
        "Sampling steps of the validation images (default: --num_inference_steps).",
        group=_OUTPUTS,
        check="positive",
    )
    validation_resolution: tuple[int, int] | None = flag(
        None,
        "Size of the validation images as WxH, e.g. 768x512, or one number (default: the training resolution).",
        group=_OUTPUTS,
        type=parse_size,
    )
    validation_cpu_offload: bool = flag(
        False,
        "Validate with diffusers' model CPU offload (one model on the GPU at a time); no effect on CPU.",
        group=_OUTPUTS,
    )
    checkpointing_steps: int = flag(
        500,
        "Save a resumable checkpoint every this many steps (and at the last step).",
        group=_OUTPUTS,
        check="positive",
    )
    checkpoints_total_limit: int | None = flag(
        None, "Keep at most this many checkpoints (oldest deleted).", group=_OUTPUTS, check="positive"
    )
    resume_from_checkpoint: str | None = flag(
        None, "'latest', or a checkpoint-<step> folder, to continue a run exactly.", group=_OUTPUTS
    )
    report_to: str | None = flag(
        None,
        "Where to log losses and images besides logs/train_log.jsonl (default: tensorboard when installed).",
        group=_OUTPUTS,
        choices=("tensorboard", "none"),
    )
    logging_dir: str = flag(
        "logs", "Folder of the per-step train_log.jsonl and of TensorBoard, relative to --output_dir.", group=_OUTPUTS
    )


def _flag_type(field: dataclasses.Field, hint) -> tuple[Any, bool]:
    """(argparse type, is a boolean flag) of a field, from its metadata or its annotation."""
    if field.metadata["type"] is not None:
        return field.metadata["type"], False
    if field.metadata["nargs"] is not None:
        return str, False
    kinds = [t for t in typing.get_args(hint) if t is not type(None)] if isinstance(hint, types.UnionType) else [hint]
    if kinds == [bool]:
        return None, True
    return kinds[0], False


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's help with "(default: X)" added only where X says something (not None, not already told)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "%(default)" in text or "default" in text.lower() or action.default in (None, argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)  # --learning_rat is a typo, not --learning_rate

    def error(self, message):  # one line instead of argparse's usage block and sys.exit
        suggested = _with_suggestions(message, self._option_string_actions)
        raise UsageError(suggested if suggested != message else f"{message} (see --help)")


def _with_suggestions(message: str, known: typing.Iterable[str]) -> str:
    """argparse's "unrecognized arguments: --rnak 3" with "(did you mean --rank?)" for a close flag name."""
    prefix = "unrecognized arguments: "
    if not message.startswith(prefix):
        return message
    flags = [k for k in known if k.startswith("--")]
    suggestions = {}
    for token in message[len(prefix) :].split():
        name = token.split("=")[0]
        close = difflib.get_close_matches(name, flags, n=1) if name.startswith("--") else []
        if close:
            suggestions[name] = close[0]
    if len(suggestions) == 1:
        return f"{message} (did you mean {next(iter(suggestions.values()))}?)"
    if suggestions:
        return f"{message} (did you mean " + ", ".join(f"{s} for {n}" for n, s in suggestions.items()) + "?)"
    return message


def build_parser(prog: str = DEFAULT_PROG) -> argparse.ArgumentParser:
    """The command line of :class:`RunConfig`: one flag per field, in its group, with its help and choices."""
    parser = _Parser(
        prog=prog,
        description="DreamBooth training of a MoSLoRA adapter for SD 1.x, SD 2.x, SDXL, SD3 or Flux; "
        "writes the adapter as native MoSLoRA, plain diffusers LoRA and kohya LoRA files.",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument(
        "--config", default=None, help="TOML or YAML file with the same keys as these flags; flags override it."
    )
    groups: dict[str, argparse._ArgumentGroup] = {}
    hints = typing.get_type_hints(RunConfig)
    for field in dataclasses.fields(RunConfig):
        meta = field.metadata
        group = groups.get(meta["group"]) or groups.setdefault(meta["group"], parser.add_argument_group(meta["group"]))
        kind, is_bool = _flag_type(field, hints[field.name])
        kwargs: dict[str, Any] = {"default": field.default, "help": meta["help"]}
        if is_bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = kind
            if meta["choices"]:
                kwargs["choices"] = meta["choices"]
            if meta["nargs"] is not None:
                kwargs.update(nargs=meta["nargs"], action="extend")
        group.add_argument(f"--{field.name}", **kwargs)
    return parser


_INPUT_PATH_KEYS = (
    "instance_data_dir",
    "class_data_dir",
    "mask_data_dir",
    "dataset_config",
    "dataset_name",
    "pretrained_model_name_or_path",
    "pretrained_vae_model_name_or_path",
    "validation_prompts_file",
    "base_config",
    "init_lora",
)


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
        if (
            key in _INPUT_PATH_KEYS
            and isinstance(value, str)
            and not value.startswith("tiny:")
            and not Path(value).is_absolute()
        ):
            relative = config_path.parent / value
            # Data folders are always relative to the file; a base model only if it is there (else a hub id).
            if key.endswith("data_dir") or key == "dataset_config" or relative.exists():
                value = str(relative)
        if isinstance(actions[key], argparse._ExtendAction):  # a collecting flag: each value its own argument
            items = [f"{k}={v}" for k, v in value.items()] if isinstance(value, dict) else value
            for item in items if isinstance(items, (list, tuple)) else [items]:
                argv += [f"--{key}", str(item)]
        elif isinstance(actions[key], argparse.BooleanOptionalAction):
            if not isinstance(value, bool):
                raise UsageError(f"--config '{config_path}': '{key}' must be true or false, got {value!r}")
            argv.append(f"--{key}" if value else f"--no-{key}")
        elif isinstance(value, (list, tuple)):
            argv += [f"--{key}", ",".join(str(v) for v in value)]
        else:
            argv += [f"--{key}", str(value)]
    return argv


def parse_run_config(argv: list[str] | None = None, prog: str = DEFAULT_PROG) -> RunConfig:
    """Flags merged over ``--config``, with every check that needs no file: a completed, frozen RunConfig.

    Raises :class:`UsageError` with a one-line message for anything a user has to fix. Reads no model.
    """
    parser = build_parser(prog)
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    config_argv = []
    if known.config:
        values = load_config_file(known.config)
        # The images come from one source: one named on the command line replaces the file's others.
        for given in IMAGE_SOURCES:
            if _on_command_line(argv if argv is not None else sys.argv[1:], given):
                for replaced in IMAGE_SOURCES:
                    if replaced != given:
                        values.pop(replaced, None)
        config_argv = _config_to_argv(parser, values, Path(known.config))
    namespace = parser.parse_args(config_argv + list(argv if argv is not None else sys.argv[1:]))
    config = RunConfig(**{field.name: getattr(namespace, field.name) for field in dataclasses.fields(RunConfig)})
    return _checked(config)


def _on_command_line(argv: list[str], name: str) -> bool:
    return any(arg == f"--{name}" or arg.startswith(f"--{name}=") for arg in argv)


def _require(config: RunConfig, name: str, why: str) -> None:
    if getattr(config, name) in (None, ""):
        raise UsageError(f"--{name} is required ({why})")


def _checked(config: RunConfig) -> RunConfig:
    _require(
        config, "pretrained_model_name_or_path", "a diffusers pipeline folder, hub id, or tiny:sd15 for a smoke run"
    )
    _check_one_image_source(config)
    if config.dataset_config is None and config.dataset_name is None:
        _require(config, "instance_prompt", "the prompt naming your subject, e.g. 'a photo of sks dog'")
    config = _with_implied_flags(config)
    _check_data_flags(config)
    for field in dataclasses.fields(RunConfig):
        value, check = getattr(config, field.name), field.metadata["check"]
        if value is None or check is None:
            continue
        if check == "positive" and value <= 0:
            raise UsageError(f"--{field.name} must be positive, got {value}")
        if check == "non_negative" and value < 0:
            raise UsageError(f"--{field.name} cannot be negative, got {value}")
    if not 0.0 <= config.lora_dropout < 1.0:
        raise UsageError(f"--lora_dropout must be in [0, 1), got {config.lora_dropout}")
    if config.with_prior_preservation:
        _require(
            config,
            "class_prompt",
            "prior preservation generates and trains on images of the class, e.g. 'a photo of a dog'",
        )
        _require(config, "class_data_dir", "prior preservation keeps its class images there")
    if config.train_mixer_only:
        if config.init_lora is None:
            raise UsageError(
                "--train_mixer_only trains M between a fixed A and B, which must come from a LoRA: add --init_lora "
                "FILE_OR_DIR (a fresh B is zero, so M alone could never move the model)"
            )
        if config.freeze_mixer or config.mixer_lr == 0:
            raise UsageError("--train_mixer_only trains only the mixer: drop --freeze_mixer / --mixer_lr 0")
    # With --init_lora, rank, alpha and modules not given stay None: the file's, read by resolve_run_inputs.
    from_file = config.init_lora is not None
    target_modules = config.target_modules
    if target_modules is None and not from_file:
        target_modules = "attention"
    try:
        if target_modules is not None:
            target_modules = _as_immutable(parse_target_modules(str(target_modules)))
        te_targets = config.text_encoder_target_modules
        if te_targets is None:
            te_targets = target_modules if target_modules in PRESET_NAMES else "attention"
        text_encoder_target_modules = _as_immutable(parse_target_modules(str(te_targets)))
    except ValueError as err:
        raise UsageError(str(err)) from None
    optimizer = _checked_optimizer(config)
    learning_rate = config.learning_rate
    if learning_rate is None:
        learning_rate = 1.0 if optimizer == "prodigy" else 1e-4
    text_encoder_lr = config.text_encoder_lr
    if text_encoder_lr is None:  # Prodigy adapts one step size for all groups: diffusers' scripts give them one LR
        text_encoder_lr = learning_rate if optimizer == "prodigy" else 5e-6
    validation_prompts = tuple(config.validation_prompt or ())
    if not validation_prompts and not config.validation_prompts_file and config.instance_prompt is not None:
        validation_prompts = (config.instance_prompt,)
    if optimizer == "prodigy":
        _check_one_prodigy_learning_rate(config, learning_rate, text_encoder_lr)
    if config.ema_decay > 1:
        raise UsageError(f"--ema_decay must be in (0, 1], got {config.ema_decay}")
    rank = 4 if config.rank is None and not from_file else config.rank
    return dataclasses.replace(
        config,
        rank=rank,
        target_modules=target_modules,
        text_encoder_target_modules=text_encoder_target_modules,
        lora_alpha=rank if config.lora_alpha is None and not from_file else config.lora_alpha,
        validation_prompt=validation_prompts,
        optimizer=optimizer,
        use_8bit_adam=optimizer == "adamw8bit",
        optimizer_args=tuple(config.optimizer_args or ()),
        learning_rate=learning_rate,
        text_encoder_lr=text_encoder_lr,
    )


def _check_one_prodigy_learning_rate(config: RunConfig, learning_rate: float, text_encoder_lr: float) -> None:
    """Prodigy estimates one step size for every parameter group and refuses groups whose LRs differ (but for 0)."""
    others = {
        "--loraplus_lr_ratio": learning_rate * config.loraplus_lr_ratio,
        "--mixer_lr": learning_rate if config.mixer_lr is None else config.mixer_lr,
        "--text_encoder_lr": text_encoder_lr if config.train_text_encoder else learning_rate,
    }
    for name, lr in others.items():
        if lr not in (learning_rate, 0.0):
            raise UsageError(
                f"--optimizer prodigy takes one learning rate for every group (or 0), but {name} gives {lr:g} "
                f"against --learning_rate {learning_rate:g}; drop {name} (or choose another --optimizer)"
            )


def _checked_optimizer(config: RunConfig) -> str:
    """--optimizer, with --use_8bit_adam as the alias of adamw8bit; refuses the combinations that cannot work."""
    optimizer = config.optimizer
    if config.use_8bit_adam:
        if optimizer not in ("adamw", "adamw8bit"):
            raise UsageError(f"--use_8bit_adam means --optimizer adamw8bit; it conflicts with --optimizer {optimizer}")
        optimizer = "adamw8bit"
    if optimizer == "adamw_schedulefree":
        if config.lr_scheduler not in ("constant", "constant_with_warmup"):
            raise UsageError(
                f"--optimizer adamw_schedulefree replaces the LR schedule; got --lr_scheduler {config.lr_scheduler}: "
                "use constant (its warm-up is --lr_warmup_steps)"
            )
        if config.use_ema:
            raise UsageError(
                "--use_ema with --optimizer adamw_schedulefree: schedule-free AdamW already averages the weights "
                "(its exported x sequence); drop --use_ema"
            )
    for item in config.optimizer_args or ():
        if "=" not in item or not item.split("=", 1)[0].strip():
            raise UsageError(f"--optimizer_args: expected key=value, got '{item}'")
    return optimizer


def _with_implied_flags(config: RunConfig) -> RunConfig:
    """kohya's implications: a disk cache is a cache (--cache_latents_to_disk sets --cache_latents, and so on)."""
    return dataclasses.replace(
        config,
        cache_latents=config.cache_latents or config.cache_latents_to_disk,
        cache_text_encoder_outputs=config.cache_text_encoder_outputs or config.cache_text_encoder_outputs_to_disk,
    )


IMAGE_SOURCES = ("dataset_config", "instance_data_dir", "dataset_name")  # each names all the training images


def _check_one_image_source(config: RunConfig) -> None:
    given = [f"--{name}" for name in IMAGE_SOURCES if getattr(config, name) not in (None, "")]
    if not given:
        raise UsageError(
            "--instance_data_dir is required (the folder with your subject's images), or --dataset_config FILE.toml, "
            "or --dataset_name (a Hugging Face dataset)"
        )
    if len(given) > 1:
        raise UsageError(f"{' and '.join(given)} both name the training images; give one")


def _check_data_flags(config: RunConfig) -> None:
    """Combinations of data flags that cannot work together, each refused in one line."""
    if config.dataset_name is not None and config.mask_data_dir:
        raise UsageError(
            "--mask_data_dir matches masks to image files by name; with --dataset_name use --alpha_mask (RGBA images)"
        )
    if config.dataset_config is not None:
        if config.with_prior_preservation:
            raise UsageError(
                "--with_prior_preservation generates class images for --instance_data_dir; with --dataset_config "
                "add the class images as a subset with is_reg = true"
            )
        if config.mask_data_dir:
            raise UsageError(
                "--mask_data_dir is for --instance_data_dir; with --dataset_config set mask_dir per subset"
            )
    if not 0.0 <= config.caption_dropout_rate <= 1.0:
        raise UsageError(f"--caption_dropout_rate must be in [0, 1], got {config.caption_dropout_rate}")
    if config.min_bucket_reso > config.max_bucket_reso:
        raise UsageError(
            f"--min_bucket_reso {config.min_bucket_reso} is above --max_bucket_reso {config.max_bucket_reso}"
        )
    if config.cache_text_encoder_outputs:
        if config.train_text_encoder:
            raise UsageError(
                "--cache_text_encoder_outputs encodes each caption once with frozen text encoders; it cannot go "
                "with --train_text_encoder (drop one)"
            )
        if config.shuffle_caption:
            raise UsageError(
                "--cache_text_encoder_outputs encodes each caption once; --shuffle_caption makes a new caption at "
                "every step (drop one)"
            )
    if config.masked_loss and config.dataset_config is None and not (config.alpha_mask or config.mask_data_dir):
        raise UsageError("--masked_loss needs masks: add --alpha_mask (the images' alpha) or --mask_data_dir FOLDER")


def _as_immutable(targets: str | list[str]) -> str | tuple[str, ...]:
    return targets if isinstance(targets, str) else tuple(targets)


def is_hub_id(value: str) -> bool:
    """``owner/name``, the shape of a Hugging Face Hub repository id."""
    return re.fullmatch(r"[\w.-]+/[\w.-]+", value) is not None
