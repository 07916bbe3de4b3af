"""Drawing's speed paths keep its images: one pipeline per model, LoRAs merged where the weights live,
noise where A1111's RNG source draws it, SDPA, channels_last, torch.compile, batch 4, the benchmark.

CPU tests prove the paths on the tiny models; the CUDA ones (skipped without a GPU) check that the
sampling loop never waits for the GPU and that backups move to the CPU when asked."""

import importlib.util
import logging
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from lorakit.generate.params import GenerationParams, ParamError
from lorakit.generate.pipeline import Generator
from lorakit.generate.pnginfo import parse_parameters, read_png_parameters, save_png_with_parameters
from lorakit.testing import cpu_generator_with_random_lora
from lorakit.testing import write_random_lora as random_lora

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
ROOT = Path(__file__).resolve().parents[1]

# Images drawn by main before this work (commit 1b611fd) on the tiny SD1 and SDXL bases: 4x4 block means
# of image `pos` of batch_size 2, "a bear" / "blurry", 4 steps, 64x64, seed 11, CFG 7. (family,
# sampler, lora, pos) -> 48 numbers. A different noise (seed, device, batch) changes them by ~10.
MAIN_THUMBS = {
    ('sd1', 'Euler a', '', 0): "119.0 132.4 109.1 117.2 134.2 108.1 132.5 143.3 126.1 118.3 139.4 113.0 128.5 125.1 121.4 125.0 128.3 109.2 164.4 120.8 139.3 134.2 104.7 118.8 118.2 147.3 116.7 113.6 142.0 115.2 119.9 133.4 106.4 131.0 124.8 115.0 134.7 128.8 118.8 137.6 110.4 123.7 122.6 131.6 120.4 125.1 105.5 105.6",
    ('sd1', 'DPM++ SDE', '', 0): "118.7 132.3 108.2 122.1 132.0 110.8 122.5 141.4 120.8 119.3 142.9 114.4 122.6 129.9 118.1 117.4 141.5 108.4 159.1 116.2 135.9 132.3 108.8 117.4 131.4 125.8 119.0 130.1 123.9 122.8 130.6 115.6 115.5 126.7 137.3 120.0 134.3 138.0 111.6 134.6 120.5 121.7 118.3 137.2 120.2 123.8 108.7 104.2",
    ('sd1', 'DDIM', '', 0): "114.5 136.3 107.3 117.0 130.9 114.9 126.0 143.0 122.1 119.2 142.1 112.5 124.0 130.8 121.3 125.0 127.8 108.4 164.2 123.0 139.4 142.5 107.6 117.5 118.1 148.7 118.4 117.1 141.4 115.1 130.0 123.0 107.9 135.0 125.2 117.1 133.3 119.0 121.9 131.9 119.8 121.1 124.1 131.2 113.4 123.1 105.1 105.7",
    ('sd1', 'DPM++ 2M', '<lora:style:0.8>', 1): "111.4 144.4 118.2 138.3 131.2 118.8 126.9 156.4 124.5 134.9 109.4 118.8 136.2 117.0 120.2 138.4 110.1 114.5 124.2 141.2 119.0 126.4 115.9 108.8 142.6 106.1 115.6 126.0 140.2 120.9 140.4 105.6 113.6 110.1 129.0 109.9 123.5 142.5 116.9 132.2 121.8 125.8 115.8 156.0 116.9 119.7 124.3 111.5",
    ('sdxl', 'Euler a', '', 1): "148.2 119.0 146.9 148.9 124.8 147.6 147.3 132.4 138.7 118.1 140.4 157.6 132.9 124.2 150.9 179.9 123.3 175.9 163.3 118.8 150.5 117.4 157.6 133.9 137.6 136.7 163.6 116.5 141.0 179.3 125.8 103.2 174.9 136.2 102.5 178.5 151.2 134.4 138.8 127.0 142.4 156.1 146.5 127.2 147.5 151.8 123.6 151.9",
    ('sdxl', 'DPM++ SDE', '', 0): "121.4 137.8 148.1 134.9 112.2 159.8 145.7 125.4 166.6 143.5 127.8 159.9 137.8 118.7 139.1 131.5 132.7 166.2 144.5 135.9 145.2 162.2 136.4 143.1 140.9 124.3 134.2 145.8 143.6 148.8 150.5 125.6 172.5 157.2 109.3 185.7 129.5 137.9 164.3 115.7 113.7 169.2 135.6 138.6 128.8 154.6 139.4 141.7",
}  # fmt: skip
BASELINE = dict(negative_prompt="blurry", steps=4, width=64, height=64, seed=11, batch_size=2)


