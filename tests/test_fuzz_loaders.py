"""Fuzzing every adapter loader with hostile and broken safetensors files.

Each case starts from a real adapter file (native, folded diffusers (PEFT keys) or kohya, written by
save_moslora_weights for a tiny SD 1.5 pipeline) and mutates it, at the byte level (header JSON: dtype
codes, shapes, data_offsets huge / overlapping / out of range, the header-length field, metadata that
is not JSON or has the wrong types, truncation, flipped and appended bytes) or at the tensor level
(NaN / inf, other dtypes and shapes, missing, extra and renamed keys, ranks of A, M and B that disagree,
values that overflow half precision). Every loader must then either load the file *correctly* (checked
against the file's own deltas) or raise one ``ValueError`` whose message names the file. Anything else
(another exception type, a crash, a hang, a large allocation, a half-loaded adapter) fails the test.

The loaders: ``formats.read_adapter_file`` (validation and format detection), the streaming
``fileio.SafetensorsReader`` that merge uses for base checkpoints, ``moslora inspect`` and ``moslora
export`` in-process, ``merge.merge_adapters`` on a tiny pipeline, and ``load_moslora_weights`` on one
tiny pipeline. CI runs about 330 cases in all (derandomized, so the same every run); the long campaign
is ``MOSLORA_FUZZ_EXAMPLES=2400 python -m pytest tests/test_fuzz_loaders.py`` (or
``python benchmarks/fuzz_loaders.py``), which also writes per-target counts when
``MOSLORA_FUZZ_REPORT`` names a JSON file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import resource
import signal
import tempfile
from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from moslora_diffusion import MoSLoRAConfig, add_moslora
from moslora_diffusion.cli import main as moslora_main
from moslora_diffusion.families import family_of_pipeline
from moslora_diffusion.fileio import SafetensorsReader, load_safetensors
from moslora_diffusion.formats import (
    CONFIG_FIELDS,
    DIFFUSERS_WEIGHT_NAME,
    FORMATS,
    KOHYA_WEIGHT_NAME,
    diffusers_state_dict,
    parse_adapter_state_dict,
    read_adapter_file,
)
from moslora_diffusion.loaders import (
    fit_adapter_to_models,
    load_moslora_weights,
    model_module_path,
    save_moslora_weights,
)
from moslora_diffusion.merge import merge_adapters
from moslora_diffusion.testing import make_tiny_pipeline

# Total cases over all targets: a few hundred in CI, thousands for the benchmark-length run.
TOTAL_EXAMPLES = int(os.environ.get("MOSLORA_FUZZ_EXAMPLES", "330"))
LONG_RUN = "MOSLORA_FUZZ_EXAMPLES" in os.environ
SHARES = {"read": 0.25, "stream": 0.10, "inspect": 0.15, "export": 0.15, "load": 0.20, "merge": 0.15}
CASE_TIMEOUT_S = 30  # a case that takes longer is a hang
MAX_RSS_GROWTH_MB = 1024  # a case that allocates more is a "huge declared size" bug

OUTCOMES: Counter = Counter()  # (target, "loaded" | "refused") -> count


def fuzz_settings(target: str):
    return settings(
        max_examples=max(10, round(TOTAL_EXAMPLES * SHARES[target])),
        deadline=None,  # shared CPUs: timing varies; hangs are caught by CASE_TIMEOUT_S instead
        derandomize=not LONG_RUN,
        database=None,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
    )


# --------------------------------------------------------------------------------------------------
# Seed files: a real adapter in each layout


pytestmark = pytest.mark.usefixtures("one_thread")


class Seeds(dict):
    """layout -> file bytes, shown briefly in failure reports."""

    def __repr__(self) -> str:
        return f"Seeds({', '.join(f'{k}: {len(v)} bytes' for k, v in self.items())})"


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> Seeds:
    """layout -> bytes of a real adapter file (unet: a linear and a 1x1 conv; text encoder: rsLoRA)."""
    pipe = make_tiny_pipeline("sd15")
    add_moslora(pipe.unet, MoSLoRAConfig(r=2, lora_alpha=3, target_modules=["to_q", "proj_in"]))
    add_moslora(pipe.text_encoder, MoSLoRAConfig(r=2, lora_alpha=4, use_rslora=True, target_modules=["q_proj"]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for model in (pipe.unet, pipe.text_encoder):
            for name, param in model.named_parameters():
                if ".lora_" in name:
                    param.copy_(
                        torch.randn(param.shape, generator=g) * 0.1
                        + (torch.eye(param.shape[0]) if "mixer" in name else 0)
                    )
    folder = tmp_path_factory.mktemp("seed")
    paths = save_moslora_weights(pipe, folder, base_model="tiny/sd15")
    seeds = Seeds({layout: Path(path).read_bytes() for layout, path in paths.items()})
    # SD 1.5's diffusers file holds kohya keys (the kohya seed covers them); the diffusers seed is the
    # PEFT-keyed form instead: diffusers' own files, ours before issue 16, and SD3/Flux's diffusers file.
    tensors, metadata = diffusers_state_dict(read_adapter_file(paths["native"]))
    seeds["diffusers"] = save_safetensors_bytes(tensors, metadata)
    return seeds


class TargetPipe:
    """The tiny pipeline every load and merge case uses (adapters deleted and weights restored after each)."""

    def __init__(self):
        self.pipe = make_tiny_pipeline("sd15")

    def __repr__(self) -> str:
        return "TargetPipe(tiny sd15)"


@pytest.fixture(scope="module")
def target() -> TargetPipe:
    return TargetPipe()


@pytest.fixture(scope="module")
def merge_target() -> TargetPipe:
    """A pipeline of its own: load cases leave PEFT wrappers (base_layer) behind, merge cases must not see them."""
    return TargetPipe()


@pytest.fixture(scope="module", autouse=True)
def _report():
    rss_before = _max_rss_mb()
    yield
    report = os.environ.get("MOSLORA_FUZZ_REPORT")
    if report:
        counts = {f"{target}/{outcome}": n for (target, outcome), n in sorted(OUTCOMES.items())}
        Path(report).write_text(json.dumps({"total": sum(OUTCOMES.values()), "counts": counts}, indent=2) + "\n")
    assert _max_rss_mb() - rss_before < MAX_RSS_GROWTH_MB, "a fuzz case allocated far more memory than the file holds"


def _max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --------------------------------------------------------------------------------------------------
# Mutations


def split_file(raw: bytes) -> tuple[dict, bytes]:
    length = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + length]), raw[8 + length :]


def join_file(header, data: bytes, length_error: int = 0) -> bytes:
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return ((len(text) + length_error) % 2**64).to_bytes(8, "little") + text + data


DTYPE_CODES = ["F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "F8_E8M0", "F8_E4M3FNUZ", "F8_E5M2FNUZ", "F4",
               "F6_E2M3", "C64", "I64", "I32", "I16", "I8", "U64", "U32", "U16", "U8", "BOOL", "X9", "", 3, None]  # fmt: skip
TORCH_DTYPES = [torch.float16, torch.bfloat16, torch.float64, torch.float32, torch.int32, torch.int8, torch.uint8,
                torch.bool, torch.float8_e4m3fn, torch.float8_e5m2]  # fmt: skip
HUGE = [2**31, 2**32 + 1, 2**40, 2**53, 2**62, 2**63 - 1, 2**64 - 1, 2**64 + 7]
ints = st.one_of(st.integers(-3, 12), st.sampled_from(HUGE), st.integers(-(2**65), 2**65))
json_leaf = st.one_of(
    st.none(), st.booleans(), ints, st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6),
    st.sampled_from(["sd15", "sdxl", "flux", "kaiming", "identity", "to_q", ".*", "(", "unet", "q_proj"]),
)  # fmt: skip
json_values = st.recursive(
    json_leaf,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
SUFFIXES = [
    ".lora_A.weight",
    ".lora_B.weight",
    ".lora_mixer.weight",
    ".lora_down.weight",
    ".lora_up.weight",
    ".alpha",
    ".weight",
    "",
]
MODULE_NAMES = ["unet.down_blocks.0.attentions.0.proj_in", "unet.nonexistent", "text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
                "transformer.x", "lora_unet_down_blocks_0_attentions_0_proj_in", "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
                "lora_unet_nothing", "lora_te2_x", "", "unet", "__metadata__"]  # fmt: skip
FILE_NAMES = ["adapter.safetensors", "odd name:0.5.safetensors", "ünïcode.safetensors", "x.sft"]


STRUCTURED_METADATA = ("moslora", "lora_adapter_metadata")  # the JSON our readers parse


@st.composite
def native_header_edit(draw, metadata: dict) -> str:
    """A mutation of one field of the JSON in a metadata value (mostly the native header or lora_adapter_metadata)."""
    structured = sorted(k for k in metadata if k in STRUCTURED_METADATA)
    key = draw(st.sampled_from(structured if structured and draw(st.integers(0, 3)) else sorted(metadata)))
    value = metadata[key]
    try:
        parsed = json.loads(value)
    except ValueError:
        parsed = None
    if not isinstance(parsed, dict):
        metadata[key] = draw(st.one_of(st.text(max_size=8), json_values.map(lambda v: json.dumps(v))))
        return f"metadata {key!r} replaced"
    # A path into the JSON object: top-level field, or a field of one component's config.
    fields = list(parsed)
    components = parsed.get("components") if isinstance(parsed.get("components"), dict) else {}
    paths = [(f,) for f in fields] + [(c,) for c in ("format_version", "components", "family")]
    paths += [("components", c, f) for c in components for f in CONFIG_FIELDS]
    path = draw(st.sampled_from(paths))
    node = parsed
    for part in path[:-1]:
        node = node.setdefault(part, {}) if isinstance(node, dict) else {}
    if isinstance(node, dict):
        if draw(st.booleans()) and path[-1] in node:
            del node[path[-1]]
        else:
            node[path[-1]] = draw(json_values)
    if draw(st.integers(0, 9)) == 0:
        text = draw(st.sampled_from(["{", "[]", "null", '"x"', "{'a': 1}", "NaN", ""]))
    else:
        text = json.dumps(parsed)
    metadata[key] = text
    return f"metadata {key!r} field {'.'.join(path)}"


@st.composite
def tensor_level(draw, raw: bytes) -> tuple[bytes, list[str]]:
    """Decode the file, change tensors and string metadata, and write a well-formed safetensors file."""
    header, _ = split_file(raw)
    metadata = dict(header.get("__metadata__", {}))
    tensors = dict(load_safetensors_bytes(raw))
    done = []
    for _ in range(draw(st.integers(1, 3))):
        keys = sorted(tensors)
        kind = draw(
            st.sampled_from(
                ["nan_inf", "dtype", "shape", "drop", "extra", "rank", "scale", "rename", "metadata", "metadata"]
            )
        )
        if kind in ("nan_inf", "dtype", "shape", "drop", "rank", "scale", "rename") and not keys:
            continue
        key = draw(st.sampled_from(keys)) if keys else None
        if kind == "nan_inf":
            t = tensors[key].clone()
            if t.numel() and t.is_floating_point():
                t.view(-1)[draw(st.integers(0, t.numel() - 1))] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
            tensors[key] = t
        elif kind == "dtype":
            tensors[key] = tensors[key].to(draw(st.sampled_from(TORCH_DTYPES)))
        elif kind == "shape":
            shape = draw(st.lists(st.integers(0, 9), max_size=4))
            tensors[key] = torch.randn(shape) if draw(st.booleans()) else tensors[key].reshape(-1)
        elif kind == "drop":
            del tensors[key]
        elif kind == "extra":
            name = draw(st.sampled_from(MODULE_NAMES)) + draw(st.sampled_from(SUFFIXES))
            if name == "__metadata__":
                continue
            source = (
                tensors[key]
                if keys and draw(st.booleans())
                else torch.randn(draw(st.lists(st.integers(0, 5), max_size=3)))
            )
            tensors[name] = source.clone()
            key = name
        elif kind == "rank":
            t = tensors[key]
            if t.dim() >= 1 and t.shape[0] > 0:
                tensors[key] = t[: t.shape[0] - 1] if draw(st.booleans()) else torch.cat([t, t[:1]])
            if t.dim() >= 2 and draw(st.booleans()):
                tensors[key] = tensors[key][:, :1]
        elif kind == "scale":
            t = tensors[key]
            if t.is_floating_point():
                tensors[key] = (t.double() * 10.0 ** draw(st.integers(1, 40))).to(t.dtype)
        elif kind == "rename":
            new = key
            for suffix in SUFFIXES[:-1]:
                if key.endswith(suffix):
                    new = key[: -len(suffix)] + draw(st.sampled_from(SUFFIXES))
                    break
            tensors[new] = tensors.pop(key)
            key = new
        elif kind == "metadata":
            if metadata and draw(st.booleans()):
                done.append(draw(native_header_edit(metadata)))
                continue
            action = draw(st.sampled_from(["drop_all", "drop_one", "family", "add"]))
            if action == "drop_all":
                metadata = {}
            elif action == "drop_one" and metadata:
                metadata.pop(draw(st.sampled_from(sorted(metadata))))
            elif action == "family":
                metadata[draw(st.sampled_from(["moslora.family", "ss_base_model_version", "moslora.base_model"]))] = (
                    draw(st.sampled_from(["sdxl", "sd15", "nope", "", "sdxl_base_v1-0", "sd_v1"]))
                )
            else:
                metadata[draw(st.sampled_from(["moslora", "lora_adapter_metadata", "format", "x"]))] = draw(
                    st.text(max_size=8)
                )
            key = action
        done.append(f"{kind} {key}")
    try:
        data = save_safetensors_bytes({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata or None)
    except Exception:  # noqa: BLE001 - a mutation safetensors itself cannot write: fall back to the seed
        return raw, done + ["(unwritable: seed kept)"]
    return data, done


@st.composite
def metadata_level(draw, raw: bytes) -> tuple[bytes, list[str]]:
    """Edit the string metadata only: fields of the native header / lora_adapter_metadata, family tags."""
    header, _ = split_file(raw)
    metadata = dict(header.get("__metadata__", {}))
    done = []
    for _ in range(draw(st.integers(1, 2))):
        if metadata and draw(st.integers(0, 4)):
            done.append(draw(native_header_edit(metadata)))
        else:
            key = draw(st.sampled_from(["moslora.family", "ss_base_model_version", "moslora.base_model", "format"]))
            metadata[key] = draw(
                st.sampled_from(["sdxl", "sd15", "flux", "nope", "", "sdxl_base_v1-0", "sd_v1", "[1]"])
            )
            done.append(f"metadata {key!r} = {metadata[key]!r}")
    return save_safetensors_bytes(load_safetensors_bytes(raw), metadata=metadata or None), done


@st.composite
def header_level(draw, raw: bytes) -> tuple[bytes, list[str]]:
    """Edit the header JSON itself (entries, dtype codes, shapes, offsets, metadata types), keep the data."""
    header, data = split_file(raw)
    done = []
    length_error = 0
    for _ in range(draw(st.integers(1, 3))):
        names = sorted(k for k in header if k != "__metadata__")
        kind = draw(
            st.sampled_from(["dtype", "shape", "offsets", "drop", "duplicate", "entry", "metadata", "length", "top"])
        )
        name = draw(st.sampled_from(names)) if names else None
        entry = header.get(name) if name else None
        if kind == "dtype" and isinstance(entry, dict):
            entry["dtype"] = draw(st.sampled_from(DTYPE_CODES))
        elif kind == "shape" and isinstance(entry, dict):
            entry["shape"] = draw(st.one_of(st.lists(ints, max_size=4), json_leaf))
        elif kind == "offsets" and isinstance(entry, dict):
            begin, end = (
                entry["data_offsets"]
                if isinstance(entry.get("data_offsets"), list) and len(entry["data_offsets"]) == 2
                else (0, 0)
            )
            entry["data_offsets"] = draw(st.sampled_from([
                [end, begin], [begin, end + 4], [begin, 2**62], [2**63, 2**64 - 1], [-8, end], [0, len(data)],
                [0, 0], [begin], [begin, end, end], "0,4", [begin + 0.5, end], [begin, len(data) + 1],
            ]))  # fmt: skip
        elif kind == "drop" and name:
            del header[name]
        elif kind == "duplicate" and isinstance(entry, dict):
            header[draw(st.sampled_from(MODULE_NAMES)) + draw(st.sampled_from(SUFFIXES))] = dict(entry)
        elif kind == "entry" and name:
            header[name] = draw(json_values)
        elif kind == "metadata":
            header["__metadata__"] = draw(st.one_of(
                st.dictionaries(st.sampled_from(["moslora", "lora_adapter_metadata", "format", "ss_v2"]), json_leaf, max_size=3),
                json_leaf,
            ))  # fmt: skip
        elif kind == "length":
            length_error = draw(st.one_of(st.integers(-16, 16), st.sampled_from([2**32, 2**62, -(2**40), 100 * 2**20])))
        elif kind == "top":
            header = draw(st.sampled_from([[], "header", 0, None, [header]]))
            done.append("header not an object")
            break
        else:
            continue
        done.append(
            f"header {kind}"
            + (f" of {name}" if kind in ("dtype", "shape", "offsets", "drop", "duplicate", "entry") else "")
        )
    return join_file(header, data, length_error), done


@st.composite
def byte_level(draw, raw: bytes) -> tuple[bytes, list[str]]:
    kind = draw(st.sampled_from(["truncate", "flip", "append", "empty", "garbage_header", "header_text"]))
    if kind == "truncate":
        return raw[: draw(st.integers(0, len(raw) - 1))], [kind]
    if kind == "flip":
        data = bytearray(raw)
        for _ in range(draw(st.integers(1, 8))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        return bytes(data), [kind]
    if kind == "append":
        return raw + draw(st.binary(min_size=1, max_size=64)), [kind]
    if kind == "empty":
        return b"", [kind]
    if kind == "garbage_header":
        body = draw(st.binary(max_size=64))
        return len(body).to_bytes(8, "little") + body, [kind]
    header, data = split_file(raw)
    text = json.dumps(header).encode()
    cut = draw(st.integers(0, len(text)))
    text = text[:cut] + draw(st.sampled_from([b"\xff\xfe", b"\x00", b"}", b"{", b'"', b"NaN", b""])) + text[cut:]
    return len(text).to_bytes(8, "little") + text + data, [kind]


class Case:
    """One fuzzed file: its seed layout, the mutations applied (shown when a case fails), name and bytes."""

    def __init__(self, layout: str, done: tuple[str, ...], name: str, data: bytes):
        self.layout, self.done, self.name, self.data = layout, done, name, data

    def __repr__(self) -> str:
        return f"Case({self.layout} seed, {list(self.done)}, {self.name!r}, {len(self.data)} bytes)"


@st.composite
def hostile_files(draw, seeds: dict[str, bytes]) -> Case:
    """A mutated seed file. About one case in nine is left unchanged."""
    layout = draw(st.sampled_from(sorted(seeds)))
    raw = seeds[layout]
    level = draw(
        st.sampled_from(["tensor", "tensor", "tensor", "header", "header", "metadata", "metadata", "bytes", "none"])
    )
    if level == "tensor":
        data, done = draw(tensor_level(raw))
    elif level == "metadata":
        data, done = draw(metadata_level(raw))
    elif level == "header":
        data, done = draw(header_level(raw))
    elif level == "bytes":
        data, done = draw(byte_level(raw))
    else:
        data, done = raw, ["unchanged"]
    return Case(layout, tuple(done), draw(st.sampled_from(FILE_NAMES)), data)


# --------------------------------------------------------------------------------------------------
# The contract every case is held to


@contextlib.contextmanager
def case_file(case: Case):
    with tempfile.TemporaryDirectory(prefix="fuzz-") as tmp:
        path = Path(tmp) / case.name
        path.write_bytes(case.data)
        yield path


@contextlib.contextmanager
def time_limit(seconds: int):
    def hang(signum, frame):
        raise TimeoutError(f"fuzz case ran over {seconds} s (a hang)")

    previous = signal.signal(signal.SIGALRM, hang)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def expect_loads_or_value_error(target: str, path: Path, action):
    """Run ``action``; a ValueError must name ``path``. Returns the result, or None if refused."""
    with time_limit(CASE_TIMEOUT_S):
        try:
            result = action()
        except ValueError as err:
            assert str(path) in str(err), f"the error does not name the file: {err}"
            OUTCOMES[target, "refused"] += 1
            return None
    OUTCOMES[target, "loaded"] += 1
    return result


def run_cli(*argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = moslora_main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def assert_cli_outcome(target: str, path: Path, code: int, err: str) -> bool:
    """True if the command succeeded; a failure must be exit 2 with one line naming the file."""
    if code == 0:
        OUTCOMES[target, "loaded"] += 1
        return True
    assert code == 2, (code, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moslora: error: "), err
    assert str(path) in lines[0], f"the error does not name the file: {lines[0]}"
    OUTCOMES[target, "refused"] += 1
    return False


def deltas_by_stem(state) -> dict[str, torch.Tensor]:
    """Every layer's delta weight, keyed by component and module name with dots as underscores."""
    return {f"{c}:{p.replace('.', '_')}": layer.delta_weight() for c, p, layer in state.layer_items()}


