"""DreamBooth training of a MoSLoRA adapter, for every supported family, on accelerate.

The recipe behind ``train_scripts/train_dreambooth_moslora.py`` and ``moslora train``: parse, set up,
train, save. Family differences live in :mod:`moslora_diffusion.families`; data, prior preservation,
objectives, checkpoints, validation and the model card live in this package.

    python train_scripts/train_dreambooth_moslora.py --config samples/dreambooth_tiny.toml --output_dir out
    accelerate launch train_scripts/train_dreambooth_moslora.py --pretrained_model_name_or_path ...  # diffusers' flags

The recipe reads its :class:`~.config.RunConfig` (frozen) and :class:`~.run_inputs.RunInputs` once and hands
each component the values it needs; what is known only once the base is loaded (the resolution, the number
of steps, learning rates under --scale_lr) is a local value here, never written back into the config.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import os
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, broadcast_object_list, set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import cast_training_params
from tqdm.auto import tqdm

from ..config import MoSLoRAConfig
from ..datasets.cache import TensorCache
from ..formats import write_adapter_files
from .adapters import (
    ADAPTER_NAME,
    adapter_param_groups,
    add_adapters,
    enable_gradient_checkpointing,
    freeze_all_but_mixers,
    place_frozen_components,
    weight_dtype_for,
)
from .batches import PromptConditioning, batch_loss, text_encoders_fingerprint, vae_posterior_parameters
from .checkpoints import (
    check_rng_state_readable,
    latest_checkpoint,
    read_training_state,
    register_adapter_checkpoint_hooks,
    remove_incomplete_checkpoints,
    save_checkpoint,
)
from .config import RunConfig, UsageError
from .data import (
    build_training_data,
    cache_latents,
    cache_root,
    possible_captions,
    with_class_images,
    with_default_resolution,
)
from .ema import AdapterEMA, register_ema_checkpoint_hooks
from .guards import InterruptRequests, OutputDirLock, TrainingStopped, divergence_message, refuse_earlier_run_outputs
from .init_lora import add_init_lora
from .model_card import ModelCard
from .objectives import make_objective
from .offload import OffloadedComponents
from .optimizers import SCHEDULE_FREE, evaluation_weights, make_optimizer, parse_optimizer_args
from .prior import generate_class_images
from .processes import (
    RunPosition,
    failed_processes,
    is_collective_failure,
    lost_process_message,
    process_group_kwargs,
)
from .run_inputs import RunInputs, may_replace_earlier_run
from .sharding import adapter_state, gather_adapters
from .train_log import LOG_NAME, TrainLog
from .validation import generate_validation_images, log_validation, save_png

logger = logging.getLogger("moslora_diffusion.train")


def train(config: RunConfig, inputs: RunInputs) -> Path:
    """Train under a lock on --output_dir (one run per folder) with Ctrl-C saving a checkpoint first."""
    started = time.monotonic()
    output_dir = Path(config.output_dir)
    accelerator = Accelerator(
        cpu=_multi_process_without_accelerator(),
        mixed_precision=config.mixed_precision,
        log_with=None if config.report_to == "none" else config.report_to,
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / config.logging_dir)
        ),
        # SDXL and SD3 read CLIP's penultimate layer: the last layer's adapter gets no gradient.
        kwargs_handlers=[
            DistributedDataParallelKwargs(find_unused_parameters=config.train_text_encoder),
            *process_group_kwargs(config.ddp_timeout),
        ],
    )
    _configure_logging(accelerator)
    lock = _lock_output_dir(accelerator, output_dir, may_replace_earlier_run(config, inputs.resume_checkpoint))
    position = RunPosition()
    try:
        with InterruptRequests() as interrupts:
            return _train(config, inputs, accelerator, output_dir, interrupts, started, position)
    except RuntimeError as err:
        if not is_collective_failure(err, accelerator.num_processes):
            raise
        # A process died (or a node was lost): one line and a non-zero exit, not a gloo / NCCL traceback.
        message = lost_process_message(err, accelerator.num_processes, position.step, latest_checkpoint(output_dir))
        raise TrainingStopped(message) from None
    finally:
        lock.release()


def _train(
    config: RunConfig,
    inputs: RunInputs,
    accelerator,
    output_dir: Path,
    interrupts: InterruptRequests,
    started: float,
    position: RunPosition,
) -> Path:
    # ---------------------------------------------------------------- setup
    seed = broadcast_object_list([config.seed])[0]  # the main process's, when each process drew its own
    set_seed(seed)
    if config.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    base, family, weight_dtype = inputs.base, inputs.base.family, weight_dtype_for(accelerator.mixed_precision)

    try:
        components = base.load_components(
            revision=config.revision,
            variant=config.variant,
            vae_source=config.pretrained_vae_model_name_or_path,
            quantization=inputs.quantization,
            torch_dtype=weight_dtype,
            trained_text_encoders=family.trainable_text_encoders if config.train_text_encoder else (),
        )
    except OSError as err:
        # e.g. a folder with pickled .bin weights only: from_pretrained(use_safetensors=True) refuses it
        raise UsageError(
            f"cannot load the base model '{config.pretrained_model_name_or_path}' ({_reason(err)}); weights are "
            "read from .safetensors files only, never from pickle files (.bin, .ckpt, .pt)"
        ) from None
    except ValueError as err:  # a single-file base whose --base_config cannot be fetched or does not fit it
        raise UsageError(
            f"cannot load the base model '{config.pretrained_model_name_or_path}' ({_reason(err)})"
        ) from None
    place_frozen_components(
        components, family, accelerator.device, weight_dtype, custom_vae=bool(config.pretrained_vae_model_name_or_path)
    )
    pipeline = base.build_pipeline(components)  # shares the modules: samples with the adapter once it is added
    resolution = config.resolution or base.default_resolution(components)
    max_sequence_length = family.resolve_max_sequence_length(components, config.max_sequence_length)
    call_kwargs = {"height": resolution, "width": resolution, **family.pipeline_call_kwargs(max_sequence_length)}
    if config.num_inference_steps:
        call_kwargs["num_inference_steps"] = config.num_inference_steps
    validation_kwargs = _validation_call_kwargs(config, call_kwargs, resolution)
    if config.validation_cpu_offload and accelerator.device.type != "cuda":
        logger.info(
            "--validation_cpu_offload has no effect on %s: it moves models to and from a CUDA GPU", accelerator.device
        )
    objective = make_objective(
        family,
        components["scheduler"].config,
        snr_gamma=config.snr_gamma,
        noise_offset=config.noise_offset,
        weighting_scheme=config.weighting_scheme,
        logit_mean=config.logit_mean,
        logit_std=config.logit_std,
        mode_scale=config.mode_scale,
        precondition_outputs=config.precondition_outputs,
    )

    specs, records = with_default_resolution(inputs.dataset_specs, resolution), list(inputs.images)
    if config.with_prior_preservation:
        made = generate_class_images(
            accelerator,
            pipeline,
            config.class_data_dir,
            config.class_prompt,
            config.num_class_images,
            sample_batch_size=config.sample_batch_size,
            seed=seed,
            call_kwargs=call_kwargs,
            autocast=accelerator.autocast,
        )
        specs, records = with_class_images(
            specs, records, config.class_data_dir, config.class_prompt, config.num_class_images, config.caption_column
        )
        logger.info(
            "Prior preservation: %d class images in %s (%d generated)",
            sum(record.subset.is_reg for record in records), config.class_data_dir, made,
        )  # fmt: skip

    try:
        text_encoder_config = (
            adapter_config(config, config.text_encoder_target_modules) if config.train_text_encoder else None
        )
        if inputs.init_lora is not None:
            trained = add_init_lora(
                components,
                family,
                inputs.init_lora,
                target_modules=config.target_modules,
                train_text_encoder=config.train_text_encoder,
                text_encoder_config=text_encoder_config,
                train_mixer=not config.freeze_mixer,
                lora_dropout=config.lora_dropout,
                adapter_name=ADAPTER_NAME,
            )
        else:
            trained = add_adapters(
                components, family, adapter_config(config, config.target_modules), text_encoder_config
            )
    except ValueError as err:
        raise UsageError(str(err)) from None
    if config.train_mixer_only:
        logger.info(
            "--train_mixer_only: %d mixer parameters train; A and B stay as in the file", freeze_all_but_mixers(trained)
        )
    if weight_dtype != torch.float32:
        cast_training_params(list(trained.values()), dtype=torch.float32)  # adapters train in fp32
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(trained, family)

    data = build_training_data(
        specs,
        records,
        seed=seed,
        num_replicas=accelerator.num_processes,
        rank=accelerator.process_index,
        masked_loss=config.masked_loss,
        vae_scale_factor=family.vae_scale_factor(components["vae"]),
        fixed_crops=config.cache_latents,
        num_workers=config.dataloader_num_workers,
    )
    dataset, sampler, dataloader = data.dataset, data.sampler, data.loader
    logger.info("Buckets:\n%s", data.bucket_table())
    offloaded = OffloadedComponents(components, [], accelerator.device)
    if config.cache_latents:
        latent_cache = cache_latents(
            dataset,
            functools.partial(vae_posterior_parameters, components["vae"], family=family),
            components["vae"],
            cache_root() / "latents" if config.cache_latents_to_disk else None,
            progress=_progress(accelerator),
            rank=accelerator.process_index,
            num_processes=accelerator.num_processes,
            wait_for_everyone=accelerator.wait_for_everyone,
        )
        counts = accelerator.gather(torch.tensor([[latent_cache.computed, latent_cache.hits]])).tolist()
        logger.info(
            "Latents: %d encoded (by process: %s), %d read from the cache",
            sum(c for c, _ in counts), ", ".join(str(c) for c, _ in counts), sum(h for _, h in counts),
        )  # fmt: skip
        offloaded.names.append("vae")
    accumulation = config.gradient_accumulation_steps
    steps_per_epoch = math.ceil(len(sampler) / accumulation)
    total_steps = config.max_train_steps or config.num_train_epochs * steps_per_epoch
    num_epochs = math.ceil(total_steps / steps_per_epoch)

    lr_factor = accumulation * config.train_batch_size * accelerator.num_processes if config.scale_lr else 1
    learning_rate, text_encoder_lr = config.learning_rate * lr_factor, config.text_encoder_lr * lr_factor
    mixer_lr = None if config.mixer_lr is None else config.mixer_lr * lr_factor
    schedule_free = config.optimizer == SCHEDULE_FREE  # warms up by itself and takes no LR schedule
    optimizer = make_optimizer(
        adapter_param_groups(
            trained,
            family,
            learning_rate=learning_rate,
            text_encoder_lr=text_encoder_lr,
            weight_decay=config.adam_weight_decay,
            text_encoder_weight_decay=config.adam_weight_decay_text_encoder,
            loraplus_lr_ratio=config.loraplus_lr_ratio,
            mixer_lr=mixer_lr,
        ),
        config.optimizer,
        betas=(config.adam_beta1, config.adam_beta2),
        eps=config.adam_epsilon,
        warmup_steps=config.lr_warmup_steps,
        optimizer_args=parse_optimizer_args(config.optimizer_args),
    )
    lr_scheduler = get_scheduler(
        "constant" if schedule_free else config.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=0 if schedule_free else config.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=total_steps * accelerator.num_processes,
        num_cycles=config.lr_num_cycles,
        power=config.lr_power,
    )
    prepared = accelerator.prepare(*trained.values(), optimizer, lr_scheduler)
    prepared_models, optimizer, lr_scheduler = dict(zip(trained, prepared[:-2])), prepared[-2], prepared[-1]
    register_adapter_checkpoint_hooks(accelerator, trained, ADAPTER_NAME)
    ema = AdapterEMA.of_adapters(trained, config.ema_decay) if config.use_ema else None
    if ema is not None:
        register_ema_checkpoint_hooks(accelerator, ema)
    denoiser = prepared_models[family.denoiser]
    if config.compile:
        # Training only (validation samples eagerly through the pipeline's own module); the checkpoint hooks and
        # the adapter files read the uncompiled modules, so no `_orig_mod.` prefix reaches a file.
        denoiser = torch.compile(denoiser, backend=config.compile_backend)

    text_components = {
        name: prepared_models.get(name, c)
        for name, c in components.items()
        if name.startswith(("text_encoder", "tokenizer"))
    }
    text_components[family.denoiser] = components[family.denoiser]  # SD3 without T5 reads its width
    conditioning = PromptConditioning(
        family, max_sequence_length, text_components, accelerator.device, trained=config.train_text_encoder
    )
    captions = possible_captions(dataset.records)
    if not config.train_text_encoder and captions is not None:
        store, fingerprint = None, ""
        if config.cache_text_encoder_outputs_to_disk:
            fingerprint = text_encoders_fingerprint(family, text_components, max_sequence_length)
            store = TensorCache(cache_root() / "text_encoder", "text encoder")
        store = conditioning.cache(captions, store, fingerprint, progress=_progress(accelerator))
        logger.info("Captions: %d encoded, %d from the cache", store.computed, store.hits)
        if config.cache_text_encoder_outputs:
            offloaded.names += [name for name in text_components if name.startswith("text_encoder")]
    offloaded.offload()

    global_step = 0
    if inputs.resume_checkpoint is not None:
        try:
            check_rng_state_readable(inputs.resume_checkpoint, accelerator.process_index)
        except ValueError as err:
            raise TrainingStopped(str(err)) from None
        try:
            accelerator.load_state(str(inputs.resume_checkpoint))
        except (ValueError, KeyError, RuntimeError) as err:
            if is_collective_failure(err, accelerator.num_processes):
                raise
            # An optimizer, scheduler or adapter that does not fit this run's settings (other flags, or a
            # checkpoint of an older version whose optimizer had other parameter groups).
            raise TrainingStopped(
                f"cannot resume from {inputs.resume_checkpoint}: it does not fit this run's settings ({_reason(err)}); "
                "resume with the flags of the run that wrote it, or start over with --overwrite_output_dir"
            ) from None
        global_step = position.step = read_training_state(inputs.resume_checkpoint)["step"]
        logger.info("Resumed from %s at step %d", inputs.resume_checkpoint, global_step)
    if accelerator.is_main_process and config.report_to != "none":
        accelerator.init_trackers("dreambooth-moslora", config=_tracker_config(config, resolution, total_steps))
    _log_run(accelerator, config, inputs, objective, trained, len(dataset), steps_per_epoch, total_steps)

    def divergence(what: str, step: int) -> TrainingStopped:
        return TrainingStopped(
            divergence_message(
                step,
                what,
                learning_rate=learning_rate,
                text_encoder_lr=text_encoder_lr if config.train_text_encoder else None,
                mixed_precision=config.mixed_precision,
                last_checkpoint=latest_checkpoint(output_dir),
            )
        )

    def save(step: int) -> Path:
        _check_adapter_finite(accelerator, trained, step, divergence)
        state = {"step": step, "seed": seed, "family": family.name, "base_model": config.pretrained_model_name_or_path}
        return _save_checkpoint(accelerator, state, config.checkpoints_total_limit, output_dir, step)

    # ---------------------------------------------------------------- train
    def validate(step: int, final: bool = False) -> list:
        """(prompt, images) per validation prompt, with the live weights (schedule-free AdamW: its average x)."""
        with evaluation_weights(optimizer, config.optimizer):
            rows = generate_validation_images(
                pipeline,
                config.validation_prompt,
                config.num_validation_images,
                seed,
                validation_kwargs,
                list(trained.values()),
                autocast=accelerator.autocast,
                negative_prompt=config.validation_negative_prompt,
                cpu_offload=config.validation_cpu_offload,
            )
        if rows:
            log_validation(
                accelerator,
                rows,
                output_dir / "validation" / ("final.png" if final else f"step_{step:06d}.png"),
                step,
            )
        return rows

    validate = offloaded.around(validate)  # the pipeline needs every component on the accelerator
    if interrupts.requested:
        raise TrainingStopped("interrupted before the first step; nothing to save", interrupts.exit_code)
    if accelerator.is_main_process and config.validation_at_start and global_step == 0:
        validate(0)  # B = 0 at the start, so these are the base model's own images
    for model in prepared_models.values():
        model.train()
    # Listed once: walking every module for its parameters at each step costs 1 ms even on a tiny UNet.
    trainable_params = [p for model in trained.values() for p in model.parameters() if p.requires_grad]
    train_log = (
        TrainLog(output_dir / config.logging_dir / LOG_NAME, global_step) if accelerator.is_main_process else None
    )
    step_losses = []
    progress = tqdm(total=total_steps, initial=global_step, desc="Steps", disable=not accelerator.is_local_main_process)
    first_epoch, resume_batches = divmod(global_step, steps_per_epoch)
    resume_batches *= accumulation
    for epoch in range(first_epoch, num_epochs):
        skip = resume_batches if epoch == first_epoch else 0
        sampler.set_epoch(epoch, skip_batches=skip)
        dataset.set_epoch(epoch)
        for batch_index, batch in enumerate(dataloader, start=skip):
            # One optimizer step per --gradient_accumulation_steps batches (fewer at the end of an epoch).
            group_start = batch_index - batch_index % accumulation
            group_size = min(accumulation, len(sampler) - group_start)
            syncs = batch_index - group_start == group_size - 1
            with _no_sync(accelerator, [] if syncs else list(prepared_models.values())):
                loss = batch_loss(
                    batch,
                    denoiser=denoiser,
                    vae=components["vae"],
                    family=family,
                    objective=objective,
                    conditioning=conditioning,
                    weight_dtype=weight_dtype,
                    prior_loss_weight=config.prior_loss_weight,
                    guidance_scale=config.guidance_scale,
                )
                accelerator.backward(loss / group_size)
            step_losses.append(loss.detach())
            if not syncs:
                continue
            accelerator.clip_grad_norm_(trainable_params, config.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.step()
            global_step += 1
            position.step = global_step
            progress.update(1)
            diverged, interrupted = _step_status(accelerator, step_losses, interrupts)
            step_losses = []
            logs = {"loss": loss.detach().item(), "lr": lr_scheduler.get_last_lr()[0]}
            progress.set_postfix(**logs)
            accelerator.log(logs, step=global_step)
            if train_log is not None:
                train_log.write(global_step, **logs)
            if diverged:
                raise divergence("the loss became NaN or infinite", global_step)
            saved = None
            # Also at the last step, whatever --checkpointing_steps: a later run can resume and extend it.
            if global_step % config.checkpointing_steps == 0 or global_step >= total_steps:
                saved = save(global_step)
            if interrupted:
                saved = saved or save(global_step)
                raise TrainingStopped(
                    f"at step {global_step}; saved {saved}: continue with --resume_from_checkpoint latest",
                    interrupts.exit_code,
                )
            if accelerator.is_main_process and global_step % config.validation_steps == 0 and global_step < total_steps:
                validate(global_step)
            if global_step >= total_steps:
                break
        if global_step >= total_steps:
            break
    progress.close()

    # ---------------------------------------------------------------- save
    accelerator.wait_for_everyone()
    _check_adapter_finite(accelerator, trained, global_step, divergence)
    if ema is not None:
        ema.copy_to_adapters()  # the files hold the averages; the last checkpoint keeps the live weights
    if schedule_free:
        optimizer.eval()  # the files hold schedule-free AdamW's average x, the weights it evaluates
    written = _write_adapter_files(
        accelerator,
        prepared_models,
        trained,
        family,
        output_dir,
        frozen=_frozen_adapters(components, trained),
        base_model=config.pretrained_model_name_or_path,
        denoiser_config=dict(components[family.denoiser].config),
    )
    if accelerator.is_main_process:
        images = [(prompt, image) for prompt, row in validate(global_step, final=True) for image in row]
        image_names = [
            (save_png(image, output_dir / f"image_{i}.png").name, prompt) for i, (prompt, image) in enumerate(images)
        ]
        card = _model_card(
            config,
            inputs,
            trained,
            objective,
            global_step,
            image_names,
            written,
            resolution=resolution,
            learning_rate=learning_rate,
            text_encoder_lr=text_encoder_lr,
            seed=seed,
        )
        card.save(output_dir / "README.md")
        files = ", ".join(
            [*card.files.values(), "README.md"] + ([f"{len(image_names)} validation images"] if image_names else [])
        )
        print(
            f"Trained {family.name} MoSLoRA adapter for {global_step} steps in {time.monotonic() - started:.0f}s "
            f"on {accelerator.num_processes} process(es): wrote {files} to {output_dir}",
            flush=True,
        )
    # Every process tears down together: when a peer had already left while the main process was still
    # validating, the gloo process group's destructor (run as the DDP reducer is freed) waited for it forever.
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return output_dir


# -------------------------------------------------------------------- helpers of the recipe


def adapter_config(config: RunConfig, target_modules: str | tuple[str, ...]) -> MoSLoRAConfig:
    """The MoSLoRA settings of the run's flags, on ``target_modules``."""
    return MoSLoRAConfig(
        r=config.rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        use_rslora=config.use_rslora,
        mixer_init=config.mixer_init,
        train_mixer=not config.freeze_mixer and config.mixer_lr != 0,  # --mixer_lr 0: M stays at its initial value
        target_modules=target_modules if isinstance(target_modules, str) else list(target_modules),
    )


