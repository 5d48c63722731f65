"""``moslora merge --base FILE.safetensors [--base_config DIR]``: merging into a single-file base equals
merging into its diffusers twin (weights equal), written in the file's own layout or as a diffusers folder."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import AutoModel
from safetensors.torch import load_file, save_file
from test_merge import lora_file, merge_main, tiny_base  # noqa: F401  (session fixtures)
from test_merge_single_file import transformer_from_original
from test_single_file_bases import write_single_file

from moslora_diffusion.families import get_family
from moslora_diffusion.fileio import read_safetensors_metadata
from moslora_diffusion.merge import merge_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

# family -> adapter kind of test_merge.lora_file: a MoSLoRA on denoiser and text encoders, or a plain LoRA
# on the denoiser only (a Flux or SD3 single file holds no text encoder).
CASES = {"sd15": "moslora", "sdxl": "moslora", "sd3": "plain_denoiser", "flux": "plain_denoiser"}
# The families whose single file is the transformer alone in its original repository's names (ComfyUI's files).
TRANSFORMER_FILE_FAMILIES = ("chroma", "zimage", "qwenimage", "flux2_klein", "flux2")
CASES.update(dict.fromkeys(TRANSFORMER_FILE_FAMILIES, "plain_denoiser"))


@pytest.fixture(scope="module")
def denoiser_lora(tmp_path_factory):
    from test_merge import make_lora_file

    made = {}

    def get(family):
        if family not in made:
            made[family] = make_lora_file(
                family, tmp_path_factory.mktemp(f"lora_{family}"), text_encoders=False, seed=3
            )
        return made[family]

    return get


def _single_file_twin(family, folder, tmp_path):
    """The tiny pipeline saved in ``folder`` (tiny_base), written as one single file."""
    path = tmp_path / f"{family}.safetensors"
    write_single_file(family, path, seed=0)  # make_tiny_pipeline(family) is seeded: the same weights as the folder
    return path


@pytest.mark.parametrize("family", list(CASES))
def test_merging_into_a_single_file_equals_merging_into_its_folder_twin(
    family, tiny_base, lora_file, denoiser_lora, tmp_path
):
    folder = tiny_base(family)
    base = _single_file_twin(family, folder, tmp_path)
    adapter = lora_file(family) if CASES[family] == "moslora" else denoiser_lora(family)
    from_folder = merge_checkpoint(folder, [(adapter, 0.7)], tmp_path / "from_folder.safetensors")
    from_file = merge_checkpoint(base, [(adapter, 0.7)], tmp_path / "from_file.safetensors", base_config=folder)
    assert from_file.tensors_merged > 0 and from_file.components == from_folder.components

    want, got, original = (load_file(str(p)) for p in (from_folder.output, from_file.output, base))
    assert got.keys() == original.keys() == want.keys()
    for key, value in want.items():
        assert torch.equal(got[key], value), key
    assert any(not torch.equal(got[k], original[k]) for k in got), "the adapter changed nothing"
    record = json.loads(read_safetensors_metadata(from_file.output)["moslora_merge"])
    assert record["base"] == str(base) and record["family"] == family


@pytest.mark.parametrize("family", TRANSFORMER_FILE_FAMILIES)
def test_a_merged_single_file_read_by_diffusers_equals_the_merged_folder(family, tiny_base, denoiser_lora, tmp_path):
    """The single file keeps its own names; diffusers' converter (what from_single_file runs) turns the merged
    file into exactly the transformer of the same merge written as a diffusers folder."""
    folder = tiny_base(family)
    base = _single_file_twin(family, folder, tmp_path)
    adapter = denoiser_lora(family)
    from_folder = merge_checkpoint(folder, [(adapter, 0.7)], tmp_path / "from_folder")
    from_file = merge_checkpoint(base, [(adapter, 0.7)], tmp_path / "from_file.safetensors", base_config=folder)

    merged, original = load_file(str(from_file.output)), load_file(str(base))
    assert merged.keys() == original.keys()  # the file's own layout, tensor for tensor
    assert any(not torch.equal(merged[k], original[k]) for k in merged), "the adapter changed nothing"
    ((_, kind, _),) = get_family(family).single_file_layout
    model = AutoModel.from_pretrained(str(folder), subfolder="transformer")
    got = transformer_from_original(kind, merged, model)
    want = load_file(str(next((from_folder.output / "transformer").glob("*.safetensors"))))
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert torch.equal(got[key], value), key


def test_a_single_file_keeps_what_the_layout_does_not_know(tiny_base, lora_file, tmp_path):
    """Tensors outside the layout (a v_pred marker, EMA copies, ...) and a bf16 cast, as in real files."""
    folder = tiny_base("sd15")
    base = _single_file_twin("sd15", folder, tmp_path)
    tensors = load_file(str(base))
    tensors["v_pred"] = torch.zeros(0)
    tensors["model_ema.decay"] = torch.tensor(0.999)
    save_file(tensors, str(base))
    out = merge_checkpoint(base, [lora_file("sd15")], tmp_path / "out.safetensors", base_config=folder, dtype="bf16")
    merged = load_file(str(out.output))
    assert merged.keys() == tensors.keys()
    assert merged["model_ema.decay"].dtype == torch.bfloat16 and merged["v_pred"].numel() == 0


@pytest.mark.parametrize("family", ["sd15", "flux2"])  # a full single file; a transformer-only one
def test_a_single_file_merges_into_a_diffusers_folder(family, tiny_base, lora_file, tmp_path):
    folder = tiny_base(family)
    base = _single_file_twin(family, folder, tmp_path)
    from_folder = merge_checkpoint(folder, [lora_file(family)], tmp_path / "from_folder")
    from_file = merge_checkpoint(base, [lora_file(family)], tmp_path / "from_file", base_config=folder)
    for component in (get_family(family).denoiser, "text_encoder", "vae"):
        want = load_file(str(next((from_folder.output / component).glob("*.safetensors"))))
        got = load_file(str(next((from_file.output / component).glob("*.safetensors"))))
        assert got.keys() == want.keys(), component
        assert all(torch.equal(got[k], want[k]) for k in want), component
    assert f"`{base}`" in (from_file.output / "README.md").read_text()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".moslora-base-")], "the temporary folder is left"


def test_the_command_line_merges_a_single_file(tiny_base, lora_file, tmp_path, capsys):
    folder = tiny_base("sd15")
    base = _single_file_twin("sd15", folder, tmp_path)
    out = tmp_path / "merged.safetensors"
    argv = [
        "--base",
        str(base),
        "--base_config",
        str(folder),
        "--adapter",
        str(lora_file("sd15")),
        "--output",
        str(out),
    ]
    assert merge_main(argv) == 0
    assert out.is_file() and "merged 1 adapter(s)" in capsys.readouterr().out


def _bad_single_file_bases(tiny_base, lora_file, tmp_path):
    sd15 = _single_file_twin("sd15", tiny_base("sd15"), tmp_path)
    save_file({"mystery.weight": torch.zeros(1)}, str(tmp_path / "mystery.safetensors"))
    (tmp_path / "model.ckpt").write_bytes(b"never opened")
    adapter = ["--adapter", str(lora_file("sd15")), "--output", str(tmp_path / "out.safetensors")]
    return {
        "unknown family": (["--base", str(tmp_path / "mystery.safetensors"), *adapter], "match no known family"),
        "pickle": (["--base", str(tmp_path / "model.ckpt"), *adapter], "pickled checkpoints can run code"),
        "config of another family": (
            ["--base", str(sd15), "--base_config", str(tiny_base("sdxl")), *adapter],
            "is a sd15 checkpoint but --base_config",
        ),
        "default config needs the hub": (["--base", str(sd15), *adapter], "pass --base_config DIR"),
        "base_config with a folder base": (
            ["--base", str(tiny_base("sd15")), "--base_config", str(tiny_base("sd15")), *adapter],
            "leave it out",
        ),
    }


@pytest.mark.parametrize(
    "case",
    [
        "unknown family",
        "pickle",
        "config of another family",
        "default config needs the hub",
        "base_config with a folder base",
    ],
)
def test_bad_single_file_bases_are_one_line_exit_2(case, tiny_base, lora_file, tmp_path, capsys):
    argv, expected = _bad_single_file_bases(tiny_base, lora_file, tmp_path)[case]
    capsys.readouterr()
    assert merge_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("moslora: error:") and expected in err, err
    assert not (tmp_path / "out.safetensors").exists()
