"""DreamBooth training of a MoSLoRA adapter, for every supported family, on accelerate.

The recipe behind ``train_scripts/train_dreambooth_moslora.py`` and ``moslora train``: parse, set up,
train, save. Family differences live in :mod:`moslora_diffusion.families`; data, prior preservation,
objectives, checkpoints, validation and the model card live in this package.

    python train_scripts/train_dreambooth_moslora.py --config samples/dreambooth_tiny.toml --output_dir out
    accelerate launch train_scripts/train_dreambooth_moslora.py --pretrained_model_name_or_path ... (flags as diffusers')
"""

from __future__ import annotations

import functools
import logging
import math
import os
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, broadcast_object_list, set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import cast_training_params
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .args import UsageError
from .checkpoints import (
    check_rng_state_readable,
    latest_checkpoint,
    read_training_state,
    register_adapter_checkpoint_hooks,
    remove_incomplete_checkpoints,
    save_checkpoint,
)
from .data import DreamBoothDataset, EpochBatchSampler, collate_dreambooth, image_files
from .entry import main  # noqa: F401  (re-exported: the recipe's entry point)
from .guards import InterruptRequests, OutputDirLock, TrainingStopped, divergence_message
from .loop import (
    ADAPTER_NAME,
    PromptConditioning,
    add_adapters,
    batch_loss,
    enable_gradient_checkpointing,
    make_optimizer,
    moslora_config_from_args,
    no_sync,
    place_frozen_components,
    vae_posterior_parameters,
    weight_dtype_for,
)
from .model_card import ModelCard
from .objectives import make_objective
from .prior import generate_class_images
from .validation import generate_validation_images, log_validation, save_png

logger = logging.getLogger("moslora_diffusion.train")


def train(args) -> Path:
    """Train under a lock on --output_dir (one run per folder) with Ctrl-C saving a checkpoint first."""
    started = time.monotonic()
    output_dir = Path(args.output_dir)
    accelerator = Accelerator(
        cpu=_multi_process_without_accelerator(),
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir)),
        # SDXL and SD3 read CLIP's penultimate layer: the last layer's adapter gets no gradient.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=args.train_text_encoder)],
    )
    _configure_logging(accelerator)
    lock = _lock_output_dir(accelerator, output_dir)
    try:
        with InterruptRequests() as interrupts:
            return _train(args, accelerator, output_dir, interrupts, started)
    finally:
        lock.release()