@pytest.fixture(scope="module")
def sd1(tiny_base, tmp_path_factory):
    return cpu_generator_with_random_lora(tiny_base, tmp_path_factory.mktemp("sd1_loras"), "style")


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl_base, tmp_path_factory):
    return cpu_generator_with_random_lora(tiny_sdxl_base, tmp_path_factory.mktemp("sdxl_loras"), "style")


def pixels(item) -> np.ndarray:
    return np.asarray(item.image, dtype=np.int16)


def thumb(item) -> np.ndarray:
    return np.asarray(item.image, dtype=np.float64).reshape(4, 16, 4, 16, 3).mean(axis=(1, 3)).reshape(-1)


def snapshot(*modules) -> list[torch.Tensor]:
    return [p.detach().clone() for m in modules for p in m.state_dict().values()]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


# --- noise where A1111 draws it ---------------------------------------------------------------------


def test_noise_device_follows_a1111s_rng_source():
    from lorakit.generate.kdiffusion import noise_device

    assert noise_device("cuda", "gpu") == torch.device("cuda")
    assert noise_device("cuda:1", "cpu") == torch.device("cpu")
    assert noise_device("mps", "gpu") == torch.device("cpu")  # A1111 always draws on the CPU for MPS
    assert noise_device("cpu", "gpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="nv"):
        noise_device("cpu", "nv")


def test_seeded_noise_is_one_generator_per_seed_for_either_source_on_cpu():
    from lorakit.generate.kdiffusion import SeededNoise

    seeds, shape = [5, 6, 7], (4, 8, 8)
    expected = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    for source in ("gpu", "cpu"):
        gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        rng = SeededNoise(seeds, shape, "cpu", source)
        for _ in range(2):  # the initial latent, then an ancestral step's noise
            want = torch.stack([torch.randn(shape, generator=g) for g in gens])
            assert torch.equal(rng.next(), want)
    alone = SeededNoise([6], shape, "cpu").next()  # seed 6 alone: the same noise as in the batch
    assert torch.equal(alone[0], torch.randn(shape, generator=expected[1]))


@pytest.mark.parametrize(
    "family, sampler, lora, pos",
    list(MAIN_THUMBS),
    ids=[f"{k[0]}-{k[1]}{k[2] and '-lora'}" for k in MAIN_THUMBS],
)
def test_cpu_images_are_mains_for_fixed_seeds(sd1, sdxl, family, sampler, lora, pos):
    gen = sd1 if family == "sd1" else sdxl
    items = gen.generate(GenerationParams(prompt=f"a bear {lora}".strip(), sampler=sampler, **BASELINE))
    want = np.array([float(v) for v in MAIN_THUMBS[family, sampler, lora, pos].split()])
    got = thumb(items[pos])
    assert np.abs(got - want).max() < 0.6, np.abs(got - want).max()
    gen.restore_base()


def test_cpu_and_gpu_sources_draw_the_same_images_on_a_cpu(sd1):
    for sampler in ("Euler a", "DPM++ SDE", "DDIM"):
        p = GenerationParams(prompt="a bear", sampler=sampler, **BASELINE)
        gpu = gen_pixels(sd1, p)
        p.rng = "cpu"
        assert all(np.array_equal(a, b) for a, b in zip(gpu, gen_pixels(sd1, p))), sampler


def gen_pixels(gen, p) -> list[np.ndarray]:
    return [pixels(i) for i in gen.generate(p)]


def test_rng_is_written_as_a1111_does_and_read_back(sd1, tmp_path, caplog):
    from lorakit.generate.txt2img import params_from_png

    default = sd1.generate(GenerationParams(prompt="a bear", steps=2, width=64, height=64, seed=1))[0]
    cpu = sd1.generate(GenerationParams(prompt="a bear", steps=2, width=64, height=64, seed=1, rng="cpu"))[0]
    assert "RNG" not in parse_parameters(default.infotext)[2]  # A1111 leaves its default GPU unsaid
    assert parse_parameters(cpu.infotext)[2]["RNG"] == "CPU"
    assert "RNG: CPU, Version: lorakit" in cpu.infotext
    for item, want in ((default, "gpu"), (cpu, "cpu")):
        path = save_png_with_parameters(item.image, tmp_path / f"{want}.png", item.infotext)
        assert params_from_png(path).rng == want
    nv = save_png_with_parameters(
        default.image, tmp_path / "nv.png", default.infotext.replace("Seed:", "RNG: NV, Seed:")
    )
    with caplog.at_level(logging.WARNING, logger="lorakit"):
        assert params_from_png(nv).rng == "gpu"
    assert "'NV'" in caplog.text and "another image" in caplog.text
    with pytest.raises(ParamError, match="RNG source"):
        GenerationParams(rng="nv").check()


def test_rng_option_on_the_command_line(tiny_base, tmp_path):
    from lorakit.cli import build_parser, main

    parser = build_parser()
    assert parser.parse_args(["generate", "--model", "m", "--prompt", "x", "--rng", "CPU"]).rng == "cpu"
    assert parser.parse_args(["generate", "--model", "m", "--prompt", "x"]).rng is None
    with pytest.raises(SystemExit):
        parser.parse_args(["generate", "--model", "m", "--prompt", "x", "--rng", "nv"])
    out = tmp_path / "out"
    rc = main(["generate", "--model", str(tiny_base), "--prompt", "bear", "--steps", "2", "--seed", "3",
               "--width", "64", "--height", "64", "--rng", "cpu", "--no-channels_last", "--outdir", str(out),
               "--lora_dir", str(tmp_path)])  # fmt: skip
    assert rc == 0
    (png,) = out.glob("*.png")
    assert parse_parameters(read_png_parameters(png))[2]["RNG"] == "CPU"


# --- one pipeline per model -------------------------------------------------------------------------


def test_one_pipeline_and_scheduler_per_sampler_reused_across_batches_and_calls(sd1):
    weights = [p.data_ptr() for p in sd1.unet.parameters()]
    unet = sd1.unet
    p = GenerationParams(prompt="a bear", steps=3, width=64, height=64, seed=4, sampler="DDIM", batch_count=2)
    first = gen_pixels(sd1, p)
    pipe = sd1._pipe
    assert pipe is not None and pipe.unet is sd1.unet and pipe.text_encoder is sd1.text_encoder
    ddim = pipe.scheduler
    gen_pixels(sd1, GenerationParams(**{**p.__dict__, "sampler": "UniPC"}))
    gen_pixels(sd1, GenerationParams(**{**p.__dict__, "sampler": "PLMS"}))
    again = gen_pixels(sd1, p)
    assert sd1._pipe is pipe and pipe.scheduler is ddim  # swapped back, never rebuilt
    assert {k[0] for k in sd1._schedulers} >= {"DDIM", "UniPC", "PLMS"}
    assert all(np.array_equal(a, b) for a, b in zip(first, again))  # a reused scheduler starts afresh
    assert sd1.unet is unet and [p.data_ptr() for p in sd1.unet.parameters()] == weights
    # a reused PLMS/UniPC scheduler draws what a fresh generator's does
    fresh = Generator.from_base(sd1.base, sd1.model_path, sd1.lora_dir)
    for sampler in ("UniPC", "PLMS"):
        q = GenerationParams(**{**p.__dict__, "sampler": sampler})
        assert all(np.array_equal(a, b) for a, b in zip(gen_pixels(sd1, q), gen_pixels(fresh, q))), sampler


def test_a_prompt_is_encoded_once_until_its_text_or_the_text_encoders_change(sd1, monkeypatch):
    calls = []
    original = sd1.family.encode_prompts

    def counting(*args):
        calls.append(args[1:3])
        return original(*args)

    monkeypatch.setattr(sd1.family, "encode_prompts", counting)
    p = GenerationParams(prompt="a brown bear", steps=2, width=64, height=64, seed=1, sampler="Euler")
    sd1.generate(p)
    sd1.generate(GenerationParams(**{**p.__dict__, "seed": 2, "sampler": "DDIM", "batch_count": 2}))
    assert calls == [("a brown bear", "")]  # another seed, sampler or batch: the same encoding
    plain = sd1._encoded[1]
    sd1.generate(GenerationParams(**{**p.__dict__, "prompt": "a brown bear <lora:style:1>"}))
    assert len(calls) == 2  # the text encoders' weights changed (merged): encoded anew
    assert not torch.equal(plain.context, sd1._encoded[1].context)
    sd1.generate(p)  # LoRA removed: their weights moved again, so it is encoded anew, as before the LoRA
    assert len(calls) == 3 and torch.equal(sd1._encoded[1].context, plain.context)
    sd1.generate(GenerationParams(**{**p.__dict__, "negative_prompt": "blurry"}))
    assert len(calls) == 4


# --- LoRA merge on the device -----------------------------------------------------------------------


def reference_merge(merger, loras) -> None:
    """The merge as main did it before this work (ΔW on the file's device, backups cloned beside)."""
    from lorakit.network.delta import bias_update, module_update
    from lorakit.network.targets import is_te_module

    backup = {}
    with torch.no_grad():
        for label, tensors, te_mult, unet_mult in loras:
            for name, m in merger.resolve(label, tensors).items():
                mult = te_mult if is_te_module(name) else unet_mult
                if mult == 0:
                    continue
                weight = merger.layer(name).weight
                backup.setdefault(name, weight.detach().clone())
                update = module_update(m, backup[name], mult)
                weight.copy_((weight.float() + update).to(weight.dtype))
                change = bias_update(m, mult)
                if change is not None:
                    bias = merger.layer(name).bias
                    bias.copy_((bias.float() + change.to(bias.device)).to(bias.dtype))


def test_merge_gives_bitwise_mains_weights_and_restores_bit_for_bit(sdxl, tmp_path):
    from lorakit.network.file import read_lora_file
    from lorakit.network.merge import LoraMerger

    base = sdxl.base
    models = (base.unet, *base.text_encoders)
    original = snapshot(*models)
    a = read_lora_file(random_lora(base, tmp_path / "a.safetensors", seed=3))[0]
    b = read_lora_file(random_lora(base, tmp_path / "b.safetensors", seed=4, scale=0.1))[0]
    loras = [("a", a, 0.7, 1.0), ("b", b, 1.0, -0.5)]
    reference_merge(LoraMerger.for_base(base), loras)
    want = snapshot(*models)
    for m, before in zip([p for mod in models for p in mod.state_dict().values()], original):
        m.copy_(before)
    for backup_device in ("auto", "device", "cpu"):
        merger = LoraMerger.for_base(base, backup_device=backup_device)
        merger.apply(loras)
        assert same(snapshot(*models), want), backup_device
        merger.restore()
        assert same(snapshot(*models), original), backup_device
    with pytest.raises(ValueError, match="backup_device"):
        LoraMerger.for_base(base, backup_device="gpu")


def fake_layer(device: str, nbytes: int):
    weight = types.SimpleNamespace(
        device=torch.device(device), numel=lambda: nbytes // 2, element_size=lambda: 2
    )
    return types.SimpleNamespace(weight=weight, bias=None)


def test_auto_backups_go_to_the_cpu_only_when_the_card_would_run_short(monkeypatch):
    from lorakit.network.merge import LoraMerger

    merger = LoraMerger.__new__(LoraMerger)
    merger.backup_device = "auto"
    layers = {"lora_unet_a": fake_layer("cuda:0", 3 * 2**30), "lora_te_b": fake_layer("cuda:0", 2**30)}
    merger.layer = layers.__getitem__
    checked = [("x", {"lora_unet_a": None, "lora_te_b": None}, 1.0, 1.0)]
    gib, card = 2**30, 24 * 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (free[0], card))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: cached[0] + 5 * gib)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 5 * gib)
    cached = [0]
    free = [14 * gib]  # 14 - 4 = 10 GiB left >= 20% of 24 GiB
    assert merger._backups_on_host(checked) is False
    free = [8 * gib]  # 4 GiB left < 4.8 GiB
    assert merger._backups_on_host(checked) is True
    cached = [2 * gib]  # unless torch's allocator holds 2 GiB it does not use (backups just restored)
    assert merger._backups_on_host(checked) is False
    cached = [0]
    checked = [("x", {"lora_unet_a": None, "lora_te_b": None}, 1.0, 0.0)]  # UNet multiplier 0: not backed up
    assert merger._backups_on_host(checked) is False
    merger.backup_device = "cpu"
    assert merger._backups_on_host(checked) is True
    layers["lora_unet_a"] = fake_layer("cpu", 2**40)  # a CPU model never moves its backups
    merger.backup_device = "auto"
    assert merger._backups_on_host([("x", {"lora_unet_a": None}, 1.0, 1.0)]) is False