def assert_close(got: torch.Tensor, want: torch.Tensor, what: str, rtol: float = 2e-2) -> None:
    """Equal up to half-precision rounding of a folded B' = B M (values beyond fp32's range are not compared)."""
    want = want.double()
    got = got.detach().double()
    assert got.shape == want.shape, (what, got.shape, want.shape)
    scale = float(want.abs().max()) if want.numel() else 0.0
    if scale > 1e35:
        return
    assert bool(torch.isfinite(got).all()), f"{what}: loaded non-finite values from a finite adapter"
    error = float((got.detach() - want).abs().max()) if want.numel() else 0.0
    assert error <= rtol * scale + 1e-30, f"{what}: loaded delta differs from the file's by {error} (scale {scale})"


def assert_sound_state(state) -> None:
    for component, path, layer in state.layer_items():
        for name in ("lora_A", "lora_B", "mixer"):
            t = getattr(layer, name)
            if t is not None:
                assert t.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64), (
                    component,
                    path,
                    name,
                    t.dtype,
                )
                assert bool(torch.isfinite(t).all()), (component, path, name)
        assert math.isfinite(layer.scale), (component, path, layer.scale)


def reference_state(path: Path):
    """The adapter as our reader parses it, ignoring family tags: merge may place a file our loader
    refuses only for its tag (moslora.family, ss_base_model_version) through diffusers' own loader."""
    tensors, metadata = load_safetensors(path)
    metadata = {k: v for k, v in metadata.items() if k not in ("moslora.family", "ss_base_model_version")}
    return dataclasses.replace(parse_adapter_state_dict(tensors, metadata, path), family=None)


