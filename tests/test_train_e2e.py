"""Training end to end on the tiny model: learning, the file, determinism, resume, failures."""

import hashlib
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lorakit.errors import ConfigError, TrainingError
from lorakit.hashing import legacy_hash
from lorakit.train import trainer as trainer_mod
from lorakit.train.trainer import Trainer, build_trainer, train


def tensors(path):
    return load_file(str(path))


def metadata(path):
    with safe_open(str(path), "pt") as f:
        return f.metadata()


def test_training_lowers_the_loss_on_its_own_data(train_config):
    cfg = train_config(
        max_train_steps=30, learning_rate=3e-3, cache_latents=True, network_dim=8, network_alpha=8
    )
    tr = build_trainer(cfg)
    before = tr.mean_loss()
    tr.run()
    after = tr.mean_loss()
    tr.network.set_multiplier(0.0)  # the same network switched off is the base model again
    assert tr.mean_loss() == pytest.approx(before, rel=1e-4)
    assert after < 0.9 * before, (before, after)


def test_saved_file_is_kohya_format(train_config, tiny_base):
    cfg = train_config(max_train_steps=2, training_comment="hello")
    path = train(cfg)
    assert path.name == "tiny.safetensors"
    sd = tensors(path)
    names = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in sd}
    for n in names:
        assert n.startswith(("lora_unet_", "lora_te_text_model_encoder_layers_"))
        assert {f"{n}.lora_down.weight", f"{n}.lora_up.weight", f"{n}.alpha"} <= sd.keys()
        assert sd[f"{n}.lora_down.weight"].dtype == torch.float16  # save_precision default
        assert float(sd[f"{n}.alpha"]) == 2.0
    meta = metadata(path)
    assert meta["ss_network_module"] == "networks.lora"
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2.0"
    assert meta["ss_output_name"] == "tiny" and meta["ss_steps"] == "2"
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_v2"] == "False"
    assert meta["ss_training_comment"] == "hello"
    assert meta["ss_sd_model_name"] == tiny_base.name
    # the base's hashes, read in the background while the model loaded
    assert meta["ss_new_sd_model_hash"] == hashlib.sha256(tiny_base.read_bytes()).hexdigest()
    assert meta["ss_sd_model_hash"] == legacy_hash(tiny_base)
    assert meta["ss_num_train_images"] == "8"  # 4 images x 2 repeats
    assert '"2_usu bear": {"n_repeats": 2, "img_count": 4}' in meta["ss_dataset_dirs"]
    data = path.read_bytes()  # A1111's "Lora hashes" source: sha256 of the bytes after the header
    header_end = 8 + int.from_bytes(data[:8], "little")
    assert meta["sshs_model_hash"] == hashlib.sha256(data[header_end:]).hexdigest()
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["modelspec.sai_model_spec"] == "1.0.1"
    assert not list(path.parent.glob(".*tmp"))  # no temp file left behind


def test_same_seed_gives_identical_runs(train_config, tmp_path):
    a = train(train_config(output_dir=str(tmp_path / "a"), flip_aug=True, shuffle_caption=True))
    b = train(train_config(output_dir=str(tmp_path / "b"), flip_aug=True, shuffle_caption=True))
    c = train(train_config(output_dir=str(tmp_path / "c"), flip_aug=True, shuffle_caption=True, seed=2))
    ta, tb, tc = tensors(a), tensors(b), tensors(c)
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    assert not all(torch.equal(ta[k], tc[k]) for k in ta)


def test_resume_mid_epoch_is_exact(train_config, tmp_path, monkeypatch):
    """Stop at step 3 (as Ctrl-C does), resume from the saved state: the same LoRA as one run."""
    common = dict(
        max_train_steps=7, reg_data_dir=None, save_state=True, save_precision="float", flip_aug=True
    )
    full = train(train_config(output_dir=str(tmp_path / "full"), **common))

    def stop_at_3(p):
        if p.step == 3:
            raise KeyboardInterrupt

    cfg = train_config(output_dir=str(tmp_path / "split"), progress_every_n_steps=1, **common)
    with pytest.raises(KeyboardInterrupt):
        build_trainer(cfg).run(stop_at_3)
    state = tmp_path / "split" / "tiny-state"
    assert (state / "train_state.json").is_file()
    assert not (tmp_path / "split" / "tiny.safetensors").exists()
    resumed = train(train_config(output_dir=str(tmp_path / "split"), resume=str(state), **common))
    tf, tr = tensors(full), tensors(resumed)
    assert tf.keys() == tr.keys()
    for k in tf:
        torch.testing.assert_close(tr[k], tf[k], rtol=0, atol=0, msg=k)


