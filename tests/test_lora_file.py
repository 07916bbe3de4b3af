"""The LoRA file: precision, kohya's hashes, atomic writes, clear errors on reading."""

import hashlib
import json
import os
import struct

import pytest
import torch

from lorakit.errors import ModelError
from lorakit.network import file as lora_file


def sample_tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "lora_unet_x.lora_down.weight": torch.randn(4, 8, generator=g),
        "lora_unet_x.lora_up.weight": torch.randn(8, 4, generator=g),
        "lora_unet_x.alpha": torch.tensor(2.0),
    }


def test_save_casts_everything_and_hashes_like_kohya(tmp_path):
    path = lora_file.save_lora_file(
        tmp_path / "a.safetensors", sample_tensors(), {"ss_network_dim": "4", "other": "x"}
    )
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"F16"}  # alpha too, like kohya
    meta = header["__metadata__"]
    # sshs_model_hash: sha256 of the tensor data after the header (A1111's addnet hash)
    assert meta["sshs_model_hash"] == hashlib.sha256(data[8 + n :]).hexdigest()
    assert meta["sshs_legacy_hash"] == "e3b0c442"  # files < 1 MiB: sha256 of nothing, as kohya writes
    assert meta["other"] == "x"
    tensors, back = lora_file.read_lora_file(path)
    assert back == meta and torch.allclose(
        tensors["lora_unet_x.lora_up.weight"].float(),
        sample_tensors()["lora_unet_x.lora_up.weight"],
        atol=1e-2,
    )


def test_a_crash_while_writing_leaves_the_old_file_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "a.safetensors"
    lora_file.save_lora_file(path, sample_tensors(), {})
    before = path.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    t = sample_tensors()
    t["lora_unet_x.alpha"] = torch.tensor(9.0)
    with pytest.raises(OSError):
        lora_file.save_lora_file(path, t, {})
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]


@pytest.mark.parametrize(
    "name,content,match",
    [
        ("missing.safetensors", None, "does not exist"),
        ("a.pt", b"x", r"a \.pt LoRA is a pickle.*Convert it.*a\.safetensors"),
        ("a.bin.txt", b"x", "safetensors files only"),
        ("broken.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json", "not a readable"),
        ("empty.safetensors", b"", "not a readable"),
    ],
)
def test_read_errors_name_the_file(tmp_path, name, content, match):
    p = tmp_path / name
    if content is not None:
        p.write_bytes(content)
    with pytest.raises(ModelError, match=match) as e:
        lora_file.read_lora_file(p)
    assert name in str(e.value)


def test_a_file_without_lora_keys_is_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"model.diffusion_model.x": torch.zeros(1)}, str(tmp_path / "base.safetensors"))
    with pytest.raises(ModelError, match="no kohya LoRA keys"):
        lora_file.read_lora_file(tmp_path / "base.safetensors")
    name = "lora_unet_conv_in"
    save_file(
        {f"{name}.oft_blocks": torch.zeros(4, 2, 2), f"{name}.alpha": torch.tensor(1.0)},
        str(tmp_path / "oft.safetensors"),
    )
    with pytest.raises(ModelError, match="LyCORIS OFT/BOFT file, which lorakit does not apply"):
        lora_file.read_lora_file(tmp_path / "oft.safetensors")