def pipeline_models(pipe) -> tuple[type, dict]:
    family = family_of_pipeline(pipe)
    return family, {
        name: getattr(pipe, name) for name in family.adapter_components() if getattr(pipe, name, None) is not None
    }


def adapted_modules(pipe, adapter_name: str) -> set[str]:
    _, models = pipeline_models(pipe)
    found = set()
    for component, model in models.items():
        for name, module in model.named_modules():
            if adapter_name in (getattr(module, "lora_A", None) or {}):
                found.add(f"{component}.{name}")
    return found


# --------------------------------------------------------------------------------------------------
# One test per loader


def test_seed_files_load(seeds, target):
    target_pipe = target.pipe
    """The unmutated files pass every loader (so refusals below are caused by the mutations)."""
    assert set(seeds) == set(FORMATS)
    for layout, raw in seeds.items():
        with case_file(Case(layout, (), "seed.safetensors", raw)) as path:
            assert read_adapter_file(path).source_format == layout
            assert load_moslora_weights(target_pipe, path, adapter_name="seed") == layout
            target_pipe.delete_adapters("seed")
    assert not adapted_modules(target_pipe, "seed")


@given(data=st.data())
@fuzz_settings("read")
def test_read_adapter_file(seeds, data):
    case = data.draw(hostile_files(seeds), label="case")
    with case_file(case) as path:
        state = expect_loads_or_value_error("read", path, lambda: read_adapter_file(path))
        if state is not None:
            assert state.source_format in FORMATS
            assert_sound_state(state)