def test_resume_from_epoch_state_and_periodic_saves(train_config, tmp_path):
    common = dict(max_train_epochs=3, save_every_n_epochs=1, save_state=True, save_precision="float")
    full = train(train_config(output_dir=str(tmp_path / "full"), **common))
    out = tmp_path / "full"
    assert (out / "tiny-000001.safetensors").is_file() and (out / "tiny-000002.safetensors").is_file()
    assert not (out / "tiny-000003.safetensors").exists()  # the last epoch is the final file
    assert metadata(out / "tiny-000001.safetensors")["ss_epoch"] == "1"
    resumed = train(
        train_config(
            output_dir=str(tmp_path / "r"), resume=str(out / "tiny-000001-state"), seed=None, **common
        )
    )
    tf, tr = tensors(full), tensors(resumed)
    assert all(torch.equal(tf[k], tr[k]) for k in tf)


def test_nan_loss_stops_and_keeps_last_good_save(train_config, tmp_path, monkeypatch):
    real = trainer_mod.N.per_sample_loss
    calls = {"n": 0}

    def poisoned(pred, target):
        calls["n"] += 1
        loss = real(pred, target)
        return loss * float("nan") if calls["n"] > 5 else loss

    monkeypatch.setattr(trainer_mod.N, "per_sample_loss", poisoned)
    cfg = train_config(max_train_epochs=4, save_every_n_epochs=1, reg_data_dir=None, progress_every_n_steps=1)
    with pytest.raises(TrainingError, match="loss became nan"):
        train(cfg)
    out = tmp_path / "out"
    assert (out / "tiny-000001.safetensors").is_file()
    assert not (out / "tiny.safetensors").exists()
    assert all(torch.isfinite(t).all() for t in tensors(out / "tiny-000001.safetensors").values())


def test_unet_only_and_text_encoder_only(train_config, tmp_path):
    u = tensors(
        train(train_config(output_dir=str(tmp_path / "u"), network_train_unet_only=True, max_train_steps=1))
    )
    assert u and all(k.startswith("lora_unet_") for k in u)
    t = tensors(
        train(
            train_config(
                output_dir=str(tmp_path / "t"), network_train_text_encoder_only=True, max_train_steps=1
            )
        )
    )
    assert t and all(k.startswith("lora_te_") for k in t)


def test_text_encoder_cache_and_gradient_checkpointing_train_like_the_plain_run(train_config, tmp_path):
    common = dict(network_train_unet_only=True, max_train_steps=2, save_precision="float")
    plain = tensors(train(train_config(output_dir=str(tmp_path / "plain"), **common)))
    cached = tensors(
        train(
            train_config(
                output_dir=str(tmp_path / "cached"),
                cache_text_encoder_outputs=True,
                gradient_checkpointing=True,
                **common,
            )
        )
    )
    assert cached.keys() == plain.keys()
    assert all(v.abs().max() > 0 for k, v in plain.items() if k.endswith("lora_up.weight"))
    for k in plain:  # the frozen TE's output, cached once or computed each step, is the same
        torch.testing.assert_close(cached[k], plain[k], rtol=1e-5, atol=1e-7, msg=k)


def test_cache_text_encoder_outputs_needs_frozen_text_encoder(train_config):
    with pytest.raises(ConfigError, match="network_train_unet_only"):
        train(train_config(cache_text_encoder_outputs=True))


def test_network_weights_starts_from_a_file(train_config, tmp_path):
    first = train(train_config(output_dir=str(tmp_path / "a"), save_precision="float"))
    cfg = train_config(output_dir=str(tmp_path / "b"), network_weights=str(first), max_train_steps=1)
    tr = build_trainer(cfg)
    loaded = tr.network.kohya_state_dict()
    for k, v in tensors(first).items():
        assert torch.equal(loaded[k], v), k


@pytest.mark.parametrize(
    "opts,meta",
    [
        ({"optimizer_type": "Lion", "learning_rate": 1e-4}, {"ss_learning_rate": "0.0001"}),
        ({"optimizer_type": "Prodigy", "learning_rate": 1.0}, {"ss_learning_rate": "1.0"}),
        (
            {"lr_scheduler": "cosine", "lr_warmup_steps": 0.5, "min_snr_gamma": 5, "noise_offset": 0.1},
            {
                "ss_lr_scheduler": "cosine",
                "ss_lr_warmup_steps": "0.5",
                "ss_min_snr_gamma": "5.0",
                "ss_noise_offset": "0.1",
            },
        ),
        (
            {
                "v_parameterization": True,
                "gradient_accumulation_steps": 2,
                "max_token_length": 150,
                "clip_skip": 2,
            },
            {
                "ss_base_model_version": "sd_v1_v",
                "ss_gradient_accumulation_steps": "2",
                "ss_total_batch_size": "4",
                "ss_max_token_length": "150",
                "ss_clip_skip": "2",
                "modelspec.prediction_type": "v",
            },
        ),
        ({"conv_dim": 2, "conv_alpha": 1, "mixed_precision": "bf16"}, {"ss_mixed_precision": "bf16"}),
    ],
    ids=["lion", "prodigy", "cosine-snr-offset", "vpred-accum-tokens-clipskip", "locon-bf16"],
)
def test_training_options_run_and_are_recorded(train_config, opts, meta):
    """These options run and end up in the metadata; their effects are in test_train_options.py."""
    path = train(train_config(max_train_steps=2, **opts))
    ups = [v for k, v in tensors(path).items() if k.endswith("lora_up.weight")]
    assert any(v.float().abs().sum() > 0 for v in ups)
    assert all(torch.isfinite(v.float()).all() for v in ups)
    written = metadata(path)
    assert {k: written.get(k) for k in meta} == meta
    if "optimizer_type" in opts:
        assert opts["optimizer_type"] in written["ss_optimizer"]


