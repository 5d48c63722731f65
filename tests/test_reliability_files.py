"""Hostile and broken files: pickles are never unpickled, every refusal is one ValueError naming the file,
PATH[:WEIGHT] is never guessed, and a full disk leaves the previous files intact.

Each test in the "found by fuzzing" section is a case tests/test_fuzz_loaders.py found (or a close
variant found while fixing it), kept here as a plain regression test.
"""

from __future__ import annotations

import errno
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

import moslora_diffusion
from moslora_diffusion import MoSLoRAConfig, add_moslora
from moslora_diffusion.cli import main as moslora_main
from moslora_diffusion.fileio import SafetensorsReader
from moslora_diffusion.formats import (
    DIFFUSERS_WEIGHT_NAME,
    KOHYA_WEIGHT_NAME,
    NATIVE_WEIGHT_NAME,
    diffusers_state_dict,
    read_adapter_file,
)
from moslora_diffusion.loaders import load_moslora_weights, save_moslora_weights
from moslora_diffusion.merge import AdapterSpec, merge_adapters, parse_adapter_spec
from moslora_diffusion.testing import make_tiny_pipeline, save_tiny_pipeline

Q = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
TE_Q = "text_model.encoder.layers.0.self_attn.q_proj"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory) -> Path:
    """A tiny SD 1.5 MoSLoRA adapter in all three layouts (random A, M, B)."""
    pipe = make_tiny_pipeline("sd15")
    add_moslora(pipe.unet, MoSLoRAConfig(r=2, lora_alpha=3, target_modules=["to_q", "proj_in"]))
    add_moslora(pipe.text_encoder, MoSLoRAConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for model in (pipe.unet, pipe.text_encoder):
            for name, param in model.named_parameters():
                if ".lora_" in name:
                    param.copy_(
                        torch.randn(param.shape, generator=g) * 0.1
                        + (torch.eye(param.shape[0]) if "mixer" in name else 0)
                    )
    directory = tmp_path_factory.mktemp("adapter")
    save_moslora_weights(pipe, directory, base_model="tiny/sd15")
    return directory


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    return save_tiny_pipeline("sd15", tmp_path_factory.mktemp("base") / "sd15")


@pytest.fixture
def pipe():
    return make_tiny_pipeline("sd15")


def variant(
    adapter_dir: Path, tmp_path: Path, layout: str, change=None, metadata_change=None, name: str = "variant.safetensors"
) -> Path:
    """A copy of one of the adapter's files with its tensors (dict) and/or metadata (dict) changed in place."""
    if layout == "diffusers":
        # The PEFT-keyed form (diffusers' own files; SD 1.5's diffusers file holds kohya keys since issue 16).
        tensors, metadata = diffusers_state_dict(read_adapter_file(adapter_dir / NATIVE_WEIGHT_NAME))
    else:
        source = adapter_dir / {"native": NATIVE_WEIGHT_NAME, "kohya": KOHYA_WEIGHT_NAME}[layout]
        tensors = load_file(source)
        with safe_open(source, "pt") as f:
            metadata = dict(f.metadata())
    if change:
        change(tensors)
    if metadata_change:
        metadata_change(metadata)
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def edit_json(key: str, edit):
    """A metadata_change that edits the JSON object stored under ``key``."""

    def change(metadata):
        value = json.loads(metadata[key])
        edit(value)
        metadata[key] = json.dumps(value)

    return change


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = moslora_main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moslora: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def lora_weights(pipe) -> dict[str, torch.Tensor]:
    return {f"{c}.{k}": v.clone() for c in ("unet", "text_encoder") for k, v in getattr(pipe, c).state_dict().items()}


# --------------------------------------------------------------------------------------------------
# Pickles: never unpickled, from any entry point


class _TouchOnUnpickle:
    """Unpickling this creates ``marker``: proof that a pickle was executed."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _evil_pickle(path: Path, marker: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({f"unet.{Q}.lora_A.weight": _TouchOnUnpickle(marker)}, path)
    return path


@pytest.mark.parametrize(
    "name", ["adapter.bin", "adapter.pt", "adapter.ckpt", "adapter.pth", "pytorch_lora_weights.safetensors"]
)
def test_pickled_adapters_are_refused_by_every_entry_point(name, tmp_path, tiny_base, capsys):
    marker = tmp_path / "pickle-was-executed"
    evil = _evil_pickle(tmp_path / "evil" / name, marker)
    pipe = make_tiny_pipeline("sd15")
    with pytest.raises(ValueError, match=re.escape(str(evil))):
        load_moslora_weights(pipe, evil)
    with pytest.raises(ValueError, match=re.escape(str(evil))):
        merge_adapters(pipe, [evil])
    commands = [
        ["inspect", evil],
        ["export", evil, "--output_dir", tmp_path / "export"],
        ["resize", evil, "--rank", "1", "--output_dir", tmp_path / "resize"],
        ["merge", "--base", tiny_base, "--adapter", evil, "--output", tmp_path / "merged"],
    ]
    for argv in commands:
        code, _, err = run_cli(capsys, *argv)
        assert_one_line_error(code, err, str(evil))
    assert not marker.exists(), "a pickle was unpickled"
    assert not (tmp_path / "merged").exists()


def test_a_folder_holding_only_a_pickle_is_refused(tmp_path, capsys):
    marker = tmp_path / "pickle-was-executed"
    folder = tmp_path / "lora"
    _evil_pickle(folder / "pytorch_lora_weights.bin", marker)
    code, _, err = run_cli(capsys, "inspect", folder)
    assert_one_line_error(code, err, str(folder), "no adapter file found")
    with pytest.raises(FileNotFoundError, match="no adapter file found"):
        load_moslora_weights(make_tiny_pipeline("sd15"), folder)
    assert not marker.exists()


def test_merge_never_unpickles_base_weights(tmp_path, adapter_dir, tiny_base, capsys):
    marker = tmp_path / "pickle-was-executed"
    base = tmp_path / "base"
    shutil.copytree(tiny_base, base)
    (base / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    _evil_pickle(base / "unet" / "diffusion_pytorch_model.bin", marker)
    code, _, err = run_cli(capsys, "merge", "--base", base, "--adapter", adapter_dir, "--output", tmp_path / "merged")
    assert_one_line_error(code, err, str(base / "unet"), "pickles are never loaded")
    assert not marker.exists()
    assert not (tmp_path / "merged").exists()


def test_the_package_never_unpickles_or_trusts_remote_code():
    """A source check that keeps it so: every torch.load passes weights_only=True, no pickle.load, no
    trust_remote_code=True anywhere in the library or the training scripts."""
    root = Path(moslora_diffusion.__file__).parent
    files = sorted(root.rglob("*.py")) + sorted((root.parent / "train_scripts").glob("*.py"))
    assert files
    for file in files:
        text = file.read_text()
        for call in re.findall(r"torch\.load\(([^)]*)\)", text):
            assert "weights_only=True" in call, f"{file}: torch.load({call})"
        assert not re.search(r"\bpickle\.loads?\(", text), file
        assert not re.search(r"trust_remote_code\s*=\s*True", text), file


# --------------------------------------------------------------------------------------------------
# Regressions found by fuzzing (tests/test_fuzz_loaders.py)


def test_float8_weights_are_refused_not_a_crash(adapter_dir, tmp_path):
    # Was NotImplementedError: "isfinite" not implemented for 'Float8_e4m3fn'.
    path = variant(
        adapter_dir,
        tmp_path,
        "native",
        lambda t: t.__setitem__(f"unet.{Q}.lora_A.weight", t[f"unet.{Q}.lora_A.weight"].to(torch.float8_e4m3fn)),
    )
    with pytest.raises(ValueError, match=re.escape(f"{path}: 'unet.{Q}.lora_A.weight' has dtype torch.float8_e4m3fn")):
        read_adapter_file(path)


@pytest.mark.parametrize(
    "what, change",
    [
        # diffusers' own loader took NaN weights: the merged model held NaN.
        ("NaN", lambda t: t[f"unet.{Q}.lora_B.weight"].view(-1).__setitem__(0, float("nan"))),
        # B without A: diffusers left A at its random initialisation and merged B @ random A.
        ("no down (A)", lambda t: t.pop(f"unet.{Q}.lora_A.weight")),
        # A kohya key inside a diffusers module: silently dropped by the text encoder's loader.
        (
            "mixes kohya and diffusers",
            lambda t: t.__setitem__(f"text_encoder.{TE_Q}.lora_down.weight", torch.zeros(2, 32)),
        ),
    ],
)
def test_merge_refuses_broken_files_that_diffusers_would_load(what, change, adapter_dir, tmp_path):
    path = variant(adapter_dir, tmp_path, "diffusers", change)
    pipe = make_tiny_pipeline("sd15")
    before = lora_weights(pipe)
    with pytest.raises(ValueError, match=re.escape(str(path))) as info:
        merge_adapters(pipe, [path])
    assert what in str(info.value)
    after = lora_weights(pipe)
    assert all(torch.equal(before[k], after[k]) for k in before), "a refused merge changed the weights"


@pytest.mark.parametrize(
    "metadata_change, message",
    [
        # Not JSON / not an object: diffusers guessed the settings; ours refused, so merge now does too.
        (lambda m: m.__setitem__("lora_adapter_metadata", "{"), "is not valid JSON"),
        (lambda m: m.__setitem__("lora_adapter_metadata", "[]"), "should be a JSON object"),
        # No lora_alpha: diffusers would use LoraConfig's default (8), our reader alpha = r; now refused.
        (
            edit_json("lora_adapter_metadata", lambda v: v.pop("text_encoder.lora_alpha")),
            "sets text_encoder fields but not lora_alpha",
        ),
        (
            edit_json("lora_adapter_metadata", lambda v: v.__setitem__("unet.use_rslora", [])),
            "use_rslora should be true or false",
        ),
    ],
)
def test_unreadable_folded_metadata_is_refused_everywhere(metadata_change, message, adapter_dir, tmp_path, capsys):
    path = variant(adapter_dir, tmp_path, "diffusers", metadata_change=metadata_change)
    for action in (
        read_adapter_file,
        lambda p: load_moslora_weights(make_tiny_pipeline("sd15"), p),
        lambda p: merge_adapters(make_tiny_pipeline("sd15"), [p]),
    ):
        with pytest.raises(ValueError, match=re.escape(str(path))) as info:
            action(path)
        assert message in str(info.value)
    code, _, err = run_cli(capsys, "inspect", path)
    assert_one_line_error(code, err, str(path), message)


def _set_unet(field, value):
    return edit_json("moslora", lambda h: h["components"]["unet"].__setitem__(field, value))


@pytest.mark.parametrize(
    "metadata_change, message",
    [
        # Each was a ZeroDivisionError, TypeError, AttributeError or re.error from deep inside.
        (_set_unet("r", 0), "unet: r should be a positive integer, got 0"),
        (_set_unet("r", "4"), "unet: r should be a positive integer, got '4'"),
        (_set_unet("lora_alpha", None), "unet: lora_alpha should be a finite number"),
        (_set_unet("rank_pattern", [1]), "unet: rank_pattern should be an object"),
        (_set_unet("rank_pattern", {"(": 2}), "rank_pattern '(' is not a valid pattern"),
        (_set_unet("mixer_init", "zeros"), "unet: mixer_init should be one of kaiming, orthogonal, identity"),
        (_set_unet("use_rslora", "yes"), "use_rslora should be true or false"),
        (edit_json("moslora", lambda h: h.__setitem__("components", "unet")), "components should be a JSON object"),
        (
            edit_json("moslora", lambda h: h["components"].__setitem__("vae", h["components"]["unet"])),
            "names component 'vae'",
        ),
        (edit_json("moslora", lambda h: h.__setitem__("family", "sd9")), "model family 'sd9'"),
        (
            edit_json("moslora", lambda h: h.__setitem__("format_version", 0)),
            "native format version 0 is not supported",
        ),
        # Ranks unlike the header's r: a RuntimeError (size mismatch) when loaded for training.
        (
            _set_unet("r", 4),
            "'unet.down_blocks.1.attentions.0.proj_in.lora_A.weight' has rank 2, but the file's metadata gives this module rank 4",
        ),
        # Mixers in a component the header calls plain LoRA: an AttributeError when loaded for training.
        (_set_unet("use_moslora", False), "is not MoSLoRA (use_moslora false), yet this module has a mixer"),
    ],
)
def test_broken_native_headers_name_the_file_and_the_field(metadata_change, message, adapter_dir, tmp_path, capsys):
    path = variant(adapter_dir, tmp_path, "native", metadata_change=metadata_change)
    with pytest.raises(ValueError, match=re.escape(str(path))) as info:
        read_adapter_file(path)
    assert message in str(info.value)
    for argv in (["inspect", path], ["export", path, "--output_dir", tmp_path / "out"]):
        code, _, err = run_cli(capsys, *argv)
        assert_one_line_error(code, err, str(path), message)
    assert not (tmp_path / "out").exists()


def test_unknown_native_config_fields_are_ignored(adapter_dir, tmp_path, pipe):
    # Was a TypeError from MoSLoRAConfig(**config) in trainable loading.
    path = variant(adapter_dir, tmp_path, "native", metadata_change=_set_unet("}lora_dropout", 0.5))
    assert load_moslora_weights(pipe, path, trainable=True) == "native"
    assert pipe.unet.peft_config["default"].r == 2


@pytest.mark.parametrize("layout, key", [("native", "moslora"), ("diffusers", "lora_adapter_metadata")])
def test_a_file_without_target_modules_loads_its_own_modules(layout, key, adapter_dir, tmp_path, pipe):
    # Was KeyError: 'model_type' from PEFT, which looks up default targets when target_modules is None.
    if layout == "native":
        edit = edit_json(key, lambda h: h["components"]["unet"].__setitem__("target_modules", None))
    else:
        edit = edit_json(key, lambda v: v.__setitem__("unet.target_modules", None))
    path = variant(adapter_dir, tmp_path, layout, metadata_change=edit)
    assert load_moslora_weights(pipe, path, adapter_name="x") == layout
    adapted = {name for name, m in pipe.unet.named_modules() if "x" in (getattr(m, "lora_A", None) or {})}
    assert adapted == set(read_adapter_file(path).components["unet"].layers)


def test_an_invalid_target_modules_pattern_is_refused(adapter_dir, tmp_path, pipe):
    # Was re.error from deep inside PEFT when loaded.
    path = variant(
        adapter_dir,
        tmp_path,
        "diffusers",
        metadata_change=edit_json("lora_adapter_metadata", lambda v: v.__setitem__("unet.target_modules", "(")),
    )
    with pytest.raises(
        ValueError, match=re.escape(f"{path}: metadata for unet: target_modules '(' is not a valid pattern")
    ):
        load_moslora_weights(pipe, path)


def test_folding_that_overflows_half_precision_is_refused(adapter_dir, tmp_path, capsys, pipe):
    """B in fp16 times a large mixer overflows: refuse rather than write or load inf."""

    def huge_mixer(t):
        t[f"unet.{Q}.lora_B.weight"] = t[f"unet.{Q}.lora_B.weight"].half()
        t[f"unet.{Q}.lora_mixer.weight"] = torch.full((2, 2), 1e6)

    path = variant(adapter_dir, tmp_path, "native", huge_mixer)
    code, _, err = run_cli(capsys, "export", path, "--output_dir", tmp_path / "out")
    # The diffusers file comes first, in kohya keys for SD 1.5.
    assert_one_line_error(
        code, err, str(path), f"'lora_unet_{Q.replace('.', '_')}.lora_up.weight' overflows torch.float16"
    )
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    with pytest.raises(ValueError, match="overflows torch.float16"):
        load_moslora_weights(pipe, path)


@pytest.mark.parametrize(
    "header, message",
    [
        ([], "the header is not a JSON object"),  # was AttributeError: 'list' object has no attribute 'pop'
        ({"__metadata__": {"format": 1}}, "__metadata__ must map names to strings"),  # was TypeError
        ({"__metadata__": "pt"}, "__metadata__ must map names to strings"),  # was ValueError without the file
        (
            {"w": {"dtype": "F32", "shape": [-1, -4], "data_offsets": [0, 16]}},
            "bad header entry for 'w'",
        ),  # was RuntimeError
        ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [16, 0]}}, "lies outside the file"),
        ({"w": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 16]}}, "lies outside the file"),
        ({"w": {"dtype": "F4", "shape": [4], "data_offsets": [0, 2]}}, "bad header entry for 'w'"),
    ],
)
def test_streaming_reader_refuses_malformed_headers(header, message, tmp_path):
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path = tmp_path / "model.safetensors"
    path.write_bytes(len(text).to_bytes(8, "little") + text + bytes(16))
    with pytest.raises(ValueError, match=re.escape(f"{path}: ")) as info:
        SafetensorsReader(path)
    assert message in str(info.value)


# --------------------------------------------------------------------------------------------------
# PATH[:WEIGHT]: unambiguous, or an error that says how to write it


@pytest.mark.parametrize(
    "text, path, weight",
    [
        ("style", "style", 1.0),
        ("style:0.5", "style", 0.5),
        ("style: -1e-1", "style", -0.1),
        ("loras/v1:2/style.safetensors", "loras/v1:2/style.safetensors", 1.0),  # ':' inside the path
        ("loras/v1:2/style.safetensors:0.25", "loras/v1:2/style.safetensors", 0.25),
        ("C:\\loras\\style.safetensors", "C:\\loras\\style.safetensors", 1.0),  # a drive letter
        ("C:\\loras\\style.safetensors:0.5", "C:\\loras\\style.safetensors", 0.5),
        ("C:\\odd:name", "C:\\odd:name", 1.0),  # text after ':' that is not a number
        ("style:1:0.5", "style:1", 0.5),  # only the last ':' can start a weight
        (":0.5", ":0.5", 1.0),  # nothing before ':' is no path
    ],
)
def test_adapter_weights_parse_after_the_last_colon(text, path, weight):
    assert parse_adapter_spec(text) == AdapterSpec(Path(path), weight)


def test_existing_paths_with_colons_are_paths(tmp_path):
    folder = tmp_path / "style:0.5"
    folder.mkdir()
    assert parse_adapter_spec(str(folder)) == AdapterSpec(folder, 1.0)
    assert parse_adapter_spec(f"{folder}:0.25") == AdapterSpec(folder, 0.25)
    trailing = tmp_path / "odd:"
    trailing.mkdir()
    assert parse_adapter_spec(str(trailing)) == AdapterSpec(trailing, 1.0)


@pytest.mark.parametrize(
    "make, text, message",
    [
        (lambda d: None, "{d}/style:", "nothing after the last ':'"),
        (lambda d: None, "{d}/style:nan", "the weight must be a finite number"),
        (lambda d: None, "{d}/style:1e999", "the weight must be a finite number"),
        # Both readings exist: never guess which one was meant.
        (lambda d: ((d / "style:0.5").mkdir(), (d / "style").mkdir()), "{d}/style:0.5", "is ambiguous"),
    ],
)
def test_unclear_weights_are_errors(make, text, message, tmp_path):
    make(tmp_path)
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_adapter_spec(text.format(d=tmp_path))


def test_merge_command_takes_a_folder_with_a_colon_and_a_weight(adapter_dir, tiny_base, tmp_path, capsys):
    folder = tmp_path / "style:v1"
    shutil.copytree(adapter_dir, folder)
    code, out, err = run_cli(
        capsys, "merge", "--base", tiny_base, "--adapter", f"{folder}:0.5", "--output", tmp_path / "merged"
    )
    assert code == 0, err
    readme = (tmp_path / "merged" / "README.md").read_text()
    assert f"| `{folder}` | 0.5 |" in readme
    code, _, err = run_cli(
        capsys, "merge", "--base", tiny_base, "--adapter", f"{folder}:", "--output", tmp_path / "merged2"
    )
    assert_one_line_error(code, err, "nothing after the last ':'")


# --------------------------------------------------------------------------------------------------
# A full disk while writing adapter files


def _disk_full(*args, **kwargs):
    # What safetensors' writer raises when the disk fills (it does not raise OSError).
    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


def test_a_full_disk_during_export_keeps_the_previous_files(adapter_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "export", adapter_dir, "--output_dir", out)
    assert code == 0, err
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr("moslora_diffusion.fileio.save_file", _disk_full)
    code, _, err = run_cli(capsys, "export", adapter_dir, "--output_dir", out, "--overwrite")
    assert_one_line_error(code, err, "No space left on device", str(out / DIFFUSERS_WEIGHT_NAME))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before, "files changed or temporary files left"


def test_a_full_disk_is_an_oserror_with_its_errno(tmp_path, monkeypatch):
    from moslora_diffusion.fileio import save_safetensors

    monkeypatch.setattr("moslora_diffusion.fileio.save_file", _disk_full)
    with pytest.raises(OSError) as info:
        save_safetensors({"w": torch.zeros(2)}, tmp_path / "w.safetensors")
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(tmp_path / "w.safetensors")
    assert list(tmp_path.iterdir()) == []