def _validation_call_kwargs(config: RunConfig, call_kwargs: dict, resolution: int) -> dict:
    """The pipeline call of the validation images: the class images' call with the --validation_* settings."""
    width, height = config.validation_resolution or (resolution, resolution)
    kwargs = {**call_kwargs, "width": width, "height": height}
    if config.validation_num_inference_steps:
        kwargs["num_inference_steps"] = config.validation_num_inference_steps
    if config.validation_guidance_scale is not None:
        kwargs["guidance_scale"] = config.validation_guidance_scale
    return kwargs


def _lock_output_dir(accelerator, output_dir: Path, may_replace_earlier_run: bool) -> OutputDirLock:
    """Lock --output_dir for this run (the main process does; every process learns the outcome).

    A folder holding an earlier run's adapter or checkpoints is refused (a UsageError: exit status 2)
    unless the run resumes or --overwrite_output_dir says to replace them.
    """
    lock, refusal = OutputDirLock(output_dir), None
    if accelerator.is_main_process:
        try:
            lock.acquire()
        except TrainingStopped as err:
            refusal = ("stopped", str(err))
        else:
            try:
                if not may_replace_earlier_run:  # checked before the run too; again for a folder that was locked then
                    refuse_earlier_run_outputs(output_dir)
            except ValueError as err:
                refusal = ("usage", str(err))
            else:
                removed = remove_incomplete_checkpoints(output_dir)
                if removed:
                    logger.info("Removed what an interrupted run left half-written: %s", ", ".join(removed))
    refusal = broadcast_object_list([refusal])[0]
    if refusal:
        lock.release()
        kind, message = refusal
        raise UsageError(message) if kind == "usage" else TrainingStopped(message)
    return lock


