"""Training checkpoints: accelerate ``save_state`` / ``load_state`` into ``output_dir/checkpoint-<step>``.

A checkpoint holds the adapters only (one safetensors file per trained component, not the frozen base
weights), the optimizer, the LR scheduler, every process's RNG streams and a small ``training_state.json``
(step, seed, family, base_model). Each adapter file carries its component's adapter settings as
safetensors metadata (``moslora.config``: the native header's record of the PEFT config), so that the
``moslora`` tools can read a checkpoint's adapter without the run's flags. It is written under a
temporary name (``.checkpoint-<step>.tmp``) and renamed when complete,
so a crash or a full disk leaves the previous checkpoints as they were, and ``latest`` only ever sees
complete ones; ``--checkpoints_total_limit`` prunes the oldest after a successful save.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from pathlib import Path

import torch
from torch import nn

from ..fileio import atomic_path, dumps_metadata, load_safetensors, save_safetensors
from .processes import describe_processes, failed_processes, is_collective_failure
from .sharding import gather_adapter_state_dict

CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "training_state.json"
ADAPTER_CONFIG_KEY = "moslora.config"  # safetensors metadata of checkpoint-N/adapter_<component>.safetensors
_CHECKPOINT_RE = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints in ``output_dir``, oldest (lowest step) first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if (m := _CHECKPOINT_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The complete checkpoint of the highest step (its training state written last), or None."""
    complete = [p for p in list_checkpoints(output_dir) if (p / STATE_FILE).is_file()]
    return complete[-1] if complete else None


def resolve_resume_checkpoint(output_dir: str | Path, value: str) -> Path:
    """The checkpoint ``--resume_from_checkpoint value`` names: "latest", a checkpoint-N name, or a path."""
    if value == "latest":
        latest = latest_checkpoint(output_dir)
        if latest is None:
            raise ValueError(
                f"--resume_from_checkpoint latest: no checkpoint-<step> folder in --output_dir '{output_dir}'; "
                "drop the flag to start a new run"
            )
        return latest
    path = Path(value)
    if not path.is_dir() and (Path(output_dir) / value).is_dir():
        path = Path(output_dir) / value
    if not path.is_dir():
        raise ValueError(
            f"--resume_from_checkpoint '{value}': no such checkpoint folder (nor in --output_dir '{output_dir}')"
        )
    if not (path / STATE_FILE).is_file():
        raise ValueError(f"--resume_from_checkpoint '{path}' is not a checkpoint of this trainer (no {STATE_FILE})")
    return path


def check_rng_state_readable(checkpoint: str | Path, process_index: int) -> None:
    """accelerate's load_state skips an unreadable RNG state file with only an info log, and the resumed run
    then quietly differs: read it first as accelerate does (torch.load, weights_only=True) and fail clearly."""
    from accelerate.utils import load
    from accelerate.utils.constants import RNG_STATE_NAME

    path = Path(checkpoint) / f"{RNG_STATE_NAME}_{process_index}.pkl"
    try:
        load(path)
    except pickle.UnpicklingError:
        raise ValueError(
            f"{path} holds objects other than RNG states (refused unexecuted: weights_only loading); "
            "this checkpoint cannot continue the run exactly"
        ) from None
    except Exception as err:  # noqa: BLE001 - missing or truncated
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(f"{path} cannot be read ({reason}); this checkpoint cannot continue the run exactly") from None


def read_training_state(checkpoint: str | Path) -> dict:
    return json.loads((Path(checkpoint) / STATE_FILE).read_text())


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors of ``model`` (A, B and mixer, trainable or not), by parameter name."""
    return {name: param.detach() for name, param in model.named_parameters() if "lora_" in name}


def adapter_config_metadata(model: nn.Module, adapter_name: str) -> dict[str, str]:
    """``{"moslora.config": JSON}``: the adapter's settings (rank, alpha, mixer, targets), as the native
    file's header records them."""
    from ..formats import component_config_from_peft

    return {ADAPTER_CONFIG_KEY: dumps_metadata(component_config_from_peft(model.peft_config[adapter_name]))}


