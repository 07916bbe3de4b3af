"""SDXL training end to end on the tiny SDXL base: learning, exact resume, the text-encoder cache (in
memory and on disk), two text-encoder rates, metadata, LoCon, checkpointing, Adafactor, buckets, the
separate VAE and the fp16 VAE guard."""

import hashlib
import logging
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lorakit.errors import ConfigError, DatasetError, ModelError, TrainingError
from lorakit.models.defaults import apply_model_defaults
from lorakit.train.trainer import build_trainer, train


def tensors(path):
    return load_file(str(path))


def metadata(path):
    with safe_open(str(path), "pt") as f:
        return f.metadata()


def module_names(sd) -> set[str]:
    return {k.split(".", 1)[0] for k in sd}


# --- 1. learning ----------------------------------------------------------------------------------
def test_sdxl_training_lowers_the_loss_on_its_own_data(sdxl_config):
    # LoCon: the tiny SDXL UNet (like SDXL) has attention only below full resolution, so attention-only
    # LoRA moves the loss by ~8% in 30 steps; with its 3x3 convs the drop is ~60% and the test robust
    cfg = sdxl_config(
        max_train_steps=30, learning_rate=3e-3, cache_latents=True, network_dim=8, network_alpha=8,
        conv_dim=4, conv_alpha=4,
    )  # fmt: skip
    tr = build_trainer(cfg)
    before = tr.mean_loss()
    tr.run()
    after = tr.mean_loss()
    tr.network.set_multiplier(0.0)  # the same network switched off is the base model again
    assert tr.mean_loss() == pytest.approx(before, rel=1e-4)
    assert after < 0.9 * before, (before, after)


# --- 2. exact resume ------------------------------------------------------------------------------
def test_sdxl_resume_mid_epoch_is_exact(sdxl_config, tmp_path):
    """Stop at step 3 (as Ctrl-C does), resume from the saved state: the same LoRA as one run."""
    common = dict(
        max_train_steps=6, reg_data_dir=None, save_state=True, save_precision="float", flip_aug=True,
        text_encoder_lr=[1e-3, 5e-4],
    )  # fmt: skip
    full = train(sdxl_config(output_dir=str(tmp_path / "full"), **common))

    def stop_at_3(p):
        if p.step == 3:
            raise KeyboardInterrupt

    cfg = sdxl_config(output_dir=str(tmp_path / "split"), progress_every_n_steps=1, **common)
    with pytest.raises(KeyboardInterrupt):
        build_trainer(cfg).run(stop_at_3)
    state = tmp_path / "split" / "xl-state"
    assert (state / "train_state.json").is_file()
    resumed = train(sdxl_config(output_dir=str(tmp_path / "split"), resume=str(state), **common))
    tf, tr = tensors(full), tensors(resumed)
    assert tf.keys() == tr.keys()
    assert {n.split("_")[1] for n in module_names(tf)} == {"unet", "te1", "te2"}
    assert all(tf[k].abs().max() > 0 for k in tf if k.endswith("lora_up.weight") and "te1_" not in k)
    for k in tf:
        assert torch.equal(tr[k], tf[k]), k


# --- 3. text-encoder outputs cached in memory -------------------------------------------------------
def test_sdxl_text_encoder_cache_trains_like_the_plain_run(sdxl_config, tmp_path):
    common = dict(network_train_unet_only=True, max_train_steps=3, save_precision="float")
    losses = {}

    def run(name, **opts):
        seen = []
        tr = build_trainer(
            sdxl_config(output_dir=str(tmp_path / name), progress_every_n_steps=1, **common, **opts)
        )
        path = tr.run(lambda p: seen.append(p.loss))
        losses[name] = seen
        return tr, tensors(path)

    _, plain = run("plain")
    tr, cached = run("cached", cache_text_encoder_outputs=True)
    assert tr.te_cache and all(c.pooled is not None for c in tr.te_cache.values())
    assert cached.keys() == plain.keys()
    assert all(k.startswith("lora_unet_") for k in plain)
    assert all(v.abs().max() > 0 for k, v in plain.items() if k.endswith("lora_up.weight"))
    assert losses["cached"] == pytest.approx(losses["plain"], rel=1e-5)
    # the frozen encoders' outputs, cached once or computed each step, are the same up to float noise
    # (a caption encoded alone or in a batch: ~1e-7), which Adam's normalised steps can raise to a few
    # hundredths of one step (lr 1e-3) on near-zero gradient components
    for k in plain:
        torch.testing.assert_close(cached[k], plain[k], rtol=1e-4, atol=5e-5, msg=k)