def _frozen_adapters(components: dict, trained: dict) -> dict[str, torch.nn.Module]:
    """Components that carry the adapter without training it (--init_lora's text-encoder layers): saved too."""
    return {
        name: model
        for name, model in components.items()
        if name not in trained and ADAPTER_NAME in (getattr(model, "peft_config", None) or {})
    }


def _write_adapter_files(
    accelerator,
    prepared_models: dict,
    trained: dict,
    family,
    output_dir: Path,
    *,
    frozen: dict,
    base_model: str,
    denoiser_config: dict,
) -> dict[str, Path]:
    """The final adapter in the three layouts, gathered whole from every process (a collective under FSDP or
    ZeRO-3) and written by the main process; a write that fails stops every process with one line. ``frozen``
    components (never prepared, so never sharded) are read as they are; ``denoiser_config`` places modules
    under the original model's names in the kohya file (SDXL, SD3, Flux)."""
    from ..loaders import component_adapter_from_model

    adapters = gather_adapters(accelerator, prepared_models)
    written, failure = {}, None
    if accelerator.is_main_process:
        state = adapter_state(trained, adapters, family.name, ADAPTER_NAME, base_model)
        for name, model in frozen.items():
            state.components[name] = component_adapter_from_model(model, ADAPTER_NAME, name)
        try:
            written = write_adapter_files(state, output_dir, denoiser_config=denoiser_config)
        except OSError as err:
            failure = _reason(err)
        else:
            modules = ", ".join(f"{c}: {len(a.layers)} modules" for c, a in state.components.items())
            logger.info("Saved %s adapter %r (%s) to %s", family.name, ADAPTER_NAME, modules, output_dir)
    if failed_processes(accelerator, failure is not None):
        raise TrainingStopped(
            f"{'' if failure else 'the main process '}could not write the adapter files to '{output_dir}' "
            f"({failure or 'see its message'}); no file was left half-written and the checkpoints are intact "
            f"(latest: {latest_checkpoint(output_dir) or 'none'}): make room, then rerun with "
            "--resume_from_checkpoint latest"
        )
    return written


