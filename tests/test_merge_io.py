"""The streaming safetensors reader and writer the merge uses agree with the safetensors library."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from moslora_diffusion.fileio import SafetensorsReader, write_safetensors_streaming


def _tensors():
    gen = torch.Generator().manual_seed(0)
    return {
        "f32": torch.randn(3, 5, generator=gen),
        "f16": torch.randn(7, generator=gen).half(),
        "bf16": torch.randn(2, 3, 4, generator=gen).bfloat16(),
        "i64": torch.arange(6).reshape(2, 3),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(1.5),
        "empty": torch.zeros(0, 4),
    }


def test_streaming_writer_output_reads_back_with_safetensors(tmp_path):
    tensors = _tensors()
    path = tmp_path / "out.safetensors"
    produced = []

    def tensor_for(name):
        produced.append(name)
        return tensors[name]

    entries = [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    nbytes = write_safetensors_streaming(path, entries, tensor_for, {"format": "pt", "note": "x"})
    assert produced == list(tensors)  # one at a time, in file order
    assert nbytes == sum(v.numel() * v.element_size() for v in tensors.values())
    loaded = load_file(path)
    assert loaded.keys() == tensors.keys()
    for key, value in tensors.items():
        assert loaded[key].dtype == value.dtype and torch.equal(loaded[key], value), key
    with SafetensorsReader(path) as reader:
        assert reader.metadata == {"format": "pt", "note": "x"}


def test_streaming_writer_refuses_a_tensor_unlike_its_declaration(tmp_path):
    with pytest.raises(ValueError, match="declared"):
        write_safetensors_streaming(
            tmp_path / "x.safetensors", [("a", torch.float16, (2,))], lambda name: torch.zeros(2)
        )


def test_reader_reads_library_files_one_tensor_at_a_time(tmp_path):
    tensors = _tensors()
    path = tmp_path / "lib.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    with SafetensorsReader(path) as reader:
        assert set(reader.tensors) == set(tensors)
        for key, value in tensors.items():
            assert reader.tensors[key].shape == tuple(value.shape)
            got = reader.read(key)
            assert got.dtype == value.dtype and torch.equal(got, value), key


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_reader_names_the_file_when_it_is_corrupt(damage, tmp_path):
    path = tmp_path / "bad.safetensors"
    save_file({"w": torch.randn(64, 64)}, str(path))
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"\x10\x00" + data[2:], "empty": b""}[damage])
    with pytest.raises(ValueError, match="bad.safetensors"):
        SafetensorsReader(path)
