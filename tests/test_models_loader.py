"""Base-model loading: round trips through every supported format, offline, and clear errors."""

from __future__ import annotations

import json
import os
import pickle
import socket

import pytest
import torch
from safetensors.torch import save_file

from lorakit.errors import ModelError
from lorakit.models import ldm_layout
from lorakit.models.checkpoint import read_state_dict
from lorakit.models.loader import BaseModel, load_base_model, save_ldm_checkpoint
from lorakit.models.tiny import build_models, tiny_arch


@pytest.fixture(scope="module")
def tiny():
    arch = tiny_arch()
    return arch, build_models(arch, seed=0)


@pytest.fixture(scope="module")
def tiny_file(tiny, tmp_path_factory):
    arch, (unet, vae, te) = tiny
    return save_ldm_checkpoint(tmp_path_factory.mktemp("m") / "tiny.safetensors", unet, vae, te, arch)


@pytest.fixture
def offline(monkeypatch):
    attempts = []

    def refuse(sock, address, *args, **kwargs):
        attempts.append(address)  # recorded: a caller that swallows the OSError must not hide it
        raise OSError("network access attempted during an offline test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    yield
    assert attempts == [], f"tried to connect to {attempts}"


def assert_same_weights(models, base: BaseModel):
    for want, got in zip(models, (base.unet, base.vae, base.text_encoder)):
        a, b = want.state_dict(), got.state_dict()
        assert set(a) == set(b)
        for k in a:
            assert torch.equal(a[k], b[k]), k


def test_safetensors_round_trip(tiny, tiny_file, offline):
    arch, models = tiny
    base = load_base_model(tiny_file)
    assert base.kind == "single_file" and base.source == tiny_file
    assert base.arch == arch
    assert base.tokenizer("a cat").input_ids == [49406, 320, 2368, 49407]
    assert_same_weights(models, base)
    _, metadata = read_state_dict(tiny_file)
    assert json.loads(metadata["lorakit.arch"]) == arch
    assert not [p for p in tiny_file.parent.iterdir() if p.name.endswith(".tmp")]  # atomic write cleaned up


def test_ckpt_round_trip(tiny, tmp_path, offline):
    arch, models = tiny
    ldm_sd = ldm_layout.to_ldm_state_dict(*(m.state_dict() for m in models))
    path = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": ldm_sd, "lorakit.arch": json.dumps(arch), "global_step": 7}, path)
    base = load_base_model(path)
    assert base.kind == "single_file" and base.arch == arch
    assert_same_weights(models, base)


def test_diffusers_folder_round_trip(tiny, tmp_path, offline):
    arch, models = tiny
    for name, model in zip(("unet", "vae", "text_encoder"), models):
        model.save_pretrained(tmp_path / name)
    (tmp_path / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "StableDiffusionPipeline",
                "unet": ["diffusers", "UNet2DConditionModel"],
                "vae": ["diffusers", "AutoencoderKL"],
                "text_encoder": ["transformers", "CLIPTextModel"],
            }
        )
    )
    base = load_base_model(tmp_path)
    assert base.kind == "diffusers"
    assert base.arch["unet"]["block_out_channels"] == arch["unet"]["block_out_channels"]
    assert base.arch["text_encoder"]["hidden_size"] == 32
    assert_same_weights(models, base)


def test_dtype_and_old_style_te_keys(tiny, tmp_path):
    arch, models = tiny
    ldm_sd = ldm_layout.to_ldm_state_dict(*(m.state_dict() for m in models))
    # older checkpoints lack `text_model.` in the TE keys and carry position_ids
    prefix = ldm_layout.TE_PREFIX + "text_model."
    ldm_sd = {
        ldm_layout.TE_PREFIX + k[len(prefix) :] if k.startswith(prefix) else k: v.half()
        for k, v in ldm_sd.items()
    }
    ldm_sd[ldm_layout.TE_PREFIX + "embeddings.position_ids"] = torch.arange(77)[None]
    path = tmp_path / "half.safetensors"
    save_file(ldm_sd, path, metadata={"lorakit.arch": json.dumps(arch)})
    base = load_base_model(path, dtype=torch.bfloat16)
    assert {p.dtype for m in (base.unet, base.vae, base.text_encoder) for p in m.parameters()} == {
        torch.bfloat16
    }
    want = models[0].state_dict()["conv_in.weight"].half().to(torch.bfloat16)
    assert torch.equal(base.unet.state_dict()["conv_in.weight"], want)