def _step_status(accelerator, step_losses: list[torch.Tensor], interrupts: InterruptRequests) -> tuple[bool, bool]:
    """(a loss of this step was not finite, Ctrl-C was pressed) on any process: all processes stop together."""
    losses = torch.stack(step_losses).float()
    flags = torch.stack([(~torch.isfinite(losses)).any().float(), losses.new_tensor(float(interrupts.requested))])
    if accelerator.num_processes > 1:
        flags = accelerator.reduce(flags.to(accelerator.device), reduction="sum")
    diverged, interrupted = (bool(flag > 0) for flag in flags)
    return diverged, interrupted


def _check_adapter_finite(accelerator, trained: dict, step: int, divergence) -> None:
    """Never save NaN or infinite adapter weights (a finite loss can still leave them). Under sharding each
    process sees its own slice: every process learns of any non-finite weight and stops."""
    finite = all(
        bool(torch.isfinite(p).all()) for model in trained.values() for n, p in model.named_parameters() if "lora_" in n
    )
    if failed_processes(accelerator, not finite):
        raise divergence("the adapter weights became NaN or infinite", step)


def _save_checkpoint(accelerator, training_state: dict, total_limit: int | None, output_dir: Path, step: int) -> Path:
    """save_checkpoint, or a TrainingStopped that says what failed and what is intact (a full disk)."""
    try:
        path = save_checkpoint(accelerator, output_dir, step, training_state, total_limit)
    except (OSError, RuntimeError) as err:  # torch.save reports a full disk as RuntimeError
        if is_collective_failure(err, accelerator.num_processes):
            raise  # another process is gone, not a write that failed here: train() says so
        raise TrainingStopped(
            f"could not write checkpoint-{step} in '{output_dir}' ({_reason(err)}); the earlier checkpoints are intact "
            f"(latest: {latest_checkpoint(output_dir) or 'none'}): make room, then rerun with "
            "--resume_from_checkpoint latest"
        ) from None
    logger.info("Saved %s", path)
    return path


