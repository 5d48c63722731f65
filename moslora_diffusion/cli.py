"""The ``moslora`` command: one small function per subcommand, registered in ``SUBCOMMANDS``.

    moslora train --config FILE | --pretrained_model_name_or_path ... (flags of train_dreambooth_moslora.py)
    moslora export ADAPTER [--layout diffusers|kohya|onetrainer ...]   native file -> folded files for clients
    moslora inspect FILE [--pretrained_model_name_or_path DIR] [--json]
    moslora resize ADAPTER --rank K [--output_dir DIR]   exact best rank-K approximation of each s B M A
    moslora merge --base DIR|FILE.safetensors --adapter PATH[:WEIGHT] ... --output OUT_DIR | OUT.safetensors
                                                                                        bake adapters in

To add a subcommand, write ``_<name>_arguments(parser)`` and ``_run_<name>(args) -> int`` and add a
``Subcommand`` to ``SUBCOMMANDS``; import heavy modules inside the run function. Errors meant for people
(ValueError, FileNotFoundError, FileExistsError) become one line, ``moslora: error: ...``, and exit 2.
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import _warnings  # noqa: F401  (library notices that are not the user's concern)

EXIT_USAGE = 2
EXPORT_LAYOUTS = ("diffusers", "kohya", "onetrainer")  # formats.names.LAYOUTS less native (kept light for --help)


@dataclass(frozen=True)
class Subcommand:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int | None]


# ------------------------------------------------------------------------------------------------
# export


def _export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "adapter", help="native moslora_weights.safetensors, the folder holding it, or a training checkpoint-N folder"
    )
    parser.add_argument(
        "--layout",
        action="append",
        choices=EXPORT_LAYOUTS,
        help="a layout to write; repeat for several (default: diffusers and kohya). diffusers: "
        "pytorch_lora_weights.safetensors (stock diffusers, ComfyUI); kohya: ..._kohya.safetensors (A1111, "
        "Forge, ComfyUI; SD3/Flux in sd-scripts' names); onetrainer: ..._onetrainer.safetensors (SD3/Flux "
        "under diffusers names, lora_transformer_)",
    )
    parser.add_argument(
        "--to", choices=("diffusers", "kohya", "both"), help="older spelling of --layout (both: diffusers and kohya)"
    )
    parser.add_argument("--output_dir", help="where to write (default: the adapter's folder)")
    parser.add_argument("--title", help="title on the kohya LoRA card (default: the output folder's name)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing files")


def _run_export(args: argparse.Namespace) -> int:
    from .formats.files import read_adapter_file, write_adapter_files

    state = read_adapter_file(args.adapter)
    source = state.source_path
    if state.source_format not in ("native", "checkpoint"):
        raise ValueError(
            f"{source}: is a {state.source_format} file; export reads a native MoSLoRA file "
            "(moslora_weights.safetensors) or a training checkpoint folder"
        )
    if args.to and args.layout:
        raise ValueError("give --layout or --to, not both (--to is the older spelling)")
    both = ("diffusers", "kohya")
    layouts = tuple(dict.fromkeys(args.layout or (both if args.to in (None, "both") else (args.to,))))
    output_dir = Path(args.output_dir) if args.output_dir else _folder_of(source)
    paths = write_adapter_files(state, output_dir, layouts, title=args.title, overwrite=args.overwrite)
    for layout, path in paths.items():
        print(f"{layout}: {path}")
    modules = sum(len(c.layers) for c in state.components.values())
    print(f"Exported {state.family} adapter ({modules} modules, mixer folded) to {output_dir}")
    return 0


# ------------------------------------------------------------------------------------------------
# inspect


def _inspect_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "file",
        help="an adapter file (native, diffusers, kohya, sd-scripts Flux/SD3, OneTrainer), a folder holding one, "
        "or a training checkpoint-N folder",
    )
    parser.add_argument("--weight_name", help="file name inside a folder")
    parser.add_argument(
        "--pretrained_model_name_or_path",
        help="a local diffusers pipeline folder: also check that the adapter fits it (family, modules, shapes)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def _run_inspect(args: argparse.Namespace) -> int:
    from .formats.files import read_adapter_file
    from .formats.resize import mixer_statistics
    from .loaders import check_adapter_file

    if args.pretrained_model_name_or_path:
        state = check_adapter_file(args.file, args.pretrained_model_name_or_path, args.weight_name)
    else:
        state = read_adapter_file(args.file, args.weight_name)
    report = {
        "file": str(state.source_path),
        "format": state.source_format,
        "family": state.family,
        "base_model": state.base_model,
        "fits": args.pretrained_model_name_or_path,
        "components": {},
        "layers": {},
    }
    for component, adapter in state.components.items():
        ranks = sorted({layer.rank for layer in adapter.layers.values()})
        alphas = sorted({round(layer.scale * layer.rank, 6) for layer in adapter.layers.values()})
        report["components"][component] = {
            "modules": len(adapter.layers),
            "rank": ranks[0] if len(ranks) == 1 else ranks,
            "lora_alpha": adapter.config.get("lora_alpha"),
            "use_rslora": adapter.config.get("use_rslora"),
            "kohya_alpha": alphas[0] if len(alphas) == 1 else alphas,
            "mixer": adapter.config.get("mixer_init") if adapter.config.get("use_moslora") else None,
            "train_mixer": adapter.config.get("train_mixer"),
            "target_modules": adapter.config.get("target_modules"),
        }
        for module, layer in adapter.layers.items():
            if layer.mixer is not None:
                report["layers"][f"{component}.{module}"] = mixer_statistics(layer.mixer)
    if args.json:
        print(json.dumps(report, indent=2, default=_json_number))
    else:
        _print_inspect_report(report)
    return 0


def _json_number(value):
    return None if isinstance(value, float) and math.isinf(value) else str(value)


def _print_inspect_report(report: dict) -> None:
    print(f"file:       {report['file']}")
    print(f"format:     {report['format']}")
    print(f"family:     {report['family'] or 'unknown'}")
    print(f"base model: {report['base_model'] or 'unknown'}")
    if report["fits"]:
        print(f"fits:       {report['fits']} (family, module names and shapes checked)")
    for component, info in report["components"].items():
        mixer = (
            f"mixer {info['mixer']}, {'trainable' if info['train_mixer'] else 'frozen'}"
            if info["mixer"]
            else "no mixer (plain LoRA)"
        )
        rslora = ", rsLoRA" if info["use_rslora"] else ""
        print(
            f"{component}: {info['modules']} modules, rank {info['rank']}, alpha {info['lora_alpha']}{rslora} "
            f"(kohya alpha {info['kohya_alpha']}), {mixer}"
        )
    layers = report["layers"]
    if not layers:
        return
    distances = [s["distance_from_identity"] for s in layers.values()]
    print(
        f"mixers: {len(layers)} layers; ||M - I||_F / ||I||_F min {min(distances):.4f}, "
        f"mean {sum(distances) / len(distances):.4f}, max {max(distances):.4f}"
    )
    width = max(len(name) for name in layers)
    print(f"{'layer'.ljust(width)}  sv_max   sv_min   cond      |M-I|/|I|")
    for name, s in layers.items():
        print(
            f"{name.ljust(width)}  {s['sv_max']:<8.4f} {s['sv_min']:<8.4f} {s['condition']:<9.3g} "
            f"{s['distance_from_identity']:.4f}"
        )


# ------------------------------------------------------------------------------------------------
# resize


def _resize_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "adapter", help="an adapter file or folder, or a training checkpoint-N folder (native: all three layouts)"
    )
    parser.add_argument("--rank", type=int, required=True, help="the new rank k")
    parser.add_argument(
        "--output_dir", help="folder for the resized adapter (default: beside the adapter's folder, named FOLDER-rankK)"
    )
    parser.add_argument("--weight_name", help="file name inside a folder")
    parser.add_argument("--title", help="title on the kohya LoRA card")
    parser.add_argument("--overwrite", action="store_true", help="replace existing files")
    parser.add_argument("--json", action="store_true", help="print the per-layer report as JSON")


def _run_resize(args: argparse.Namespace) -> int:
    from .formats.files import read_adapter_file, write_adapter_files
    from .formats.names import FORMATS
    from .formats.resize import resize_adapter

    state = read_adapter_file(args.adapter, args.weight_name)
    source_dir = _folder_of(state.source_path)
    default_dir = source_dir.with_name(f"{source_dir.name}-rank{args.rank}")
    output_dir = Path(args.output_dir) if args.output_dir else default_dir
    if output_dir.resolve() == source_dir.resolve():
        raise ValueError(f"--output_dir {output_dir}: is the adapter's own folder; write the resized adapter elsewhere")
    resized, report = resize_adapter(state, args.rank)
    # A file read in another trainer's layout is written in ours of the same kind (sd-scripts' is our kohya file's).
    same_kind = {"sd_scripts": "kohya", "comfyui": "kohya"}.get(state.source_format, state.source_format)
    layouts = FORMATS if state.source_format in ("native", "checkpoint") else (same_kind,)
    paths = write_adapter_files(resized, output_dir, layouts, title=args.title, overwrite=args.overwrite)
    if args.json:
        print(
            json.dumps(
                {"rank": report.rank, "energy": report.energy, "files": {k: str(v) for k, v in paths.items()}}, indent=2
            )
        )
        return 0
    width = max(len(name) for name in report.energy)
    for name, energy in report.energy.items():
        print(f"{name.ljust(width)}  retained energy {energy:.6f}")
    for layout, path in paths.items():
        print(f"{layout}: {path}")
    print(f"Resized to {report.summary()}")
    return 0


def _folder_of(source: Path) -> Path:
    """The folder an adapter was read from (a checkpoint folder is its own)."""
    return source if source.is_dir() else source.parent


# ------------------------------------------------------------------------------------------------
# train


def _train_arguments(parser: argparse.ArgumentParser) -> None:
    # Every flag goes to the DreamBooth recipe's own parser, so `moslora train` and
    # train_scripts/train_dreambooth_moslora.py take the same flags and --config files, --help included.
    parser.prefix_chars = "\0"
    parser.add_argument(
        "train_args",
        nargs=argparse.REMAINDER,
        help="the flags of train_dreambooth_moslora.py (see moslora train --help)",
    )


def _run_train(args: argparse.Namespace) -> int:
    from .training.entry import main as train_main

    return train_main(args.train_args, prog="moslora train")


# ------------------------------------------------------------------------------------------------
# merge


def _merge_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--base",
        required=True,
        help="the base model: a local diffusers pipeline folder (or a Hub id, fetched if online), or a single-file "
        ".safetensors checkpoint (SD 1.x/2.x, SDXL, SD3, Flux; family read from its tensor names)",
    )
    parser.add_argument(
        "--base_config",
        help="with a single-file --base: a diffusers folder or Hub id of the same family with its configs (and, for a "
        "folder output, the components the file lacks); default: the family's reference Hub repository",
    )
    parser.add_argument(
        "--adapter",
        action="append",
        required=True,
        metavar="PATH[:WEIGHT]",
        help="an adapter file or folder (native, folded diffusers or kohya, or any LoRA file diffusers reads) and "
        "its weight (default 1); repeat to merge several",
    )
    parser.add_argument(
        "--output",
        required=True,
        help="OUT_DIR (a diffusers folder) or OUT.safetensors (a single file in the original layout)",
    )
    parser.add_argument(
        "--dtype",
        choices=("fp32", "fp16", "bf16"),
        help="cast the output's floating-point weights (default: as the base)",
    )
    parser.add_argument(
        "--components",
        help="comma-separated components to merge into, e.g. unet,text_encoder (default: all the adapters change)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing output, once the new one is complete"
    )


def _run_merge(args: argparse.Namespace) -> int:
    from .merge import run_merge

    return run_merge(args)


# ------------------------------------------------------------------------------------------------

SUBCOMMANDS: dict[str, Subcommand] = {
    "train": Subcommand(
        "DreamBooth-train a MoSLoRA adapter (SD 1.x/2.x, SDXL, SD3, Flux); flags as diffusers' scripts",
        _train_arguments,
        _run_train,
    ),
    "export": Subcommand(
        "write the folded diffusers, kohya or OneTrainer files of a native adapter", _export_arguments, _run_export
    ),
    "inspect": Subcommand(
        "show an adapter file's layout, family, ranks and mixer statistics", _inspect_arguments, _run_inspect
    ),
    "resize": Subcommand(
        "exact best rank-k approximation of an adapter (with its mixer)", _resize_arguments, _run_resize
    ),
    "merge": Subcommand(
        "bake adapters into a base model: a diffusers folder or a single-file checkpoint", _merge_arguments, _run_merge
    ),
}


class _Parser(argparse.ArgumentParser):
    """No prefix matching (``--jso`` is an error, not ``--json``), and a did-you-mean for a mistyped flag."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)
        self._given: list[str] = []

    def parse_known_args(self, args=None, namespace=None):
        self._given = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def error(self, message: str):
        # A mistyped flag can surface as "unrecognized" or as the flag it meant being "required".
        options = [option for action in self._actions for option in action.option_strings]
        flags = [token.split("=")[0] for token in self._given if token.startswith("--")]
        for flag in (f for f in flags if f not in options):
            close = difflib.get_close_matches(flag, options, n=1)
            if close:
                message += f" ({flag}: did you mean {close[0]}?)"
                break
        super().error(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="moslora", description="Train MoSLoRA adapters and ship them as plain LoRA.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, subcommand in SUBCOMMANDS.items():
        sub = subparsers.add_parser(name, help=subcommand.help, description=subcommand.help)
        subcommand.add_arguments(sub)
        sub.set_defaults(run=subcommand.run, parser=sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args, unknown = build_parser().parse_known_args(argv)
    if unknown:
        args.parser.error(f"unrecognized arguments: {' '.join(unknown)}")  # the subcommand's flags, for the hint
    try:
        return args.run(args) or 0
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        message = " ".join(str(err).split())  # one line, whatever the message held
        print(f"moslora: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as err:
        # A full disk, a read-only folder: every output is written atomically, so the old files are intact.
        where = f"{err.filename}: " if err.filename else ""
        print(f"moslora: error: {where}{err.strerror or err} (no file was left half-written)", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