@given(data=st.data())
@fuzz_settings("stream")
def test_streaming_reader(seeds, data):
    case = data.draw(hostile_files(seeds), label="case")
    with case_file(case) as path:

        def read_all():
            with SafetensorsReader(path) as reader:
                return {key: (info, reader.read(key)) for key, info in reader.tensors.items()}

        tensors = expect_loads_or_value_error("stream", path, read_all)
        for key, (info, tensor) in (tensors or {}).items():
            assert tensor.dtype == info.dtype and tuple(tensor.shape) == info.shape, key


@given(data=st.data())
@fuzz_settings("inspect")
def test_moslora_inspect(seeds, data):
    case = data.draw(hostile_files(seeds), label="case")
    as_json = data.draw(st.booleans(), label="json")
    with case_file(case) as path, time_limit(CASE_TIMEOUT_S):
        code, out, err = run_cli("inspect", path, *(["--json"] if as_json else []))
        if assert_cli_outcome("inspect", path, code, err) and as_json:
            assert json.loads(out)["format"] in FORMATS


@given(data=st.data())
@fuzz_settings("export")
def test_moslora_export(seeds, data):
    case = data.draw(hostile_files(seeds), label="case")
    to = data.draw(st.sampled_from(["both", "diffusers", "kohya"]), label="to")
    with case_file(case) as path, time_limit(CASE_TIMEOUT_S):
        out_dir = path.parent / "out"
        code, out, err = run_cli("export", path, "--to", to, "--output_dir", out_dir)
        if not assert_cli_outcome("export", path, code, err):
            assert not out_dir.exists() or not any(out_dir.iterdir()), "a refused export wrote files"
            return
        source = deltas_by_stem(read_adapter_file(path))
        written = {"diffusers": DIFFUSERS_WEIGHT_NAME, "kohya": KOHYA_WEIGHT_NAME}
        for layout_name in ("diffusers", "kohya") if to == "both" else (to,):
            exported = read_adapter_file(out_dir / written[layout_name])
            assert_sound_state(exported)
            got = deltas_by_stem(exported)
            assert got.keys() == source.keys()
            for key, want in source.items():
                assert_close(got[key], want, f"{layout_name} {key}")