def _no_sync(accelerator, models: list[torch.nn.Module]):
    """Skip DDP's gradient all-reduce for every model (accumulation micro-batches before the last)."""
    stack = contextlib.ExitStack()
    for model in models:
        stack.enter_context(accelerator.no_sync(model))
    return stack


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
    for library in (transformers, diffusers):
        if accelerator.is_local_main_process:
            library.utils.logging.set_verbosity_warning()
        else:
            library.utils.logging.set_verbosity_error()


def _progress(accelerator):
    return functools.partial(tqdm, disable=not accelerator.is_local_main_process)


def _tracker_config(config: RunConfig, resolution: int, total_steps: int) -> dict:
    """The run's settings as TensorBoard hparams (scalars and strings only)."""
    values = {**dataclasses.asdict(config), "resolution": resolution, "max_train_steps": total_steps}
    values.pop("local_rank")
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in values.items() if v is not None}


def _log_run(
    accelerator, config: RunConfig, inputs: RunInputs, objective, trained, num_examples, steps_per_epoch, total_steps
) -> None:
    adapter = sum(p.numel() for model in trained.values() for p in model.parameters() if p.requires_grad)
    logger.info(
        "Training %s (%s) on %s: %d examples, %d steps (%d per epoch), batch %d x %d processes x %d accumulation; "
        "MoSLoRA r=%d alpha=%s on %s: %.2fM trainable parameters",
        inputs.base.family.name,
        objective.description,
        config.pretrained_model_name_or_path,
        num_examples,
        total_steps,
        steps_per_epoch,
        config.train_batch_size,
        accelerator.num_processes,
        config.gradient_accumulation_steps,
        config.rank,
        config.lora_alpha,
        ", ".join(trained),
        adapter / 1e6,
    )