# --- SDPA, channels_last, compile -------------------------------------------------------------------


def test_attention_runs_through_torch_sdpa(sd1, sdxl):
    from diffusers.models.attention_processor import AttnProcessor2_0

    for gen in (sd1, sdxl):
        processors = list(gen.unet.attn_processors.values()) + list(gen.vae.attn_processors.values())
        assert processors and all(isinstance(p, AttnProcessor2_0) for p in processors)


def test_channels_last_draws_the_same_image_and_merges_bit_exactly(tiny_base, tmp_path):
    plain = Generator.from_path(tiny_base, tmp_path, device="cpu")
    assert not plain.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)  # CPU default: off
    random_lora(plain.base, tmp_path / "style.safetensors", seed=1)
    nhwc = Generator.from_path(tiny_base, tmp_path, device="cpu", channels_last=True)
    assert nhwc.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    for prompt in ("a bear", "a bear <lora:style:0.8>"):
        p = GenerationParams(prompt=prompt, sampler="DPM++ 2M", **BASELINE)
        for a, b in zip(gen_pixels(plain, p), gen_pixels(nhwc, p)):
            assert np.abs(a - b).max() <= 2 and np.abs(a - b).mean() < 0.1
    plain.restore_base()
    nhwc.restore_base()
    assert same(snapshot(nhwc.unet), snapshot(plain.unet))  # restored bit for bit (values; NHWC strides)
    assert nhwc.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)  # kept through merges