# --- 3b. text-encoder outputs cached on disk ---------------------------------------------------------
def count_encodes(monkeypatch, family_cls) -> list[int]:
    """Spy on the family's encode: the list grows by one per call."""
    calls, real = [], family_cls.encode

    def spy(self, *args, **kwargs):
        calls.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(family_cls, "encode", spy)
    return calls


@pytest.mark.parametrize("family", ["sdxl", "sd1"])
def test_text_encoder_outputs_on_disk_are_written_then_read_instead_of_encoding(
    family, sdxl_config, train_config, tiny_data, tmp_path, monkeypatch
):
    from lorakit.models.families.sd1 import SD1Family
    from lorakit.models.families.sdxl import SDXLFamily

    make, family_cls = (sdxl_config, SDXLFamily) if family == "sdxl" else (train_config, SD1Family)
    common = dict(
        cache_text_encoder_outputs_to_disk=True, network_train_unet_only=True, max_train_steps=2,
        save_precision="float",
    )  # fmt: skip
    images = sorted((tiny_data[0] / "2_usu bear").glob("*.png"))
    files = [i.with_name(f"{i.stem}_lorakit_te.npz") for i in images]

    calls = count_encodes(monkeypatch, family_cls)
    cfg = make(output_dir=str(tmp_path / "first"), **common)
    first = build_trainer(cfg)
    assert cfg.dataset.cache_text_encoder_outputs  # implied, as in kohya
    assert len(calls) == 1  # one caption ("usu bear") for 4 images
    assert all(f.is_file() for f in files)
    with np.load(files[0]) as z:
        assert ("pooled" in z) == (family == "sdxl")  # SD1 has no pooled vector
        cached = first.te_cache["usu bear"]
        np.testing.assert_array_equal(z["context"], cached.context.float().numpy())
    first_lora = tensors(first.run())
    stamps = [f.stat().st_mtime_ns for f in files]

    calls.clear()
    second = build_trainer(make(output_dir=str(tmp_path / "second"), **common))
    assert calls == []  # read from disk, the encoders never ran
    second_lora = tensors(second.run())
    assert [f.stat().st_mtime_ns for f in files] == stamps  # not rewritten
    for k in first_lora:
        assert torch.equal(second_lora[k], first_lora[k]), k

    # a changed caption re-encodes that image only; a changed token length, every image
    images[0].with_suffix(".caption").write_text("usu bear, red")
    build_trainer(make(output_dir=str(tmp_path / "third"), **common))
    assert len(calls) == 1 and files[0].stat().st_mtime_ns != stamps[0]
    assert [f.stat().st_mtime_ns for f in files[1:]] == stamps[1:]
    calls.clear()
    build_trainer(make(output_dir=str(tmp_path / "fourth"), max_token_length=150, **common))
    assert len(calls) == 2 and all(f.stat().st_mtime_ns not in stamps for f in files)


def test_text_encoder_cache_key_covers_caption_length_clip_skip_and_weights():
    from lorakit.dataset.te_cache import te_cache_key, text_encoders_fingerprint
    from lorakit.models.tiny import build_sdxl_models

    _, _, te1, te2 = build_sdxl_models()
    fingerprint = text_encoders_fingerprint([te1, te2])
    base = te_cache_key("usu bear", None, None, fingerprint)
    assert base == te_cache_key("usu bear", None, None, text_encoders_fingerprint([te1, te2]))
    with torch.no_grad():
        te2.text_model.encoder.layers[1].mlp.fc2.weight[0, 0] += 1e-3
    changed = {
        te_cache_key("usu bear, red", None, None, fingerprint),
        te_cache_key("usu bear", 150, None, fingerprint),
        te_cache_key("usu bear", None, 2, fingerprint),
        te_cache_key("usu bear", None, None, text_encoders_fingerprint([te1, te2])),
    }
    assert base not in changed and len(changed) == 4