def _model_card(
    config: RunConfig,
    inputs: RunInputs,
    trained,
    objective,
    steps,
    image_names,
    written,
    *,
    resolution: int,
    learning_rate: float,
    text_encoder_lr: float,
    seed: int,
) -> ModelCard:
    adapter = trained[inputs.base.family.denoiser].peft_config[ADAPTER_NAME]  # the run's, or the --init_lora file's
    adapter_settings = {
        "rank r": adapter.r,
        "alpha": adapter.lora_alpha,
        "scale s": f"{adapter.scaling:g}",
        "rsLoRA": adapter.use_rslora,
        "mixer init": adapter.mixer_init,
        "mixer trained": adapter.train_mixer,
        "dropout": adapter.lora_dropout,
    }
    for name, model in trained.items():
        adapter_settings[f"{name} modules"] = sorted(model.peft_config[ADAPTER_NAME].target_modules)
    training_settings = {
        "steps": steps,
        "objective": objective.description,
        "resolution": resolution,
        "batch size": config.train_batch_size,
        "gradient accumulation": config.gradient_accumulation_steps,
        "learning rate": learning_rate,
        "text encoder learning rate": text_encoder_lr if config.train_text_encoder else None,
        "LR schedule": "none (schedule-free)" if config.optimizer == SCHEDULE_FREE else config.lr_scheduler,
        "optimizer": " ".join([config.optimizer, *config.optimizer_args]),
        "LoRA+ ratio (B's LR / A's)": config.loraplus_lr_ratio if config.loraplus_lr_ratio != 1 else None,
        "mixer learning rate": config.mixer_lr,
        "weights in the files": f"EMA (decay {config.ema_decay})" if config.use_ema else None,
        "prior preservation": f"{config.class_prompt!r}, weight {config.prior_loss_weight}"
        if config.with_prior_preservation
        else None,
        "initial LoRA": config.init_lora,
        "base configs": inputs.base.base_config,
        "mixed precision": config.mixed_precision or "no",
        "seed": seed,
    }
    files = {layout: Path(path).name for layout, path in written.items()}  # diffusers / kohya / native
    return ModelCard(
        base_model=config.pretrained_model_name_or_path,
        family=inputs.base.family,
        instance_prompt=config.instance_prompt or config.validation_prompt[0],
        validation_prompts=config.validation_prompt,
        adapter_settings=adapter_settings,
        training_settings={k: v for k, v in training_settings.items() if v is not None},
        validation_images=image_names,
        files=files,
        license="apache-2.0" if inputs.base.is_tiny else None,
    )
