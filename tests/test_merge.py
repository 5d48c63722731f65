"""Merging adapters into checkpoints: the merged model behaves as base + stock load_lora_weights.

Adapters here are made the way users get them: a MoSLoRA adapter (random A, M, B) folded and written
with diffusers' own save_lora_weights, a plain PEFT LoRA of another rank and alpha, and the three files
save_moslora_weights writes. The reference is always stock diffusers: load_lora_weights + set_adapters.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import randomize_adapter
from diffusers import DiffusionPipeline
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict

from moslora_diffusion import MoSLoRAConfig, add_moslora, fold_mixer_into_lora_b
from moslora_diffusion.cli import main as moslora_main
from moslora_diffusion.families import family_of_pipeline, get_family
from moslora_diffusion.merge import AdapterSpec, merge_adapters, merge_checkpoint, parse_adapter_spec
from moslora_diffusion.targets import resolve_target_modules
from moslora_diffusion.testing import make_tiny_pipeline, tiny_pipeline_kwargs

# --------------------------------------------------------------------------------------------------
# Helpers shared with the other test_merge_*.py files


def folded_peft_state_dict(model: torch.nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """PEFT's state dict of one adapter with the mixer folded into B (B' = B M): a plain LoRA."""
    tensors = get_peft_model_state_dict(model, adapter_name=adapter_name)
    folded = {}
    for key, value in tensors.items():
        if ".lora_mixer." in key:
            continue
        mixer = tensors.get(key.replace(".lora_B.", ".lora_mixer.")) if ".lora_B." in key else None
        folded[key] = fold_mixer_into_lora_b(value, mixer) if mixer is not None else value
    return folded


def make_lora_file(
    family: str,
    folder: Path,
    *,
    moslora: bool = True,
    r: int = 4,
    alpha: float = 8,
    text_encoders: bool = True,
    seed: int = 0,
    weight_name: str = "pytorch_lora_weights.safetensors",
) -> Path:
    """A random adapter on a fresh tiny ``family`` pipeline, folded and saved with stock save_lora_weights."""
    pipe = make_tiny_pipeline(family)
    fam = family_of_pipeline(pipe)
    loadable = type(pipe)._lora_loadable_modules
    # Stock diffusers loads LoRA on CLIP text encoders only (never T5).
    components = [fam.denoiser] + ([c for c in fam.clip_text_encoders() if c in loadable] if text_encoders else [])
    kwargs = {}
    for i, component in enumerate(components):
        model = getattr(pipe, component)
        if moslora:
            config = MoSLoRAConfig(r=r, lora_alpha=alpha)
            add_moslora(model, config, "x")
            metadata = config.to_lora_config_kwargs()
        else:
            # The denoiser's q, v and out; a text encoder's first and last attention projection (CLIP or T5).
            attention = resolve_target_modules(model, "attention")
            targets = ["to_q", "to_v", "to_out.0"] if component == fam.denoiser else [attention[0], attention[-1]]
            config = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets)
            model.add_adapter(config, adapter_name="x")
            metadata = config.to_dict()
        randomize_adapter(model, "x", seed=seed + i)
        kwargs[f"{component}_lora_layers"] = folded_peft_state_dict(model, "x")
        kwargs[f"{component}_lora_adapter_metadata"] = metadata
    type(pipe).save_lora_weights(folder, weight_name=weight_name, **kwargs)
    return Path(folder) / weight_name


_BASES: dict[str, Path] = {}


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory):
    """tiny_base(family) -> a saved tiny pipeline folder (made once per session)."""

    def get(family: str) -> Path:
        if family not in _BASES:
            path = tmp_path_factory.mktemp(f"base_{family}")
            make_tiny_pipeline(family).save_pretrained(path, safe_serialization=True)
            _BASES[family] = path
        return _BASES[family]

    return get


_ADAPTERS: dict[tuple, Path] = {}


@pytest.fixture(scope="session")
def lora_file(tmp_path_factory):
    """lora_file(family, kind) -> a stock LoRA file: kind "moslora" (folded, text encoders too) or "plain"."""

    def get(family: str, kind: str = "moslora") -> Path:
        if (family, kind) not in _ADAPTERS:
            folder = tmp_path_factory.mktemp(f"lora_{family}_{kind}")
            if kind == "moslora":
                _ADAPTERS[family, kind] = make_lora_file(family, folder, seed=1)
            else:
                _ADAPTERS[family, kind] = make_lora_file(family, folder, moslora=False, r=2, alpha=1, seed=7)
        return _ADAPTERS[family, kind]

    return get


def images(pipe, family: str):
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    return pipe(prompt="a photo of a sks dog", generator=generator, **tiny_pipeline_kwargs(family)).images


def stock_reference_pipeline(base: Path, adapters: list[tuple[Path, float]]):
    """Base + stock load_lora_weights of each file, weighted with set_adapters (no code of ours)."""
    pipe = DiffusionPipeline.from_pretrained(base)
    names = []
    for i, (path, _) in enumerate(adapters):
        pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=f"a{i}")
        names.append(f"a{i}")
    pipe.set_adapters(names, [w for _, w in adapters])
    return pipe


def adapted_components(pipe) -> list[str]:
    fam = family_of_pipeline(pipe)
    return [c for c in fam.adapter_components() if getattr(pipe, c, None) is not None]


def assert_no_partial_output(output: Path) -> None:
    """Neither the output nor any temporary file beside it is left behind."""
    assert not output.exists()
    leftovers = [p.name for p in output.parent.iterdir() if p.name.startswith(f".{output.name}")]
    assert leftovers == []


def merge_main(argv: list[str]) -> int:
    """``moslora merge ARGV``."""
    return moslora_main(["merge", *argv])


# --------------------------------------------------------------------------------------------------
# PATH[:WEIGHT]


@pytest.mark.parametrize(
    "text, path, weight",
    [
        ("subject", "subject", 1.0),
        ("subject:0.7", "subject", 0.7),
        ("subject:-1.5e-1", "subject", -0.15),
        ("dir/with:colon/file.safetensors", "dir/with:colon/file.safetensors", 1.0),
        ("dir/with:colon/file.safetensors:2", "dir/with:colon/file.safetensors", 2.0),
        ("C:\\loras\\x.safetensors", "C:\\loras\\x.safetensors", 1.0),
    ],
)
def test_adapter_spec_parses_weight_after_last_colon(text, path, weight):
    assert parse_adapter_spec(text) == AdapterSpec(Path(path), weight)


def test_adapter_spec_existing_path_with_colon_is_a_path(tmp_path):
    odd = tmp_path / "style:0.5"
    odd.mkdir()
    assert parse_adapter_spec(str(odd)) == AdapterSpec(odd, 1.0)
    assert parse_adapter_spec(f"{odd}:0.25") == AdapterSpec(odd, 0.25)
    with pytest.raises(ValueError, match="finite"):
        parse_adapter_spec("x:nan")


# --------------------------------------------------------------------------------------------------
# The merged folder behaves as base + stock LoRA


@pytest.mark.parametrize(
    "family, weights",
    [
        ("sd15", (0.8,)),
        ("sd15", (0.7, -0.5)),
        ("sdxl", (0.7, -0.5)),
        ("sd3", (0.7, -0.5)),
        ("flux", (0.7, -0.5)),
        ("chroma", (0.7, -0.5)),
        ("zimage", (0.7, -0.5)),
        ("qwenimage", (2.0, -1.5)),  # the tiny Qwen-Image moves least per unit of adapter
        ("flux2_klein", (3.0, -2.0)),  # so does the tiny Flux.2 (0.7 moves its images by 0.004)
        ("flux2", (3.0, -2.0)),
    ],
)
def test_merged_folder_matches_stock_lora_images(family, weights, tiny_base, lora_file, tmp_path):
    base = tiny_base(family)
    files = [lora_file(family, "moslora"), lora_file(family, "plain")][: len(weights)]
    adapters = list(zip(files, weights))
    output = tmp_path / "merged"
    result = merge_checkpoint(base, adapters, output)
    # Text-encoder adapters are merged too (every family's MoSLoRA file carries its CLIPs').
    assert set(get_family(family).clip_text_encoders()) <= set(result.components) and result.tensors_merged > 0

    expected = images(stock_reference_pipeline(base, adapters), family)
    merged_pipe = DiffusionPipeline.from_pretrained(output)
    assert not any(
        isinstance(m, BaseTunerLayer)
        for c in adapted_components(merged_pipe)
        for m in getattr(merged_pipe, c).modules()
    )
    got = images(merged_pipe, family)
    assert abs(got - expected).max() <= 1e-4
    assert abs(images(DiffusionPipeline.from_pretrained(base), family) - expected).max() > 1e-2  # the adapters matter


def test_merge_adapters_in_place_equals_stock_fuse_and_leaves_no_adapter(tiny_base, lora_file):
    base = tiny_base("sd15")
    adapters = [(lora_file("sd15", "moslora"), 0.7), (lora_file("sd15", "plain"), -0.5)]
    naive = stock_reference_pipeline(base, adapters)
    naive.fuse_lora(components=adapted_components(naive))
    naive.unload_lora_weights()

    pipe = DiffusionPipeline.from_pretrained(base)
    assert merge_adapters(pipe, adapters) is pipe
    for component in adapted_components(pipe):
        model = getattr(pipe, component)
        assert not getattr(model, "peft_config", None)
        assert not any(isinstance(m, BaseTunerLayer) for m in model.modules())
        expected = getattr(naive, component).state_dict()
        for key, value in model.state_dict().items():
            torch.testing.assert_close(value, expected[key], rtol=0, atol=1e-6, msg=f"{component}.{key}")


def test_components_limits_the_merge(tiny_base, lora_file, tmp_path):
    base = tiny_base("sd15")
    output = tmp_path / "unet_only"
    result = merge_checkpoint(base, [lora_file("sd15")], output, components=["unet"])
    assert result.components == ["unet"]
    merged, original = DiffusionPipeline.from_pretrained(output), DiffusionPipeline.from_pretrained(base)
    for key, value in merged.text_encoder.state_dict().items():
        assert torch.equal(value, original.text_encoder.state_dict()[key])
    assert any(not torch.equal(v, original.unet.state_dict()[k]) for k, v in merged.unet.state_dict().items())


# --------------------------------------------------------------------------------------------------
# Our own adapter files: native (with the mixer), folded and kohya, from a file or the folder


@pytest.fixture(scope="module")
def saved_moslora_folder(tmp_path_factory):
    from moslora_diffusion.loaders import save_moslora_weights

    pipe = make_tiny_pipeline("sd15")
    add_moslora(pipe.unet, MoSLoRAConfig(r=4, lora_alpha=8), "subject")
    add_moslora(pipe.text_encoder, MoSLoRAConfig(r=4, lora_alpha=4), "subject")
    randomize_adapter(pipe.unet, "subject", seed=3)
    randomize_adapter(pipe.text_encoder, "subject", seed=4)
    folder = tmp_path_factory.mktemp("saved_moslora")
    save_moslora_weights(pipe, folder, "subject")
    return folder


@pytest.mark.parametrize("which", ["folder", "moslora_weights.safetensors", "pytorch_lora_weights_kohya.safetensors"])
def test_native_and_kohya_files_merge_like_the_folded_file(which, saved_moslora_folder, tiny_base):
    base = tiny_base("sd15")
    spec = saved_moslora_folder if which == "folder" else saved_moslora_folder / which
    reference = stock_reference_pipeline(base, [(saved_moslora_folder / "pytorch_lora_weights.safetensors", 0.6)])
    reference.fuse_lora(components=["unet", "text_encoder"])
    reference.unload_lora_weights()
    pipe = merge_adapters(DiffusionPipeline.from_pretrained(base), [(spec, 0.6)])
    for component in ("unet", "text_encoder"):
        expected = getattr(reference, component).state_dict()
        for key, value in getattr(pipe, component).state_dict().items():
            torch.testing.assert_close(value, expected[key], rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_sd_scripts_and_diffusers_files_of_sd3_and_flux_merge_like_the_native_file(family, tiny_base, tmp_path):
    """The kohya file (sd-scripts' fused names) and the diffusers file (T5 under ComfyUI's key) merge exactly."""
    from moslora_diffusion.loaders import save_moslora_weights

    pipe = make_tiny_pipeline(family)
    add_moslora(pipe.transformer, MoSLoRAConfig(r=4, lora_alpha=8, target_modules="attention+ff"))
    randomize_adapter(pipe.transformer, "default", seed=5)
    t5 = {"sd3": "text_encoder_3", "flux": "text_encoder_2"}[family]
    if getattr(pipe, t5, None) is not None:
        add_moslora(getattr(pipe, t5), MoSLoRAConfig(r=2, lora_alpha=3))
        randomize_adapter(getattr(pipe, t5), "default", seed=6)
    save_moslora_weights(pipe, tmp_path)
    merged = {
        name: merge_adapters(DiffusionPipeline.from_pretrained(tiny_base(family)), [tmp_path / name])
        for name in (
            "moslora_weights.safetensors",
            "pytorch_lora_weights_kohya.safetensors",
            "pytorch_lora_weights.safetensors",
        )
    }
    reference = merged.pop("moslora_weights.safetensors")
    for name, other in merged.items():
        for component in ("transformer", t5):
            if getattr(reference, component, None) is None:
                continue
            expected = getattr(reference, component).state_dict()
            for key, value in getattr(other, component).state_dict().items():
                torch.testing.assert_close(value, expected[key], rtol=0, atol=1e-6, msg=f"{name}: {component}.{key}")


def _sgm_kohya_twin(diffusers_file: Path, unet_config: dict, alpha: float, target: Path) -> Path:
    """The same SDXL LoRA with kohya keys in SGM names (lora_unet_input_blocks_4_1_...), as sd-scripts writes."""
    import re

    from safetensors.torch import load_file, save_file

    from moslora_diffusion.single_file import _apply_rules, _unet_rules

    tensors = load_file(diffusers_file)
    unet_weights = [
        k.removeprefix("unet.").partition(".lora_")[0] + ".weight" for k in tensors if k.startswith("unet.")
    ]
    rules = [(re.compile(rule[0]), *rule[1:]) for rule in _unet_rules(unet_weights, unet_config)]
    kohya = {}
    for key, value in tensors.items():
        component, _, rest = key.partition(".")
        module, _, factor = rest.partition(".lora_")
        if component == "unet":
            stem = "lora_unet_" + _apply_rules(rules, f"{module}.weight", "unet")[0].removesuffix(".weight")
        else:
            stem = (
                {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}[component]
                + "text_model."
                + module.removeprefix("text_model.")
            )
        stem = stem.replace(".", "_")
        kohya[f"{stem}.lora_down.weight" if factor.startswith("A") else f"{stem}.lora_up.weight"] = value
        kohya[f"{stem}.alpha"] = torch.tensor(float(alpha))
    save_file(kohya, str(target))
    return target


def test_lora_only_diffusers_reads_merges_through_its_loader(tiny_base, lora_file, tmp_path):
    from safetensors.torch import load_file

    # load_moslora_weights cannot place SGM-named kohya keys; diffusers' own loader can, and is tried next.
    base = tiny_base("sdxl")
    twin = _sgm_kohya_twin(
        lora_file("sdxl"),
        json.loads((base / "unet" / "config.json").read_text()),
        8,
        tmp_path / "sgm_kohya.safetensors",
    )
    assert any(k.startswith("lora_unet_input_blocks_") for k in load_file(twin))
    got = merge_adapters(DiffusionPipeline.from_pretrained(base), [(twin, 0.7)])
    expected = merge_adapters(DiffusionPipeline.from_pretrained(base), [(lora_file("sdxl"), 0.7)])
    for component in ("unet", "text_encoder", "text_encoder_2"):
        want = getattr(expected, component).state_dict()
        for key, value in getattr(got, component).state_dict().items():
            torch.testing.assert_close(value, want[key], rtol=0, atol=1e-6, msg=f"{component}.{key}")


# --------------------------------------------------------------------------------------------------
# dtype


def test_half_precision_outputs_are_the_fp32_merge_rounded(tiny_base, lora_file, tmp_path):
    from safetensors.torch import load_file

    base = tiny_base("sd15")
    adapters = [(lora_file("sd15"), 0.9)]
    merge_checkpoint(base, adapters, tmp_path / "fp32", dtype="fp32")
    for name, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        merge_checkpoint(base, adapters, tmp_path / name, dtype=name)
        for file in (
            "unet/diffusion_pytorch_model.safetensors",
            "text_encoder/model.safetensors",
            "vae/diffusion_pytorch_model.safetensors",
        ):
            full, half = load_file(tmp_path / "fp32" / file), load_file(tmp_path / name / file)
            assert full.keys() == half.keys()
            for key, value in full.items():
                assert half[key].dtype == dtype
                # fp32 maths then one rounding: exactly the fp32 result cast, so within half an ulp of it.
                assert torch.equal(half[key], value.to(dtype)), key
                assert (
                    (half[key].float() - value).abs() <= torch.finfo(dtype).eps * value.abs() + torch.finfo(dtype).tiny
                ).all()
        pipe = DiffusionPipeline.from_pretrained(tmp_path / name, torch_dtype=dtype)
        assert pipe.unet.dtype == dtype and pipe.text_encoder.dtype == dtype


# --------------------------------------------------------------------------------------------------
# Files: README, shards, atomic output


def test_readme_records_base_and_each_adapter(tiny_base, lora_file, tmp_path):
    import hashlib

    base = tiny_base("sd15")
    a, b = lora_file("sd15", "moslora"), lora_file("sd15", "plain")
    merge_checkpoint(base, [(a, 0.7), (b, -0.5)], tmp_path / "out")
    readme = (tmp_path / "out" / "README.md").read_text()
    assert str(base) in readme
    for path, weight in ((a, "0.7"), (b, "-0.5")):
        assert f"| `{path}` | {weight} |" in readme
        assert hashlib.sha256(path.read_bytes()).hexdigest() in readme


def test_sharded_base_stays_sharded(tiny_base, lora_file, tmp_path):
    from safetensors.torch import load_file

    base = tmp_path / "sharded"
    make_tiny_pipeline("sd15").save_pretrained(base, safe_serialization=True, max_shard_size="1MB")
    shards = sorted(p.name for p in (base / "unet").glob("*.safetensors"))
    assert len(shards) > 1
    merge_checkpoint(base, [(lora_file("sd15"), 0.8)], tmp_path / "out", dtype="fp16")
    assert sorted(p.name for p in (tmp_path / "out" / "unet").glob("*.safetensors")) == shards
    index = json.loads((tmp_path / "out" / "unet" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    tensors = {k: v for shard in shards for k, v in load_file(tmp_path / "out" / "unet" / shard).items()}
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    merged = DiffusionPipeline.from_pretrained(tmp_path / "out", torch_dtype=torch.float16)
    reference = merge_adapters(DiffusionPipeline.from_pretrained(tiny_base("sd15")), [(lora_file("sd15"), 0.8)])
    for key, value in merged.unet.state_dict().items():
        assert torch.equal(value, reference.unet.state_dict()[key].half())


@pytest.mark.parametrize("output_name", ["out", "out.safetensors"])
def test_failure_midway_leaves_nothing_and_keeps_the_old_output(
    output_name, tiny_base, lora_file, tmp_path, monkeypatch, capsys
):
    from moslora_diffusion.merge.base_weights import MergedTensors

    base, output = tiny_base("sd15"), tmp_path / output_name
    argv = ["--base", str(base), "--adapter", str(lora_file("sd15")), "--output", str(output)]
    calls = {"n": 0}
    real_read = MergedTensors.read

    def failing_read(self, component, key):
        calls["n"] += 1
        if calls["n"] == 20:
            raise OSError(28, "No space left on device")
        return real_read(self, component, key)

    monkeypatch.setattr(MergedTensors, "read", failing_read)
    capsys.readouterr()
    assert merge_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "No space left on device" in err
    assert_no_partial_output(output)

    # With --overwrite, a failure leaves the previous output as it was.
    monkeypatch.setattr(MergedTensors, "read", real_read)
    assert merge_main(argv) == 0
    before = sorted((p.relative_to(tmp_path), p.stat().st_mtime_ns) for p in tmp_path.rglob("*"))
    calls["n"] = 0
    monkeypatch.setattr(MergedTensors, "read", failing_read)
    assert merge_main([*argv, "--overwrite"]) == 2
    assert sorted((p.relative_to(tmp_path), p.stat().st_mtime_ns) for p in tmp_path.rglob("*")) == before


# --------------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, nothing written


def _bad_inputs(tiny_base, lora_file, tmp_path):
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(lora_file("sd15").read_bytes()[:300])
    pickled = tmp_path / "pytorch_lora_weights.bin"
    torch.save({"unet.x.lora_A.weight": torch.zeros(1)}, pickled)
    not_a_folder = tmp_path / "a_file"
    not_a_folder.write_text("x")
    sd15 = str(tiny_base("sd15"))
    good = str(lora_file("sd15"))
    return {
        "corrupt adapter": (["--base", sd15, "--adapter", str(corrupt)], "not a valid safetensors file"),
        "pickle adapter": (["--base", sd15, "--adapter", str(pickled)], "pickle"),
        "missing adapter": (["--base", sd15, "--adapter", str(tmp_path / "nope.safetensors")], "no such file"),
        "sdxl adapter onto sd15": (["--base", sd15, "--adapter", str(lora_file("sdxl"))], "another model family"),
        "sd15 adapter onto sdxl": (["--base", str(tiny_base("sdxl")), "--adapter", good], "another model family"),
        "unknown component": (["--base", sd15, "--adapter", good, "--components", "unet,transformer"], "'transformer'"),
        "components the adapters leave alone": (
            ["--base", str(tiny_base("flux")), "--adapter", str(lora_file("flux")), "--components", "text_encoder_2"],
            "change none of these",
        ),
        "unwritable output": (
            ["--base", sd15, "--adapter", good, "--output", str(not_a_folder / "out")],
            "is not a folder",
        ),
        "existing output": (
            ["--base", sd15, "--adapter", good, "--output", str(not_a_folder.parent)],
            "already exists",
        ),
        "output inside base": (["--base", sd15, "--adapter", good, "--output", f"{sd15}/merged"], "overlaps"),
        "pickle single file": (
            ["--base", sd15, "--adapter", good, "--output", str(tmp_path / "out.ckpt")],
            ".safetensors",
        ),
        "missing base": (["--base", str(tmp_path / "no_base"), "--adapter", good], "no such folder"),
        "text encoder into a flux single file": (
            [
                "--base",
                str(tiny_base("flux")),
                "--adapter",
                str(lora_file("flux")),
                "--output",
                str(tmp_path / "flux.safetensors"),
            ],
            "text_encoder",
        ),
    }


_BAD = [
    "corrupt adapter",
    "pickle adapter",
    "missing adapter",
    "sdxl adapter onto sd15",
    "sd15 adapter onto sdxl",
    "unknown component",
    "components the adapters leave alone",
    "unwritable output",
    "existing output",
    "output inside base",
    "pickle single file",
    "missing base",
    "text encoder into a flux single file",
]


@pytest.mark.parametrize("case", _BAD)
def test_bad_input_is_one_line_exit_2_and_no_output(case, tiny_base, lora_file, tmp_path, capsys):
    argv, expected = _bad_inputs(tiny_base, lora_file, tmp_path)[case]
    if "--output" not in argv:
        argv = [*argv, "--output", str(tmp_path / "merged")]
    output = Path(argv[argv.index("--output") + 1])
    existed = output.exists()
    capsys.readouterr()  # drop what building the fixtures printed
    code = merge_main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.count("\n") == 0 and err.startswith("moslora: error:"), err
    assert expected in err, err
    if not existed:
        assert not output.exists()
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


def test_argparse_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as raised:
        merge_main(["--base", "b", "--adapter", "a", "--output", "o", "--dtype", "fp8"])
    assert raised.value.code == 2
    assert "--dtype" in capsys.readouterr().err