@given(data=st.data())
@fuzz_settings("load")
def test_load_moslora_weights(seeds, target, data):
    target_pipe = target.pipe
    case = data.draw(hostile_files(seeds), label="case")
    trainable = data.draw(st.integers(0, 4), label="trainable") == 0
    with case_file(case) as path:
        try:
            loaded = expect_loads_or_value_error(
                "load", path, lambda: load_moslora_weights(target_pipe, path, adapter_name="fuzz", trainable=trainable)
            )
            if loaded is None:
                assert not adapted_modules(target_pipe, "fuzz"), "a refused file left a half-loaded adapter"
                return
            family, models = pipeline_models(target_pipe)
            state = fit_adapter_to_models(read_adapter_file(path), models, family)
            expected = {f"{c}.{model_module_path(models[c], p)}" for c, p, _ in state.layer_items()}
            assert adapted_modules(target_pipe, "fuzz") == expected, "modules were dropped or added"
            for component, module_path, layer in state.layer_items():
                module = models[component].get_submodule(model_module_path(models[component], module_path))
                assert_close(module.get_delta_weight("fuzz"), layer.delta_weight(), f"{component}.{module_path}")
        finally:
            _delete_adapter(target_pipe, "fuzz")


def _delete_adapter(pipe, adapter_name: str) -> None:
    _, models = pipeline_models(pipe)
    for model in models.values():
        if adapter_name in (getattr(model, "peft_config", None) or {}):
            model.delete_adapters(adapter_name) if hasattr(model, "delete_adapters") else model.delete_adapter(
                adapter_name
            )