def register_adapter_checkpoint_hooks(accelerator, components: dict[str, nn.Module], adapter_name: str) -> None:
    """Make ``save_state`` / ``load_state`` store only the adapters of the prepared ``components``.

    ``components`` maps a component name (``unet``, ``text_encoder``, ...) to its unwrapped model, whose
    adapter ``adapter_name`` is saved with its settings as metadata. The adapter is gathered whole when the
    model is sharded (FSDP, ZeRO-3: :mod:`.sharding`); there accelerate also saves and restores the sharded
    model and optimizer itself, and hands the load hook no model.
    """
    names = {id(model): name for name, model in components.items()}

    def component_name(model: nn.Module) -> str:
        return names[id(accelerator.unwrap_model(model))]

    def save_hook(models, weights, output_dir):
        for model in models:
            tensors = gather_adapter_state_dict(accelerator, model)  # every process: a collective under sharding
            if accelerator.is_main_process:
                unwrapped = accelerator.unwrap_model(model)
                path = Path(output_dir) / f"adapter_{component_name(model)}.safetensors"
                save_safetensors(tensors, path, adapter_config_metadata(unwrapped, adapter_name))
        # Emptying ``weights`` stops accelerate from also writing the full (frozen) models.
        weights.clear()

    def load_hook(models, input_dir):
        while models:
            model = models.pop()
            path = Path(input_dir) / f"adapter_{component_name(model)}.safetensors"
            tensors, _ = load_safetensors(path)
            params = dict(accelerator.unwrap_model(model).named_parameters())
            expected = {name for name in params if "lora_" in name}
            if set(tensors) != expected:
                missing = sorted(expected - set(tensors)) or sorted(set(tensors) - expected)
                raise ValueError(
                    f"{path}: adapter does not match this run's settings (first offending key: {missing[0]})"
                )
            with torch.no_grad():
                for name, tensor in tensors.items():
                    params[name].copy_(tensor)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def save_checkpoint(
    accelerator, output_dir: str | Path, step: int, training_state: dict, total_limit: int | None
) -> Path:
    """``save_state`` into ``output_dir/checkpoint-<step>`` (complete or absent), then prune. All processes call it;
    when any process fails to write its part, every process raises (OSError naming the processes that failed)."""
    output_dir = Path(output_dir)
    final = output_dir / f"{CHECKPOINT_PREFIX}{step}"
    tmp = output_dir / f".{final.name}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        # Every process learns whether each wrote its part (a barrier too), so none is left waiting on one that failed.
        try:
            accelerator.save_state(str(tmp))
            if accelerator.is_main_process:
                with atomic_path(tmp / STATE_FILE) as state_tmp:
                    state_tmp.write_text(json.dumps(training_state, indent=2, sort_keys=True))
        except (OSError, RuntimeError) as err:  # torch.save reports a full disk as RuntimeError
            if not is_collective_failure(err, accelerator.num_processes):
                failed_processes(accelerator, True)  # the others are in the same all-reduce below
            raise
        failed = failed_processes(accelerator, False)
        if failed:
            whose = "its" if len(failed) == 1 else "their"
            raise OSError(f"{describe_processes(failed)} could not write {whose} part: see {whose} message")
    except BaseException:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)  # a full disk: give back what was written
        raise
    if accelerator.is_main_process:
        if final.exists():  # the same step saved again (a resumed run): swap, never delete first
            old = output_dir / f".{final.name}.deleting"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        prune_checkpoints(output_dir, total_limit)
    accelerator.wait_for_everyone()
    return final


def prune_checkpoints(output_dir: str | Path, total_limit: int | None) -> list[Path]:
    """Delete the oldest checkpoints so that at most ``total_limit`` remain; returns the deleted ones."""
    if total_limit is None:
        return []
    checkpoints = list_checkpoints(output_dir)
    doomed = checkpoints[: max(0, len(checkpoints) - total_limit)]
    for path in doomed:
        # Renamed first: a crash midway leaves a hidden folder, never a half-deleted checkpoint-<step>.
        aside = path.with_name(f".{path.name}.deleting")
        os.replace(path, aside)
        shutil.rmtree(aside)
    return doomed


def remove_incomplete_checkpoints(output_dir: str | Path) -> list[str]:
    """Delete what killed runs left half-written or half-deleted (``.checkpoint-*.tmp`` / ``.deleting``)."""
    output_dir = Path(output_dir)
    leftovers = sorted(output_dir.glob(f".{CHECKPOINT_PREFIX}*.tmp")) + sorted(
        output_dir.glob(f".{CHECKPOINT_PREFIX}*.deleting")
    )
    for path in leftovers:
        shutil.rmtree(path, ignore_errors=True)
    return [p.name for p in leftovers]