def test_out_of_memory_gives_advice(train_config, monkeypatch):
    def oom(self, batch, step):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(Trainer, "loss_of", oom)
    with pytest.raises(
        TrainingError, match="out of GPU memory.*train_batch_size = 1.*gradient_checkpointing.*cache_latents"
    ):
        train(train_config())


def test_training_needs_no_network(train_config, monkeypatch):
    import socket

    attempts = []

    local = socket.socket.connect

    def refuse(*a, **k):
        if a and isinstance(a[0], socket.socket) and a[0].family == getattr(socket, "AF_UNIX", None):
            return local(*a, **k)  # DataLoader workers hand tensors over local sockets: no network
        attempts.append(a[1:] or k)  # recorded: a caller that swallows the OSError must not hide it
        raise OSError("network is unreachable (test)")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    assert train(train_config(max_train_steps=1)).is_file()
    assert attempts == []


def test_buckets_disk_cache_and_tensorboard(train_config, tiny_data, tmp_path):
    from PIL import Image

    wide = tiny_data[0] / "2_usu bear" / "wide.png"
    Image.new("RGB", (192, 64), (10, 10, 10)).save(wide)
    cfg = train_config(
        resolution="128",
        enable_bucket=True,
        min_bucket_reso=64,
        max_bucket_reso=256,
        cache_latents_to_disk=True,
        logging_dir=str(tmp_path / "logs"),
        max_train_steps=2,
    )
    path = train(cfg)
    buckets = json.loads(metadata(path)["ss_bucket_info"])["buckets"]
    assert len(buckets) >= 2  # the square images and the wide one
    assert list(wide.parent.glob("wide_*_lorakit.npz"))
    assert list((tmp_path / "logs").rglob("events.out.tfevents.*"))


def test_bad_folder_is_reported_before_the_model_loads(train_config, tiny_data, monkeypatch):
    import lorakit.models.loader as loader

    def never(*a, **k):
        raise AssertionError("the model was loaded before the dataset was checked")

    monkeypatch.setattr(loader, "load_base_model", never)
    (tiny_data[0] / "usu bear").mkdir()
    from lorakit.errors import DatasetError

    with pytest.raises(DatasetError, match=r"usu bear.*<repeats>_<prompt>"):
        train(train_config())


def test_missing_base_model_is_reported_first(train_config, tmp_path):
    from lorakit.errors import ModelError

    with pytest.raises(ModelError, match="nope.safetensors"):
        train(train_config(pretrained_model_name_or_path=str(tmp_path / "nope.safetensors")))


def test_cli_train_and_its_errors(train_config, tiny_base, tiny_data, tmp_path, capsys):
    from lorakit.cli import main

    toml = tmp_path / "cfg.toml"
    toml.write_text(train_config(max_train_steps=1).to_toml())
    assert main(["train", "--config", str(toml), "--network_dim", "2"]) == 0
    out = capsys.readouterr().out
    assert "LoRA saved:" in out
    assert (
        tensors(tmp_path / "out" / "tiny.safetensors")[
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"
        ].shape[0]
        == 2
    )
    bad = tiny_data[0] / "2_usu bear" / "broken.png"
    bad.write_bytes(b"")
    assert main(["train", "--config", str(toml)]) == 2
    err = capsys.readouterr().err
    assert "broken.png" in err and "Traceback" not in err


def test_adamw8bit_without_bitsandbytes_says_what_to_install(train_config):
    try:
        import bitsandbytes  # noqa: F401

        pytest.skip("bitsandbytes is installed here")
    except ImportError:
        pass
    with pytest.raises(ConfigError, match=r"AdamW8bit.*bitsandbytes.*pip install"):
        train(train_config(optimizer_type="AdamW8bit"))