@given(data=st.data())
@fuzz_settings("merge")
def test_merge_adapters(seeds, merge_target, data):
    target_pipe = merge_target.pipe
    case = data.draw(hostile_files(seeds), label="case")
    family, models = pipeline_models(target_pipe)
    before = {c: {k: v.clone() for k, v in m.state_dict().items()} for c, m in models.items()}
    with case_file(case) as path:
        try:
            merged = expect_loads_or_value_error("merge", path, lambda: merge_adapters(target_pipe, [path]))
            after = {c: m.state_dict() for c, m in models.items()}
            changed = {f"{c}.{k}" for c in after for k in after[c] if not torch.equal(after[c][k], before[c][k])}
            if merged is None:
                assert not changed, f"a refused merge changed weights: {sorted(changed)[:3]}"
                return
            state = fit_adapter_to_models(reference_state(path), models, family)
            expected = set()
            for component, module_path, layer in state.layer_items():
                key = f"{model_module_path(models[component], module_path)}.weight"
                expected.add(f"{component}.{key}")
                assert_close(
                    after[component][key].double() - before[component][key].double(),
                    layer.delta_weight(),
                    f"{component}.{key}",
                )
            assert changed <= expected, f"weights the file does not adapt changed: {sorted(changed - expected)[:3]}"
        finally:
            for component, model in models.items():
                model.load_state_dict(before[component])