def test_compiled_unet_draws_the_same_image_and_sees_merged_loras(tiny_base, tmp_path):
    """torch.compile with the "aot_eager" backend (inductor compiles C++ for minutes on a small CPU): the
    UNet is compiled in place, so LoRA names, merging and restoring are unchanged."""
    lora_dir = tmp_path / "Lora"
    lora_dir.mkdir()
    eager = Generator.from_path(tiny_base, lora_dir, device="cpu")
    random_lora(eager.base, lora_dir / "style.safetensors", seed=1)
    compiled = Generator.from_path(tiny_base, lora_dir, device="cpu", compile="aot_eager")
    assert compiled.compiled == "aot_eager"
    names = [n for n, _ in compiled.unet.named_parameters()]
    assert names == [n for n, _ in eager.unet.named_parameters()]
    p = GenerationParams(prompt="a bear", sampler="Euler", steps=3, width=64, height=64, seed=5)
    for prompt in ("a bear", "a bear <lora:style:1>", "a bear"):
        q = GenerationParams(**{**p.__dict__, "prompt": prompt})
        a, b = gen_pixels(eager, q)[0], gen_pixels(compiled, q)[0]
        assert np.abs(a - b).max() <= 1, prompt
    lora = gen_pixels(compiled, GenerationParams(**{**p.__dict__, "prompt": "a bear <lora:style:1>"}))[0]
    assert np.abs(lora - gen_pixels(compiled, p)[0]).mean() > 1  # the merged weights reach the compiled graph