def _train(args, accelerator, output_dir: Path, interrupts: InterruptRequests, started: float) -> Path:
    # ---------------------------------------------------------------- setup
    args.seed = broadcast_object_list([args.seed])[0]
    set_seed(args.seed)
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    family, weight_dtype = args.base.family, weight_dtype_for(accelerator.mixed_precision)

    try:
        components = args.base.load_components(revision=args.revision, variant=args.variant, vae_source=args.pretrained_vae_model_name_or_path)
    except OSError as err:  # e.g. a folder with pickled .bin weights only: from_pretrained(use_safetensors=True) refuses it
        raise UsageError(
            f"cannot load the base model '{args.pretrained_model_name_or_path}' ({_reason(err)}); weights are read from "
            ".safetensors files only, never from pickle files (.bin, .ckpt, .pt)"
        ) from None
    place_frozen_components(components, family, accelerator.device, weight_dtype, custom_vae=bool(args.pretrained_vae_model_name_or_path))
    pipeline = args.base.build_pipeline(components)  # shares the modules: samples with the adapter once it is added
    args.resolution = args.resolution or args.base.default_resolution(components)
    max_sequence_length = family.resolve_max_sequence_length(components, args.max_sequence_length)
    call_kwargs = {"height": args.resolution, "width": args.resolution, **family.pipeline_call_kwargs(max_sequence_length)}
    if args.num_inference_steps:
        call_kwargs["num_inference_steps"] = args.num_inference_steps
    objective = make_objective(family, components["scheduler"].config, args)

    class_images = []
    if args.with_prior_preservation:
        made = generate_class_images(
            accelerator, pipeline, args.class_data_dir, args.class_prompt, args.num_class_images,
            sample_batch_size=args.sample_batch_size, seed=args.seed, call_kwargs=call_kwargs, autocast=accelerator.autocast,
        )
        class_images = image_files(args.class_data_dir, "--class_data_dir")[: args.num_class_images]
        logger.info("Prior preservation: %d class images in %s (%d generated)", len(class_images), args.class_data_dir, made)

    try:
        trained = add_adapters(components, family, args)
    except ValueError as err:
        raise UsageError(str(err)) from None
    if weight_dtype != torch.float32:
        cast_training_params(list(trained.values()), dtype=torch.float32)  # adapters train in fp32
    if args.gradient_checkpointing:
        enable_gradient_checkpointing(trained, family)

    dataset = DreamBoothDataset(
        args.instance_images, class_images, resolution=args.resolution,
        center_crop=args.center_crop, random_flip=args.random_flip, seed=args.seed,
    )
    if args.cache_latents:
        dataset.cache_latents(functools.partial(vae_posterior_parameters, components["vae"]), progress=_progress(accelerator))
    sampler = EpochBatchSampler(len(dataset), args.train_batch_size, seed=args.seed, num_replicas=accelerator.num_processes, rank=accelerator.process_index)
    dataloader = DataLoader(
        dataset, batch_sampler=sampler, num_workers=args.dataloader_num_workers,
        collate_fn=functools.partial(collate_dreambooth, resolution=args.resolution),
        generator=torch.Generator().manual_seed(args.seed),  # worker seeds from here, not from the global RNG
    )
    steps_per_epoch = math.ceil(len(sampler) / args.gradient_accumulation_steps)
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * steps_per_epoch
    num_epochs = math.ceil(args.max_train_steps / steps_per_epoch)

    if args.scale_lr:
        factor = args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
        args.learning_rate, args.text_encoder_lr = args.learning_rate * factor, args.text_encoder_lr * factor
    optimizer = make_optimizer(args, trained, family)
    lr_scheduler = get_scheduler(
        args.lr_scheduler, optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=args.max_train_steps * accelerator.num_processes,
        num_cycles=args.lr_num_cycles, power=args.lr_power,
    )
    prepared = accelerator.prepare(*trained.values(), optimizer, lr_scheduler)
    prepared_models, optimizer, lr_scheduler = dict(zip(trained, prepared[:-2])), prepared[-2], prepared[-1]
    register_adapter_checkpoint_hooks(accelerator, trained)
    denoiser = prepared_models[family.denoiser]

    text_components = {name: prepared_models.get(name, c) for name, c in components.items() if name.startswith(("text_encoder", "tokenizer"))}
    text_components[family.denoiser] = components[family.denoiser]  # SD3 without T5 reads its width
    conditioning = PromptConditioning(
        family, args.instance_prompt, args.class_prompt if class_images else None, max_sequence_length, text_components
    )
    if not args.train_text_encoder:
        conditioning.cache()

    global_step = 0
    if args.resume_checkpoint is not None:
        try:
            check_rng_state_readable(args.resume_checkpoint, accelerator.process_index)
        except ValueError as err:
            raise TrainingStopped(str(err)) from None
        accelerator.load_state(str(args.resume_checkpoint))
        global_step = read_training_state(args.resume_checkpoint)["step"]
        logger.info("Resumed from %s at step %d", args.resume_checkpoint, global_step)
    if accelerator.is_main_process and args.report_to != "none":
        accelerator.init_trackers("dreambooth-moslora", config=_tracker_config(args))
    _log_run(accelerator, args, family, objective, trained, len(dataset), steps_per_epoch)

    # ---------------------------------------------------------------- train
    def validate(step: int, final: bool = False) -> list:
        images = generate_validation_images(
            pipeline, args.validation_prompt, args.num_validation_images, args.seed, call_kwargs, list(trained.values()),
            autocast=accelerator.autocast,
        )
        if images:
            log_validation(accelerator, images, output_dir / "validation" / ("final.png" if final else f"step_{step:06d}.png"), step)
        return images

    if interrupts.requested:
        raise TrainingStopped("interrupted before the first step; nothing to save", interrupts.exit_code)
    if accelerator.is_main_process and args.validation_at_start and global_step == 0:
        validate(0)  # B = 0 at the start, so these are the base model's own images
    for model in prepared_models.values():
        model.train()
    # Listed once: walking every module for its parameters at each step costs 1 ms even on a tiny UNet.
    trainable_params = [p for model in trained.values() for p in model.parameters() if p.requires_grad]
    step_losses = []
    progress = tqdm(total=args.max_train_steps, initial=global_step, desc="Steps", disable=not accelerator.is_local_main_process)
    first_epoch, resume_batches = divmod(global_step, steps_per_epoch)
    resume_batches *= args.gradient_accumulation_steps
    for epoch in range(first_epoch, num_epochs):
        skip = resume_batches if epoch == first_epoch else 0
        sampler.set_epoch(epoch, skip_batches=skip)
        dataset.set_epoch(epoch)
        for batch_index, batch in enumerate(dataloader, start=skip):
            # One optimizer step per --gradient_accumulation_steps batches (fewer at the end of an epoch).
            group_start = batch_index - batch_index % args.gradient_accumulation_steps
            group_size = min(args.gradient_accumulation_steps, len(sampler) - group_start)
            syncs = batch_index - group_start == group_size - 1
            with no_sync(accelerator, [] if syncs else list(prepared_models.values())):
                loss = batch_loss(
                    batch, denoiser=denoiser, vae=components["vae"], family=family, objective=objective,
                    conditioning=conditioning, args=args, weight_dtype=weight_dtype,
                )
                accelerator.backward(loss / group_size)
            step_losses.append(loss.detach())
            if not syncs:
                continue
            accelerator.clip_grad_norm_(trainable_params, args.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            global_step += 1
            progress.update(1)
            diverged, interrupted = _step_status(accelerator, step_losses, interrupts)
            step_losses = []
            logs = {"loss": loss.detach().item(), "lr": lr_scheduler.get_last_lr()[0]}
            progress.set_postfix(**logs)
            accelerator.log(logs, step=global_step)
            if diverged:
                raise TrainingStopped(divergence_message(global_step, "the loss became NaN or infinite", args, latest_checkpoint(output_dir)))
            saved = None
            if global_step % args.checkpointing_steps == 0:  # also at the last step: a later run can extend it
                saved = _save_checkpoint(accelerator, args, trained, output_dir, global_step)
            if interrupted:
                saved = saved or _save_checkpoint(accelerator, args, trained, output_dir, global_step)
                raise TrainingStopped(f"at step {global_step}; saved {saved}: continue with --resume_from_checkpoint latest", interrupts.exit_code)
            if accelerator.is_main_process and global_step % args.validation_steps == 0 and global_step < args.max_train_steps:
                validate(global_step)
            if global_step >= args.max_train_steps:
                break
        if global_step >= args.max_train_steps:
            break
    progress.close()

    # ---------------------------------------------------------------- save
    accelerator.wait_for_everyone()
    _check_adapter_finite(trained, global_step, args, output_dir)
    if accelerator.is_main_process:
        from ..loaders import save_moslora_weights

        try:
            written = save_moslora_weights(pipeline, output_dir, adapter_name=ADAPTER_NAME, base_model=args.pretrained_model_name_or_path)
        except OSError as err:
            raise TrainingStopped(
                f"could not write the adapter files to '{output_dir}' ({_reason(err)}); no file was left half-written and "
                f"the checkpoints are intact (latest: {latest_checkpoint(output_dir) or 'none'}): make room, then rerun "
                "with --resume_from_checkpoint latest"
            ) from None
        images = validate(global_step, final=True)
        image_names = [save_png(image, output_dir / f"image_{i}.png").name for i, image in enumerate(images)]
        card = _model_card(args, family, trained, objective, global_step, image_names, written)
        card.save(output_dir / "README.md")
        files = ", ".join([*card.files.values(), "README.md"] + ([f"{len(image_names)} validation images"] if image_names else []))
        print(
            f"Trained {family.name} MoSLoRA adapter for {global_step} steps in {time.monotonic() - started:.0f}s "
            f"on {accelerator.num_processes} process(es): wrote {files} to {output_dir}",
            flush=True,
        )
    accelerator.end_training()
    return output_dir


# -------------------------------------------------------------------- helpers of the recipe


def _lock_output_dir(accelerator, output_dir: Path) -> OutputDirLock:
    """Lock --output_dir for this run (the main process does; every process learns the outcome)."""
    lock, refusal = OutputDirLock(output_dir), None
    if accelerator.is_main_process:
        try:
            lock.acquire()
        except TrainingStopped as err:
            refusal = str(err)
        else:
            removed = remove_incomplete_checkpoints(output_dir)
            if removed:
                logger.info("Removed what an interrupted run left half-written: %s", ", ".join(removed))
    refusal = broadcast_object_list([refusal])[0]
    if refusal:
        raise TrainingStopped(refusal)
    return lock


def _step_status(accelerator, step_losses: list[torch.Tensor], interrupts: InterruptRequests) -> tuple[bool, bool]:
    """(a loss of this step was not finite, Ctrl-C was pressed) on any process: all processes stop together."""
    losses = torch.stack(step_losses).float()
    flags = torch.stack([(~torch.isfinite(losses)).any().float(), losses.new_tensor(float(interrupts.requested))])
    if accelerator.num_processes > 1:
        flags = accelerator.reduce(flags.to(accelerator.device), reduction="sum")
    diverged, interrupted = (bool(flag > 0) for flag in flags)
    return diverged, interrupted


def _check_adapter_finite(trained: dict, step: int, args, output_dir: Path) -> None:
    """Never save NaN or infinite adapter weights (a finite loss can still leave them)."""
    if not all(bool(torch.isfinite(p).all()) for model in trained.values() for n, p in model.named_parameters() if "lora_" in n):
        raise TrainingStopped(divergence_message(step, "the adapter weights became NaN or infinite", args, latest_checkpoint(output_dir)))


def _save_checkpoint(accelerator, args, trained: dict, output_dir: Path, step: int) -> Path:
    """save_checkpoint, or a TrainingStopped that says what failed and what is intact (a full disk)."""
    _check_adapter_finite(trained, step, args, output_dir)
    try:
        path = save_checkpoint(accelerator, output_dir, step, {"step": step, "seed": args.seed}, args.checkpoints_total_limit)
    except (OSError, RuntimeError) as err:  # torch.save reports a full disk as RuntimeError
        raise TrainingStopped(
            f"could not write checkpoint-{step} in '{output_dir}' ({_reason(err)}); the earlier checkpoints are intact "
            f"(latest: {latest_checkpoint(output_dir) or 'none'}): make room, then rerun with --resume_from_checkpoint latest"
        ) from None
    logger.info("Saved %s", path)
    return path


def _reason(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def _multi_process_without_accelerator() -> bool:
    """True under torchrun / mpirun on a machine without GPUs: accelerate then needs cpu=True to use gloo."""
    world_size = int(os.environ.get("WORLD_SIZE", os.environ.get("PMI_SIZE", "1")))
    has_accelerator = torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    return world_size > 1 and not has_accelerator


def _configure_logging(accelerator) -> None:
    import diffusers
    import transformers

    level = logging.INFO if accelerator.is_local_main_process else logging.ERROR
    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("moslora_diffusion").setLevel(level)
    transformers.utils.logging.set_verbosity_warning() if accelerator.is_local_main_process else transformers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.set_verbosity_warning() if accelerator.is_local_main_process else diffusers.utils.logging.set_verbosity_error()


def _progress(accelerator):
    return functools.partial(tqdm, disable=not accelerator.is_local_main_process)


def _tracker_config(args) -> dict:
    """The flags as TensorBoard hparams (scalars and strings only)."""
    skip = {"base", "instance_images", "resume_checkpoint", "local_rank", "config"}
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in vars(args).items() if k not in skip and v is not None}


def _log_run(accelerator, args, family, objective, trained, num_examples, steps_per_epoch) -> None:
    adapter = sum(p.numel() for model in trained.values() for p in model.parameters() if p.requires_grad)
    logger.info(
        "Training %s (%s) on %s: %d examples, %d steps (%d per epoch), batch %d x %d processes x %d accumulation; "
        "MoSLoRA r=%d alpha=%s on %s: %.2fM trainable parameters",
        family.name, objective.description, args.pretrained_model_name_or_path, num_examples, args.max_train_steps,
        steps_per_epoch, args.train_batch_size, accelerator.num_processes, args.gradient_accumulation_steps,
        args.rank, args.lora_alpha, ", ".join(trained), adapter / 1e6,
    )


def _model_card(args, family, trained, objective, steps, image_names, written) -> ModelCard:
    config = moslora_config_from_args(args, args.target_modules)
    adapter_settings = {
        "rank r": config.r,
        "alpha": config.lora_alpha,
        "scale s": f"{config.scaling:g}",
        "rsLoRA": config.use_rslora,
        "mixer init": config.mixer_init,
        "mixer trained": config.train_mixer,
        "dropout": config.lora_dropout,
    }
    for name, model in trained.items():
        adapter_settings[f"{name} modules"] = sorted(model.peft_config[ADAPTER_NAME].target_modules)
    training_settings = {
        "steps": steps,
        "objective": objective.description,
        "resolution": args.resolution,
        "batch size": args.train_batch_size,
        "gradient accumulation": args.gradient_accumulation_steps,
        "learning rate": args.learning_rate,
        "text encoder learning rate": args.text_encoder_lr if args.train_text_encoder else None,
        "LR schedule": args.lr_scheduler,
        "prior preservation": f"{args.class_prompt!r}, weight {args.prior_loss_weight}" if args.with_prior_preservation else None,
        "mixed precision": args.mixed_precision or "no",
        "seed": args.seed,
    }
    files = {layout: Path(path).name for layout, path in written.items()}  # diffusers / kohya / native
    return ModelCard(
        base_model=args.pretrained_model_name_or_path,
        family=family,
        instance_prompt=args.instance_prompt,
        validation_prompt=args.validation_prompt,
        adapter_settings=adapter_settings,
        training_settings={k: v for k, v in training_settings.items() if v is not None},
        validation_images=image_names,
        files=files,
        license="apache-2.0" if args.base.is_tiny else None,
    )


if __name__ == "__main__":
    sys.exit(main())
