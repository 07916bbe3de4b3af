"""Drawing with LoRAs as A1111 users do: multipliers, unloading, refusals, PNG info, reg images,
samples while training, inspect."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from lorakit.errors import ConfigError, ModelError
from lorakit.generate.params import GenerationParams
from lorakit.generate.pipeline import Generator
from lorakit.generate.pnginfo import parse_parameters, read_png_parameters

SMALL = dict(steps=4, width=64, height=64, seed=11, sampler="Euler a")


@pytest.fixture
def lora_dir(tmp_path, trained_lora):
    d = tmp_path / "models" / "Lora" / "characters"
    d.mkdir(parents=True)
    shutil.copy(trained_lora, d / "kurokuma.safetensors")
    return tmp_path / "models" / "Lora"


@pytest.fixture
def gen(tiny_base, lora_dir):
    return Generator.from_path(tiny_base, lora_dir, device="cpu")


def pixels(item):
    return np.asarray(item.image, dtype=np.int16)


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before, module):
    return {k for k, v in module.state_dict().items() if not torch.equal(before[k], v)}


def test_weight_zero_draws_the_same_image_as_no_lora(gen):
    plain = gen.generate(GenerationParams(prompt="usu bear", **SMALL))[0]
    zero = gen.generate(GenerationParams(prompt="usu bear <lora:kurokuma:0>", **SMALL))[0]
    full = gen.generate(GenerationParams(prompt="usu bear <lora:kurokuma:1>", **SMALL))[0]
    assert np.array_equal(pixels(plain), pixels(zero))
    assert np.abs(pixels(full) - pixels(plain)).mean() > 1.0  # the LoRA does change the drawing


def test_weight_delta_is_linear_and_unloading_restores_the_base_bit_for_bit(gen):
    base_unet = snapshot(gen.unet)
    base_te = snapshot(gen.text_encoder)
    gen.apply_loras("x <lora:kurokuma:0.5>")
    half = {k: v - base_unet[k] for k, v in snapshot(gen.unet).items()}
    gen.apply_loras("x <lora:kurokuma:1.0>")
    full = {k: v - base_unet[k] for k, v in snapshot(gen.unet).items()}
    moved = [k for k in full if full[k].abs().max() > 0]
    assert moved
    for k in moved:
        torch.testing.assert_close(half[k], 0.5 * full[k], rtol=1e-4, atol=1e-7, msg=k)
    gen.apply_loras("x")  # a prompt without the tag: the LoRA is gone
    assert not changed(base_unet, gen.unet) and not changed(base_te, gen.text_encoder)


def test_te_and_unet_multipliers_touch_only_their_part(gen):
    base_unet, base_te = snapshot(gen.unet), snapshot(gen.text_encoder)
    gen.apply_loras("x <lora:kurokuma:0:1>")
    assert changed(base_unet, gen.unet) and not changed(base_te, gen.text_encoder)
    gen.apply_loras("x <lora:kurokuma:te=1:unet=0>")
    assert not changed(base_unet, gen.unet) and changed(base_te, gen.text_encoder)
    gen.restore_base()
    assert not changed(base_unet, gen.unet) and not changed(base_te, gen.text_encoder)


def test_two_loras_add_up(gen, lora_dir, trained_lora):
    shutil.copy(trained_lora, lora_dir / "second.safetensors")
    base = snapshot(gen.unet)
    gen.apply_loras("<lora:kurokuma:0.3>")
    a = {k: v - base[k] for k, v in snapshot(gen.unet).items()}
    gen.apply_loras("<lora:kurokuma:0.3> <lora:second:0.4>")
    both = {k: v - base[k] for k, v in snapshot(gen.unet).items()}
    for k in a:
        torch.testing.assert_close(both[k], a[k] * (0.7 / 0.3), rtol=1e-4, atol=1e-7)


def test_lora_list_skips_training_state_folders(lora_dir, trained_lora):
    from lorakit.generate.loras import list_loras

    state = lora_dir / "kurokuma-state"
    state.mkdir()
    shutil.copy(trained_lora, state / "network.safetensors")
    (state / "train_state.json").write_text("{}")
    assert [lf.name for lf in list_loras(lora_dir)] == ["kurokuma"]


def test_lora_by_alias_and_unknown_name(gen):
    base = snapshot(gen.unet)
    gen.apply_loras("x <lora:kurokuma:1>")
    by_file = {k: v - base[k] for k, v in snapshot(gen.unet).items()}
    gen.apply_loras("x <lora:compat:1>")  # ss_output_name of the trained file is "compat"
    by_alias = {k: v - base[k] for k, v in snapshot(gen.unet).items()}
    assert any(d.abs().max() > 0 for d in by_alias.values())
    assert all(torch.equal(by_alias[k], by_file[k]) for k in base)  # the same file, found by its alias
    with pytest.raises(ModelError, match=r"'kurokumaa' not found.*kurokuma"):
        gen.apply_loras("x <lora:kurokumaa:1>")


def test_sdxl_lora_is_refused_and_nothing_is_applied(gen, lora_dir):
    from safetensors.torch import save_file

    name = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    save_file(
        {
            f"{name}.lora_down.weight": torch.zeros(4, 640),
            f"{name}.lora_up.weight": torch.zeros(640, 4),
            f"{name}.alpha": torch.tensor(4.0),
        },
        str(lora_dir / "xl_style.safetensors"),
    )
    base = snapshot(gen.unet)
    with pytest.raises(ModelError, match="another architecture"):
        gen.apply_loras("x <lora:kurokuma:1> <lora:xl_style:1>")
    assert not changed(base, gen.unet)


def test_png_info_round_trip_and_from_png_redraws_the_image(tiny_base, lora_dir, tmp_path, capsys):
    from lorakit.cli import main

    out = tmp_path / "outputs"
    args = ["generate", "--model", str(tiny_base), "--lora_dir", str(lora_dir), "--outdir", str(out)]
    prompt = "usu bear, (in a forest:1.2) <lora:kurokuma:0.8>"
    rc = main(args + ["--prompt", prompt, "--negative_prompt", "blurry, lowres", "--steps", "5", "--width", "64",
                      "--height", "64", "--seed", "1234", "--sampler", "DPM++ 2M Karras", "--cfg_scale", "6.5"])  # fmt: skip
    assert rc == 0
    first = out / "00000-1234.png"
    text = read_png_parameters(first)
    p, neg, kv = parse_parameters(text)
    assert p == prompt and neg == "blurry, lowres"
    assert kv["Steps"] == "5" and kv["Sampler"] == "DPM++ 2M" and kv["Schedule type"] == "Karras"
    assert kv["CFG scale"] == "6.5" and kv["Seed"] == "1234" and kv["Size"] == "64x64"
    assert kv["Model"] == "tiny-sd1" and len(kv["Model hash"]) == 10
    assert kv["Lora hashes"].startswith("kurokuma: ") and len(kv["Lora hashes"].split(": ")[1]) == 12
    assert main(args + ["--from_png", str(first)]) == 0
    again = out / "00001-1234.png"
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(again)))
    assert read_png_parameters(again) == text


@pytest.mark.parametrize(
    "sampler, schedule",
    [
        ("Euler a", None),
        ("Euler", None),
        ("DPM++ 2M", "Karras"),  # A1111 >= 1.9: "Automatic" is the sampler's default, and says so
        ("DPM++ 2M Karras", "Karras"),
        ("DPM++ SDE Karras", "Karras"),
        ("DDIM", None),
        ("Heun", None),
        ("LMS", None),
        ("UniPC", None),
    ],
)
def test_a1111_samplers_draw_and_are_named_in_png_info(gen, sampler, schedule):
    item = gen.generate(GenerationParams(prompt="bear", **{**SMALL, "sampler": sampler, "steps": 3}))[0]
    assert item.image.size == (64, 64) and np.asarray(item.image).std() > 0
    kv = parse_parameters(item.infotext)[2]
    assert kv["Sampler"] == sampler.removesuffix(" Karras") and kv.get("Schedule type") == schedule


def test_batches_use_consecutive_seeds(gen):
    batch = gen.generate(
        GenerationParams(prompt="bear", batch_size=2, batch_count=2, **{**SMALL, "seed": 100})
    )
    assert [b.seed for b in batch] == [100, 101, 102, 103]
    single = gen.generate(GenerationParams(prompt="bear", **{**SMALL, "seed": 102}))[0]
    assert (
        np.abs(pixels(single) - pixels(batch[2])).max() <= 2
    )  # same noise; batched kernels round differently


def test_reg_images_count_names_and_resume(gen, tmp_path):
    from lorakit.generate.reg_images import class_prompt_from_folder, make_reg_images

    assert class_prompt_from_folder(tmp_path / "train" / "20_usu bear") == "bear"
    params = GenerationParams(**{**SMALL, "seed": 7})
    paths = make_reg_images(gen, "bear", 4, tmp_path / "reg", params)
    assert [p.name for p in paths] == [f"bear_{i:05d}.png" for i in range(4)]
    assert paths[0].parent == tmp_path / "reg" / "1_bear"
    assert parse_parameters(read_png_parameters(paths[2]))[2]["Seed"] == "9"
    originals = [np.asarray(Image.open(p)) for p in paths]
    mtime0 = paths[0].stat().st_mtime_ns
    paths[1].unlink()
    paths[3].write_bytes(b"broken")
    again = make_reg_images(gen, "bear", 5, tmp_path / "reg", params)
    assert len(again) == 5 and all(p.is_file() for p in again)
    assert paths[0].stat().st_mtime_ns == mtime0  # kept, not redrawn
    for i in (1, 3):
        assert np.array_equal(np.asarray(Image.open(again[i])), originals[i])  # the same seed series


def test_reg_images_seed_series_must_stay_in_the_seed_range(gen, tmp_path):
    from lorakit.generate.reg_images import make_reg_images

    params = GenerationParams(**{**SMALL, "seed": 2**32 - 2})
    with pytest.raises(
        ConfigError, match=r"seed 4294967294 with --count 3: the last image's seed 4294967296"
    ):
        make_reg_images(gen, "bear", 3, tmp_path / "reg", params)
    assert not (tmp_path / "reg").exists()  # refused before anything was drawn


def test_samples_appear_at_the_right_epochs(train_config, tmp_path):
    from lorakit.train.trainer import train

    prompts = tmp_path / "prompts.txt"
    prompts.write_text(
        "# a comment\nusu bear --n blurry --s 3 --d 5\nbear --ss euler_a --s 2 --w 64 --h 64 --l 5\n"
    )
    cfg = train_config(
        sample_prompts=str(prompts), sample_every_n_epochs=2, sample_at_first=True, max_train_epochs=4
    )
    train(cfg)
    names = sorted(p.name for p in (tmp_path / "out" / "sample").glob("*.png"))
    tags = sorted({n.split("_")[1] for n in names})
    assert tags == ["e000000", "e000002", "e000004"]
    assert len(names) == 6
    first = next(p for p in (tmp_path / "out" / "sample").glob("tiny_e000002_00_*.png"))
    p, neg, kv = parse_parameters(read_png_parameters(first))
    assert (p, neg, kv["Steps"], kv["Seed"], kv["Sampler"]) == ("usu bear", "blurry", "3", "5", "DDIM")


def test_samples_every_n_steps(train_config, tmp_path):
    from lorakit.train.trainer import train

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("bear --s 2\n")
    train(train_config(sample_prompts=str(prompts), sample_every_n_steps=2, max_train_steps=5))
    tags = sorted(p.name.split("_")[1] for p in (tmp_path / "out" / "sample").glob("*.png"))
    assert tags == ["000002", "000004"]


def test_inspect_table_and_json(trained_lora, capsys):
    from lorakit.cli import main

    assert main(["inspect", str(trained_lora), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["architecture"] == "SD1.x/SD2.x"
    assert info["modules"]["text_encoder"] == 12 and info["modules"]["conv3x3_locon"] > 0
    assert {(d["dim"], d["alpha"]) for d in info["dim_alpha"]} == {(4, 2.0), (2, 1.0)}
    assert info["training"]["steps"] == "6" and info["training"]["seed"] == "3"
    assert info["tag_frequency"] == {"2_usu bear": [["usu bear", 4]]}
    assert main(["inspect", str(trained_lora)]) == 0
    table = capsys.readouterr().out
    assert "dim / alpha                4 / 2" in table and "tag frequency" in table