def test_compile_mode_on_the_command_line_reaches_the_unet(tiny_base, tmp_path, monkeypatch):
    """`--compile_mode reduce-overhead` compiles (no --compile needed) in that mode; a wrong mode is
    refused by the parser."""
    from lorakit.cli import build_parser
    from lorakit.cli.draw import _generator

    calls = []
    monkeypatch.setattr(Generator, "optimize", lambda self, **k: calls.append(k) or self)
    parser = build_parser()
    base = [
        "generate",
        "--model",
        str(tiny_base),
        "--prompt",
        "x",
        "--device",
        "cpu",
        "--lora_dir",
        str(tmp_path),
    ]
    _generator(parser.parse_args([*base, "--compile_mode", "reduce-overhead"]))
    _generator(parser.parse_args([*base, "--compile"]))
    _generator(parser.parse_args(base))
    assert [(k["compile"], k["compile_mode"]) for k in calls] == [
        (True, "reduce-overhead"),
        (True, None),
        (False, None),
    ]
    with pytest.raises(SystemExit):
        parser.parse_args([*base, "--compile_mode", "fast"])


# --- batch 4 ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_batch_4_is_one_unet_call_per_step_with_a1111s_seeds(sd1, sdxl, family, tmp_path):
    from lorakit.generate.txt2img import run_txt2img

    gen = sd1 if family == "sd1" else sdxl
    rows = []
    hook = gen.unet.register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[0]))
    try:
        p = GenerationParams(prompt="a bear", negative_prompt="blurry", steps=3, width=64, height=64, seed=100,
                             sampler="Euler a", batch_size=4)  # fmt: skip
        items = run_txt2img(gen, p, tmp_path)
    finally:
        hook.remove()
    assert rows == [8] * 3  # cond + uncond of four images, one call per step
    assert [i.seed for i in items] == [100, 101, 102, 103]
    for pos, item in enumerate(items):
        kv = parse_parameters(read_png_parameters(item.path))[2]
        assert (kv["Seed"], kv["Batch size"], kv["Batch pos"]) == (str(100 + pos), "4", str(pos))
    alone = gen.generate(GenerationParams(**{**p.__dict__, "seed": 102, "batch_size": 1}))[0]
    assert np.abs(pixels(alone) - pixels(items[2])).max() <= 1  # seed 102 draws its image in any batch