def test_text_encoder_disk_cache_in_a_read_only_folder_says_what_to_do(sdxl_config, monkeypatch):
    import lorakit.dataset.cache as cache

    def read_only(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(cache, "atomic_file", read_only)  # both caches write through cache.write_npz
    with pytest.raises(
        DatasetError,
        match=r"text-encoder cache beside .*2_usu bear.*writable.*"
        r"cache_text_encoder_outputs_to_disk",
    ):
        build_trainer(sdxl_config(cache_text_encoder_outputs_to_disk=True, network_train_unet_only=True))


def test_text_encoder_disk_cache_needs_frozen_encoders(sdxl_config):
    with pytest.raises(ConfigError, match=r"cache_text_encoder_outputs_to_disk needs a frozen text encoder"):
        build_trainer(sdxl_config(cache_text_encoder_outputs_to_disk=True))


# --- 4. two text-encoder learning rates ---------------------------------------------------------------
def test_two_text_encoder_rates_make_three_optimizer_groups(sdxl_config, caplog):
    with caplog.at_level(logging.INFO, logger="lorakit"):
        tr = build_trainer(sdxl_config(unet_lr=1e-3, text_encoder_lr=[1e-4, 5e-5]))
    groups = tr.optimizer.optimizer.param_groups
    assert [g["lr"] for g in groups] == [1e-3, 1e-4, 5e-5]
    parts = [set(map(id, tr.network.parameters(part=p))) for p in ("unet", "te1", "te2")]
    assert [set(map(id, g["params"])) for g in groups] == parts
    # kohya's counts: 2 layers x 6 linears per tiny encoder; 6 transformers x 22 linears in the UNet
    assert "create LoRA for Text Encoder: 24 modules. U-Net: 132 modules." in caplog.text


def test_text_encoder_lr2_zero_trains_only_the_first_encoder(sdxl_config, caplog):
    with caplog.at_level(logging.INFO, logger="lorakit"):
        tr = build_trainer(sdxl_config(text_encoder_lr="1e-4 0", max_train_steps=1))
    assert [g["lr"] for g in tr.optimizer.optimizer.param_groups] == [1e-3, 1e-4]
    sd = tensors(tr.run())
    prefixes = {n.split("_")[1] for n in module_names(sd)}
    assert prefixes == {"unet", "te1"}  # no lora_te2_ keys
    assert "create LoRA for Text Encoder: 12 modules. U-Net: 132 modules." in caplog.text
    assert sum(1 for k in sd if k.startswith("lora_te1_") and k.endswith(".alpha")) == 12


# --- 5. metadata ------------------------------------------------------------------------------------
def test_sdxl_lora_metadata(sdxl_config):
    meta = metadata(train(sdxl_config(max_train_steps=1, text_encoder_lr=[1e-4, 5e-5])))
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    assert meta["modelspec.prediction_type"] == "epsilon"
    assert meta["ss_zero_terminal_snr"] == "False"
    assert meta["ss_text_encoder_lr"] == "[0.0001, 5e-05]"
    assert meta["ss_v2"] == "False"


def test_vpred_markers_turn_on_v_parameterization_and_are_recorded(sdxl_config, tiny_sdxl_bases):
    cfg = sdxl_config(pretrained_model_name_or_path=str(tiny_sdxl_bases["vpred"]), max_train_steps=1)
    apply_model_defaults(cfg)
    assert cfg.model.v_parameterization and cfg.model.zero_terminal_snr
    tr = build_trainer(cfg)
    assert tr.scheduler.config.prediction_type == "v_prediction"
    assert float(tr.scheduler.alphas_cumprod[-1]) < 1e-6  # zero terminal SNR (rescaled betas)
    meta = metadata(tr.run())
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"  # kohya marks SDXL v-pred only in modelspec
    assert meta["modelspec.prediction_type"] == "v"
    assert meta["ss_zero_terminal_snr"] == "True"


def test_v_parameterization_given_false_wins_over_the_markers(sdxl_config, tiny_sdxl_bases):
    cfg = sdxl_config(pretrained_model_name_or_path=str(tiny_sdxl_bases["vpred"]), v_parameterization=False)
    apply_model_defaults(cfg)
    assert not cfg.model.v_parameterization and cfg.model.zero_terminal_snr


# --- 6. LoCon -----------------------------------------------------------------------------------------
def test_sdxl_locon_has_the_3x3_convs_with_sgm_names_and_trains(sdxl_config):
    sd = tensors(train(sdxl_config(conv_dim=4, conv_alpha=2, max_train_steps=2, save_precision="float")))
    names = module_names(sd)
    convs = {
        "lora_unet_input_blocks_1_0_in_layers_2",  # level 0 resnet 3x3
        "lora_unet_input_blocks_1_0_out_layers_3",
        "lora_unet_input_blocks_3_0_op",  # downsample
        "lora_unet_middle_block_0_in_layers_2",
        "lora_unet_output_blocks_2_2_conv",  # upsample
        "lora_unet_output_blocks_5_0_in_layers_2",
    }
    assert convs <= names
    assert not any("down_blocks" in n or "resnets" in n for n in names)  # SGM names, not diffusers'
    down = sd["lora_unet_input_blocks_1_0_in_layers_2.lora_down.weight"]
    assert down.shape == (4, 32, 3, 3)
    assert float(sd["lora_unet_input_blocks_1_0_in_layers_2.alpha"]) == 2.0
    assert all(sd[f"{n}.lora_up.weight"].abs().max() > 0 for n in convs)  # trained


# --- 7. gradient checkpointing ------------------------------------------------------------------------
def checkpointing(te) -> bool:
    # transformers >= 5.24 renames is_gradient_checkpointing (the old name warns, and goes in v6)
    name = (
        "is_activation_checkpointing"
        if hasattr(type(te), "is_activation_checkpointing")
        else "is_gradient_checkpointing"
    )
    return getattr(te, name)


def first_step(cfg):
    """(loss, LoRA gradients) of the first batch, through the trainer's own step."""
    tr = build_trainer(cfg)
    batch = next(iter(tr.dataset.batches(0)))
    loss = tr.loss_of(batch, 0)
    loss.backward()
    return tr, loss.detach(), [p.grad for p in tr.network.parameters()]


def test_gradient_checkpointing_with_both_encoders_trained_gives_the_same_step(sdxl_config, tmp_path):
    common = dict(text_encoder_lr=[1e-4, 5e-5], max_train_steps=1)
    _, loss, grads = first_step(sdxl_config(output_dir=str(tmp_path / "a"), **common))
    tr, loss_gc, grads_gc = first_step(
        sdxl_config(output_dir=str(tmp_path / "b"), gradient_checkpointing=True, **common)
    )
    assert tr.base.unet.is_gradient_checkpointing
    assert all(checkpointing(te) for te in tr.text_encoders.values())
    torch.testing.assert_close(loss_gc, loss, rtol=1e-5, atol=1e-7)
    te2 = set(map(id, tr.network.parameters(part="te2")))
    assert any(
        g is not None and g.abs().max() > 0 for p, g in zip(tr.network.parameters(), grads_gc) if id(p) in te2
    )
    for g, g_gc in zip(grads, grads_gc):
        assert (g is None) == (g_gc is None)
        if g is not None:
            torch.testing.assert_close(g_gc, g, rtol=1e-4, atol=1e-7)
    tr.optimizer.zero_grad()
    assert tensors(tr.run())  # and the run itself goes through


# --- 8. Adafactor, bucket steps --------------------------------------------------------------------
def test_adafactor_trains_on_sdxl(sdxl_config):
    tr = build_trainer(sdxl_config(optimizer_type="Adafactor", max_train_steps=2))
    before = [p.detach().clone() for p in tr.network.parameters()]
    path = tr.run()
    assert "Adafactor" in metadata(path)["ss_optimizer"]
    assert any(not torch.equal(a, b) for a, b in zip(before, tr.network.parameters()))


def model_load_forbidden(monkeypatch):
    import lorakit.models.loader as loader

    def never(*a, **k):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(loader, "load_base_model", never)


def test_bucket_reso_steps_32_is_for_sdxl_only(sdxl_config, train_config, monkeypatch):
    buckets = dict(
        resolution="96", enable_bucket=True, bucket_reso_steps=32, min_bucket_reso=32, max_bucket_reso=128,
        max_train_steps=1,
    )  # fmt: skip
    tr = build_trainer(sdxl_config(**buckets))
    assert tr.dataset.bucket_resos == [(96, 96)]  # not a multiple of 64: 12x12 latents, 3x3 at the bottom
    assert tensors(tr.run())
    model_load_forbidden(monkeypatch)  # refused from the file's header, before the model loads
    with pytest.raises(ConfigError, match=r"bucket_reso_steps = 32.*SD1.x needs a multiple of 64"):
        build_trainer(train_config(**buckets))


# --- 10. the fp16 VAE guard ---------------------------------------------------------------------------
def test_nan_latents_from_an_fp16_vae_ask_for_no_half_vae(sdxl_config, tmp_path, monkeypatch):
    from safetensors.torch import save_file

    vae_file = tmp_path / "fp16-fix-vae.safetensors"  # a VAE given apart runs in fp16 under fp16
    save_file({k: v.contiguous() for k, v in other_vae().state_dict().items()}, str(vae_file))
    common = dict(mixed_precision="fp16", vae=str(vae_file), max_train_steps=1)
    assert build_trainer(sdxl_config(no_half_vae=True, **common)).base.vae.dtype == torch.float32
    assert build_trainer(sdxl_config(**{**common, "vae": None})).base.vae.dtype == torch.float32
    tr = build_trainer(sdxl_config(**common))
    vae = tr.base.vae
    assert vae.dtype == torch.float16

    def overflowing(pixels):
        b, _, h, w = pixels.shape
        nan = torch.full((b, 4, h // 8, w // 8), float("nan"), dtype=torch.float16)
        return SimpleNamespace(latent_dist=SimpleNamespace(sample=lambda generator=None: nan))

    monkeypatch.setattr(vae, "encode", overflowing)
    with pytest.raises(TrainingError, match=r"nan/inf latents in fp16.*no_half_vae = true"):
        tr.run()


# --- 9. a separate VAE --------------------------------------------------------------------------------
def other_vae(seed: int = 1):
    """A VAE of the tiny SDXL base's shape with other weights (and SD1's scaling factor in its config)."""
    from diffusers import AutoencoderKL

    from lorakit.models.tiny import tiny_sdxl_arch

    config = dict(tiny_sdxl_arch()["vae"], scaling_factor=0.18215)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKL.from_config(config).eval()


@pytest.mark.parametrize("layout", ["ldm-prefixed", "ldm-bare", "diffusers-keys", "diffusers-folder"])
def test_load_vae_reads_every_layout_with_the_base_scaling_factor(layout, tmp_path):
    from safetensors.torch import save_file

    from lorakit.models.families.sdxl import VAE_SCALE_FACTOR
    from lorakit.models.ldm_layout import vae_to_ldm
    from lorakit.models.tiny import tiny_sdxl_arch
    from lorakit.models.vae import load_vae

    vae = other_vae()
    sd = {k: v.contiguous() for k, v in vae.state_dict().items()}
    path = tmp_path / "vae.safetensors"
    if layout == "diffusers-folder":
        path = tmp_path / "vae"
        vae.save_pretrained(path)
    elif layout == "diffusers-keys":
        save_file(sd, str(path))
    else:
        ldm = vae_to_ldm(sd)
        prefix = "first_stage_model." if layout == "ldm-prefixed" else ""
        save_file({prefix + k: v.contiguous() for k, v in ldm.items()}, str(path))
    loaded = load_vae(path, tiny_sdxl_arch()["vae"])
    assert loaded.config.scaling_factor == VAE_SCALE_FACTOR  # the base's, not the file's 0.18215
    got = loaded.state_dict()
    assert got.keys() == sd.keys()
    for k, v in sd.items():
        assert torch.equal(got[k], v), k


def test_load_vae_refuses_a_file_that_is_not_a_vae(tmp_path, trained_lora):
    from lorakit.models.tiny import tiny_sdxl_arch
    from lorakit.models.vae import load_vae

    with pytest.raises(ModelError, match=re.escape(str(trained_lora)) + ".*no VAE encoder weights"):
        load_vae(trained_lora, tiny_sdxl_arch()["vae"])
    sd1_vae = tmp_path / "sd1-vae.safetensors"  # a VAE, but not of this shape
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file

    from lorakit.models.tiny import tiny_arch

    small = AutoencoderKL.from_config(dict(tiny_arch()["vae"], block_out_channels=[8, 8, 8, 8]))
    save_file({k: v.contiguous() for k, v in small.state_dict().items()}, str(sd1_vae))
    with pytest.raises(ModelError, match=re.escape(str(sd1_vae)) + ".*does not fit the base model's VAE"):
        load_vae(sd1_vae, tiny_sdxl_arch()["vae"])


def test_the_vae_option_replaces_the_base_vae_for_the_latents(sdxl_config, tmp_path):
    from safetensors.torch import save_file

    vae_file = tmp_path / "other-vae.safetensors"
    save_file({k: v.contiguous() for k, v in other_vae().state_dict().items()}, str(vae_file))
    common = dict(cache_latents=True, max_train_steps=1)
    base = build_trainer(sdxl_config(output_dir=str(tmp_path / "a"), **common))
    swapped = build_trainer(sdxl_config(output_dir=str(tmp_path / "b"), vae=str(vae_file), **common))
    assert swapped.base.vae.config.scaling_factor == base.base.vae.config.scaling_factor
    assert swapped._vae_fingerprint() != base._vae_fingerprint()  # the disk latent cache is keyed apart
    image = next(iter(base.dataset._latents))
    a, b = base.dataset._latents[image].latents, swapped.dataset._latents[image].latents
    assert a.shape == b.shape and not torch.allclose(a, b)
    meta = metadata(swapped.run())
    assert meta["ss_vae_name"] == "other-vae.safetensors"  # kohya names and hashes a VAE given apart
    assert meta["ss_new_vae_hash"] == hashlib.sha256(vae_file.read_bytes()).hexdigest()
    assert re.fullmatch(r"[0-9a-f]{8}", meta["ss_vae_hash"])
