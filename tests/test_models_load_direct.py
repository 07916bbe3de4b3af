"""Loading straight into the compute dtype on the device (issue 12.4): every format gives models
already in the asked dtype (the VAE in its own), equal to the old path (float32 on the CPU, then a
cast) bitwise; keys outside the model are never read; the LoRA's init does not depend on it."""

from __future__ import annotations

import json

import pytest
import torch

from lorakit.models import ldm_layout
from lorakit.models.checkpoint import read_tensors
from lorakit.models.families import sgm_layout
from lorakit.models.families.sdxl import save_sgm_checkpoint
from lorakit.models.loader import load_base_model, part_dtypes, save_ldm_checkpoint
from lorakit.models.tiny import build_models, build_sdxl_models, tiny_arch, tiny_sdxl_arch


@pytest.fixture(scope="module")
def sd1_files(tmp_path_factory):
    """The tiny SD1 model as an fp16 .safetensors, an fp32 .ckpt with EMA keys, and a diffusers folder."""
    arch = tiny_arch()
    models = build_models(arch, seed=0)
    folder = tmp_path_factory.mktemp("sd1")
    st = save_ldm_checkpoint(folder / "half.safetensors", *models, arch=arch, dtype=torch.float16)
    ldm_sd = ldm_layout.to_ldm_state_dict(*(m.state_dict() for m in models))
    ema = {"model_ema.decay": torch.tensor(0.999), "model_ema.diffusion_modelconv_in": torch.ones(3)}
    ckpt = folder / "full.ckpt"
    torch.save({"state_dict": {**ldm_sd, **ema}, "lorakit.arch": json.dumps(arch)}, ckpt)
    diffusers = folder / "diffusers"
    for name, model in zip(("unet", "vae", "text_encoder"), models):
        model.save_pretrained(diffusers / name)
    (diffusers / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return {"safetensors": st, "ckpt": ckpt, "diffusers": diffusers}


def _parts(base):
    return (base.unet, base.vae, *base.text_encoders)


def _old_path(path, dtype, vae_dtype):
    """What the trainer did before: float32 on the CPU, then each model cast."""
    base = load_base_model(path)
    for m in _parts(base):
        torch.nn.Module.to(m, dtype=vae_dtype if m is base.vae else dtype)
    return base


@pytest.mark.parametrize("kind", ["safetensors", "ckpt", "diffusers"])
@pytest.mark.parametrize(
    "dtype, vae_dtype",
    [(torch.float32, torch.float32), (torch.float16, torch.float32), (torch.bfloat16, torch.bfloat16)],
)
def test_sd1_arrives_in_the_asked_dtypes_equal_to_the_old_path(sd1_files, kind, dtype, vae_dtype):
    path = sd1_files[kind]
    base = load_base_model(path, dtype=dtype, device="cpu", vae_dtype=vae_dtype)
    old = _old_path(path, dtype, vae_dtype)
    for got, want in zip(_parts(base), _parts(old)):
        part_dtype = vae_dtype if got is base.vae else dtype
        floats = [t for t in (*got.parameters(), *got.buffers()) if t.is_floating_point()]
        assert {t.dtype for t in floats} == {part_dtype}, type(got).__name__
        assert {t.device.type for t in (*got.parameters(), *got.buffers())} == {"cpu"}
        a, b = got.state_dict(), want.state_dict()
        assert set(a) == set(b)
        for k in a:  # the single cast from the file's dtype gives the same bits as fp32-then-cast
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_fp32_target_equals_the_file_bitwise_and_fp16_within_its_rounding(sd1_files):
    models = build_models(tiny_arch(), seed=0)
    full = load_base_model(sd1_files["ckpt"], dtype=torch.float32)
    half = load_base_model(sd1_files["ckpt"], dtype=torch.float16)
    for want, got32, got16 in zip(models, _parts(full), _parts(half)):
        for k, v in want.state_dict().items():
            assert torch.equal(got32.state_dict()[k], v), k
            if v.is_floating_point():
                assert torch.allclose(got16.state_dict()[k].float(), v, rtol=2**-10, atol=2**-24), k


def test_sdxl_single_file_and_ckpt_in_the_asked_dtypes(tmp_path):
    arch = tiny_sdxl_arch()
    models = build_sdxl_models(arch, seed=1)
    st = save_sgm_checkpoint(tmp_path / "xl.safetensors", *models, arch=arch, markers=("v_pred",))
    sd = sgm_layout.to_sgm_state_dict(*(m.state_dict() for m in models))
    ckpt = tmp_path / "xl.ckpt"
    torch.save({"state_dict": sd, "lorakit.arch": json.dumps(arch)}, ckpt)
    for path in (st, ckpt):
        base = load_base_model(path, dtype=torch.bfloat16, device="cpu", vae_dtype=torch.float32)
        assert base.spec.key == "sdxl"
        assert base.family.v_pred == (path == st)  # the marker is still seen
        old = _old_path(path, torch.bfloat16, torch.float32)
        for got, want in zip(_parts(base), _parts(old)):
            a, b = got.state_dict(), want.state_dict()
            assert {v.dtype for v in got.parameters()} == {
                torch.float32 if got is base.vae else torch.bfloat16
            }
            for k in a:
                assert torch.equal(a[k], b[k]), k


def test_read_tensors_reads_only_the_model_in_each_parts_dtype(sd1_files):
    dtype_of = part_dtypes(ldm_layout.PREFIXES, torch.bfloat16, torch.float32, ldm_layout.VAE_PREFIX)
    sd = read_tensors(sd1_files["ckpt"], dtype_of)
    assert not any(k.startswith("model_ema.") for k in sd)  # EMA copies are never read
    assert all(k.startswith(ldm_layout.PREFIXES) for k in sd)
    dtypes = {k.startswith(ldm_layout.VAE_PREFIX): v.dtype for k, v in sd.items() if v.is_floating_point()}
    assert dtypes == {True: torch.float32, False: torch.bfloat16}


def test_the_lora_init_does_not_depend_on_the_bases_dtype(sd1_files):
    """peft would round a new adapter to its base layer's dtype: the trainer's base now arrives in
    bf16, and the LoRA's kaiming init must still be the fp32 one (as kohya's)."""
    from lorakit.network.lora import LoRANetwork

    inits = []
    for dtype in (torch.float32, torch.bfloat16):
        base = load_base_model(sd1_files["safetensors"], dtype=dtype)
        torch.manual_seed(5)
        net = LoRANetwork(base.unet, base.text_encoder, dim=4, alpha=4)
        assert {p.dtype for p in net.parameters()} == {torch.float32}
        inits.append([p.detach().clone() for p in net.parameters()])
    assert len(inits[0]) > 4
    assert all(torch.equal(a, b) for a, b in zip(*inits))
    assert any(a.abs().sum() > 0 and a.float().bfloat16().float().ne(a).any() for a in inits[1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_the_weights_arrive_on_the_gpu(sd1_files):
    base = load_base_model(sd1_files["safetensors"], torch.float16, "cuda", vae_dtype=torch.float32)
    for m in _parts(base):
        assert {t.device.type for t in (*m.parameters(), *m.buffers())} == {"cuda"}
    assert base.vae.dtype == torch.float32 and base.unet.dtype == torch.float16
    old = _old_path(sd1_files["safetensors"], torch.float16, torch.float32)
    for got, want in zip(_parts(base), _parts(old)):
        for k, v in want.state_dict().items():
            assert torch.equal(got.state_dict()[k].cpu(), v), k


def test_read_tensors_reads_safetensors_as_the_library_does(tmp_path):
    from safetensors.torch import load_file, save_file

    from lorakit.errors import ModelError

    tensors = {
        "a.f16": torch.randn(3, 5).half(),
        "a.bf16": torch.randn(7).bfloat16(),
        "a.f32": torch.randn(2, 2, 1, 1),
        "a.i64": torch.arange(77)[None],
        "a.bool": torch.tensor([True, False]),
        "a.empty": torch.tensor([]),
        "skipped": torch.ones(4),
    }
    path = tmp_path / "mixed.safetensors"
    save_file(tensors, path, metadata={"x": "y"})
    got = read_tensors(path, lambda k: None if k == "skipped" else torch.float32)
    want = load_file(path)
    assert set(got) == set(tensors) - {"skipped"}
    for k, v in got.items():
        expected = want[k].float() if want[k].is_floating_point() else want[k]
        assert v.dtype == expected.dtype and torch.equal(v, expected), k
    path.write_bytes(path.read_bytes()[:-8])  # the last tensor cut short
    with pytest.raises(ModelError, match="not a readable .safetensors"):
        read_tensors(path, lambda k: torch.float32)