def test_save_with_dtype(tiny, tmp_path):
    arch, models = tiny
    path = save_ldm_checkpoint(tmp_path / "sub" / "half.safetensors", *models, arch=None, dtype=torch.float16)
    sd, metadata = read_state_dict(path)
    assert "lorakit.arch" not in metadata
    assert {v.dtype for v in sd.values()} == {torch.float16}
    assert sd["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (16, 16, 1, 1)


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


@pytest.mark.parametrize("legacy", [False, True])
def test_malicious_ckpt_is_refused(tiny, tmp_path, legacy):
    marker = tmp_path / "marker.txt"
    ldm_sd = ldm_layout.to_ldm_state_dict(*(m.state_dict() for m in tiny[1]))
    obj = {"state_dict": ldm_sd, "callbacks": _Payload(marker)}
    path = tmp_path / "evil.ckpt"
    if legacy:
        with open(path, "wb") as f:
            pickle.dump(obj, f, protocol=2)
    else:
        torch.save(obj, path)
    with pytest.raises(ModelError, match=r"(?s)contains Python code.*refused.*\.safetensors") as e:
        load_base_model(path)
    assert "evil.ckpt" in str(e.value)
    assert not marker.exists()


def _write(path, tensors, metadata=None):
    save_file({k: torch.zeros(v) for k, v in tensors.items()}, path, metadata=metadata)
    return path


@pytest.mark.parametrize(
    ("keys", "pattern"),
    [
        (
            {"conditioner.embedders.1.model.ln_final.weight": [4], "model.diffusion_model.out.0.weight": [4]},
            "SDXL",
        ),
        ({"cond_stage_model.model.ln_final.weight": [4], "model.diffusion_model.out.0.weight": [4]}, "SD2"),
        ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": [4, 4]}, "LoRA file, not a base"),
        ({"down_blocks.0.attentions.0.proj_in.weight": [4, 4]}, "not a Stable Diffusion checkpoint"),
        ({"model.diffusion_model.out.0.weight": [4]}, "no VAE"),
    ],
)
def test_wrong_kind_of_file(tmp_path, keys, pattern):
    path = _write(tmp_path / "x.safetensors", keys)
    with pytest.raises(ModelError, match=pattern) as e:
        load_base_model(path)
    assert "x.safetensors" in str(e.value)


def test_missing_empty_and_not_a_checkpoint(tmp_path):
    from PIL import Image

    with pytest.raises(ModelError, match="not found.*diffusers folder"):
        load_base_model(tmp_path / "nope.safetensors")
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(ModelError, match=r"empty\.safetensors.*empty"):
        load_base_model(tmp_path / "empty.safetensors")
    Image.new("RGB", (8, 8)).save(tmp_path / "img.png")
    os.replace(tmp_path / "img.png", tmp_path / "img.safetensors")
    with pytest.raises(ModelError, match=r"img\.safetensors.*PNG image"):
        load_base_model(tmp_path / "img.safetensors")
    (tmp_path / "junk.ckpt").write_bytes(b"PK\x03\x04" + b"\0" * 100)
    with pytest.raises(ModelError, match=r"junk\.ckpt.*not a readable PyTorch checkpoint"):
        load_base_model(tmp_path / "junk.ckpt")
    (tmp_path / "folder").mkdir()
    with pytest.raises(ModelError, match="without model_index.json"):
        load_base_model(tmp_path / "folder")


def test_truncated_safetensors(tiny_file, tmp_path):
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(tiny_file.read_bytes()[:5000])
    with pytest.raises(ModelError, match=r"cut\.safetensors.*not a readable"):
        load_base_model(cut)


def test_shape_mismatch_names_the_key(tiny_file, tmp_path):
    sd, metadata = read_state_dict(tiny_file)
    key = "model.diffusion_model.input_blocks.0.0.weight"
    sd[key] = torch.zeros(32, 9, 3, 3)  # an inpainting-style UNet input
    save_file(sd, tmp_path / "inpaint.safetensors", metadata=metadata)
    with pytest.raises(ModelError, match=rf"{key}.*\[32, 9, 3, 3\].*\[32, 4, 3, 3\]"):
        load_base_model(tmp_path / "inpaint.safetensors")
    # without its own arch the tiny file is checked against SD1.5 and fails on the first key
    save_file(read_state_dict(tiny_file)[0], tmp_path / "noarch.safetensors")
    with pytest.raises(ModelError, match="model.diffusion_model.*SD1.5 expects"):
        load_base_model(tmp_path / "noarch.safetensors")


def test_missing_and_unexpected_keys(tiny_file, tmp_path):
    sd, metadata = read_state_dict(tiny_file)
    gone = "first_stage_model.decoder.up.0.block.0.conv1.weight"
    save_file({k: v for k, v in sd.items() if k != gone}, tmp_path / "a.safetensors", metadata=metadata)
    with pytest.raises(ModelError, match=rf"{gone}.*missing"):
        load_base_model(tmp_path / "a.safetensors")
    extra = "model.diffusion_model.input_blocks.9.0.op.weight"
    save_file({**sd, extra: torch.zeros(1)}, tmp_path / "b.safetensors", metadata=metadata)
    with pytest.raises(ModelError, match=rf"unexpected key '{extra}'"):
        load_base_model(tmp_path / "b.safetensors")


def test_bad_arch_metadata(tiny_file, tmp_path):
    sd, _ = read_state_dict(tiny_file)
    save_file(sd, tmp_path / "bad.safetensors", metadata={"lorakit.arch": "{not json"})
    with pytest.raises(ModelError, match="lorakit.arch"):
        load_base_model(tmp_path / "bad.safetensors")


def test_tiny_models_are_deterministic_and_sd_shaped():

    a, b, c = (
        build_models(tiny_arch(), seed=3),
        build_models(tiny_arch(), seed=3),
        build_models(tiny_arch(), seed=4),
    )
    for x, y, z in zip(a, b, c):
        sx, sy, sz = x.state_dict(), y.state_dict(), z.state_dict()
        assert all(torch.equal(sx[k], sy[k]) for k in sx)
        assert not all(torch.equal(sx[k], sz[k]) for k in sx)
    unet, vae, te = a

    def forward():
        with torch.no_grad():
            latents = vae.encode(torch.randn(2, 3, 64, 64)).latent_dist.sample()
            ctx = te(torch.randint(0, 49408, (2, 77)))[0]
            out = unet(latents, torch.tensor([1, 999]), ctx).sample
            vae.decode(out)
        return latents, ctx

    latents, ctx = forward()
    assert latents.shape == (2, 4, 8, 8) and ctx.shape == (2, 77, 32)