# --- the benchmark ----------------------------------------------------------------------------------


def test_generate_speed_benchmark_runs_on_the_tiny_config(capsys):
    spec = importlib.util.spec_from_file_location("generate_speed", ROOT / "benchmarks" / "generate_speed.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.main(["--tiny", "--steps", "2", "--repeats", "1", "--families", "sd1", "sdxl"])
    out = capsys.readouterr().out
    assert {(r["family"], r["batch"], r["loras"]) for r in rows} == {
        (f, b, n) for f in ("sd1", "sdxl") for b in (1, 4) for n in (0, 2)
    }
    assert all(r["it_s"] > 0 and r["s_image"] > 0 for r in rows)
    assert "it/s" in out and "s/image" in out and "peak GiB" in out


# --- CUDA only --------------------------------------------------------------------------------------


class _ConvUNet(torch.nn.Module):
    """A UNet stand-in (one conv) with diffusers' call signature: the sampler loop alone is measured."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)

    @property
    def dtype(self):
        return self.conv.weight.dtype

    @property
    def device(self):
        return self.conv.weight.device

    def forward(self, x, t, encoder_hidden_states=None):
        return types.SimpleNamespace(sample=self.conv(x) * 0.1 + encoder_hidden_states.mean() * 0)


@cuda
@pytest.mark.parametrize("sampler", ["Euler a", "Euler", "DPM++ 2M"])
def test_k_sampler_loop_never_waits_for_the_gpu(sampler):
    from lorakit.generate.samplers import k_sample

    unet = _ConvUNet().cuda().half()
    cond, uncond = torch.randn(1, 77, 8, device="cuda"), torch.randn(1, 77, 8, device="cuda")
    p = GenerationParams(steps=6, sampler=sampler, width=64, height=64)
    done = []
    k_sample(unet, cond, uncond, [1, 2], (4, 8, 8), p)  # warm-up: CUDA kernels loaded
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        x = k_sample(unet, cond, uncond, [1, 2], (4, 8, 8), p, on_step=lambda d, t: done.append(d))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert x.is_cuda and done == list(range(1, 7))


@cuda
def test_gpu_source_draws_on_the_gpu_as_a1111(tmp_path):
    from lorakit.generate.kdiffusion import BrownianNoise, SeededNoise

    seeds, shape = [5, 6], (4, 8, 8)
    gpu = SeededNoise(seeds, shape, "cuda", "gpu").next()
    want = torch.stack(
        [torch.randn(shape, device="cuda", generator=torch.Generator("cuda").manual_seed(s)) for s in seeds]
    )
    assert torch.equal(gpu, want)
    cpu = SeededNoise(seeds, shape, "cuda", "cpu").next()
    assert cpu.is_cuda and torch.equal(cpu.cpu(), SeededNoise(seeds, shape, "cpu").next())
    sigmas = torch.tensor([14.6, 3.0, 0.5, 0.0])
    on_gpu = BrownianNoise(seeds, shape, sigmas, "cuda", "gpu")
    on_cpu = BrownianNoise(seeds, shape, sigmas, "cuda", "cpu")
    assert on_gpu.source.type == "cuda" and on_cpu.source.type == "cpu"
    w_gpu, w_cpu = on_gpu(sigmas[0], sigmas[1]), on_cpu(sigmas[0], sigmas[1])
    assert w_gpu.is_cuda and w_cpu.is_cuda and not torch.equal(w_gpu, w_cpu)  # the source decides the noise


@cuda
def test_merge_on_the_gpu_with_cpu_backups_restores_bit_for_bit(tiny_base, tmp_path):
    from lorakit.network.file import read_lora_file
    from lorakit.network.merge import LoraMerger

    gen = Generator.from_path(tiny_base, tmp_path, device="cuda")
    tensors = read_lora_file(random_lora(gen.base, tmp_path / "a.safetensors", seed=3))[0]
    original = snapshot(gen.unet, gen.text_encoder)
    merged = {}
    for backup_device in ("device", "cpu"):
        merger = LoraMerger.for_base(gen.base, backup_device=backup_device)
        merger.apply([("a", tensors, 1.0, 1.0)])
        assert {b.device.type for b in merger.backup.values()} == {
            "cuda" if backup_device == "device" else "cpu"
        }
        merged[backup_device] = snapshot(gen.unet, gen.text_encoder)
        merger.restore()
        assert same(snapshot(gen.unet, gen.text_encoder), original)
    assert same(merged["device"], merged["cpu"])
    reference_merge(LoraMerger.for_base(gen.base), [("a", {k: v for k, v in tensors.items()}, 1.0, 1.0)])
    for a, b in zip(snapshot(gen.unet, gen.text_encoder), merged["device"]):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-3, atol=1e-3)  # GPU vs CPU ΔW: rounding only
