"""What a run keeps on Ctrl-C and what it says: kohya's summary, the sizes used, one line per save."""

import logging

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lorakit.errors import ModelError
from lorakit.network.file import read_lora_file
from lorakit.train.trainer import Trainer, build_trainer, train


def ctrl_c_at_call(monkeypatch, n: int) -> None:
    """Ctrl-C while the n-th micro-batch's loss is computed."""
    real, calls = Trainer.loss_of, []

    def interrupted(self, batch, step):
        calls.append(step)
        if len(calls) == n:
            raise KeyboardInterrupt
        return real(self, batch, step)

    monkeypatch.setattr(Trainer, "loss_of", interrupted)


# --- Ctrl-C -----------------------------------------------------------------------------------
def test_ctrl_c_without_save_state_keeps_what_was_trained(train_config, tmp_path, monkeypatch, caplog):
    common = dict(reg_data_dir=None, save_precision="float")
    three_steps = train(train_config(output_dir=str(tmp_path / "ref"), max_train_steps=3, **common))
    with monkeypatch.context() as m, caplog.at_level(logging.WARNING, logger="lorakit"):
        ctrl_c_at_call(m, 4)  # steps 1-3 done
        with pytest.raises(KeyboardInterrupt):
            train(train_config(max_train_steps=6, **common))
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["tiny-interrupted.safetensors"]
    saved, meta = read_lora_file(out / "tiny-interrupted.safetensors")
    assert meta["ss_steps"] == "3" and meta["lorakit_interrupted_at_step"] == "3"
    assert meta["ss_max_train_steps"] == "6"
    reference = load_file(str(three_steps))
    assert saved.keys() == reference.keys()
    for k in saved:  # exactly the weights of step 3 ...
        assert torch.equal(saved[k], reference[k]), k
    ups = [v for k, v in saved.items() if k.endswith("lora_up.weight")]
    assert any(v.abs().sum() > 0 for v in ups)  # ... which are trained (lora_up starts at zero)
    message = caplog.text
    assert "interrupted at step 3 of 6" in message and str(out / "tiny-interrupted.safetensors") in message
    assert "--save_state" in message and "--network_weights" in message


def test_ctrl_c_with_save_state_says_how_to_resume(train_config, tmp_path, monkeypatch, caplog):
    with monkeypatch.context() as m, caplog.at_level(logging.WARNING, logger="lorakit"):
        ctrl_c_at_call(m, 3)
        with pytest.raises(KeyboardInterrupt):
            train(train_config(reg_data_dir=None, save_state=True))
    state = tmp_path / "out" / "tiny-state"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["tiny-state"]
    assert f"state saved to {state}. To go on, run the same command with --resume {state}" in caplog.text


# --- the summary --------------------------------------------------------------------------------
def test_kohyas_summary_before_training(train_config, tiny_data, monkeypatch, caplog):
    """tiny_data: 4 train images x 2 repeats, 4 reg images x 1; reg balanced to 8 -> 16 samples."""
    with monkeypatch.context() as m, caplog.at_level(logging.INFO, logger="lorakit"):
        ctrl_c_at_call(m, 1)  # the summary is said before the first step
        cfg = train_config(
            reg_data_dir=str(tiny_data[1]),
            train_batch_size=2,
            gradient_accumulation_steps=2,
            max_train_epochs=3,
        )
        with pytest.raises(KeyboardInterrupt):
            train(cfg)
    text = caplog.text
    train_dir, reg_dir = tiny_data[0], tiny_data[1]
    sub = next(p for p in train_dir.iterdir() if p.is_dir())
    reg_sub = next(p for p in reg_dir.iterdir() if p.is_dir())
    assert f"found directory {sub} contains 4 image files: 4 x 2 repeats = 8" in text
    assert f"found directory {reg_sub} contains 4 image files (reg): 4 x 1 repeats = 4" in text
    expected = [
        "running training",
        "  num train images * repeats: 8",
        "  num reg images: 4",
        "  num batches per epoch: 8",  # 16 samples / batch 2
        "  num epochs: 3",
        "  batch size per device: 2",
        "  gradient accumulation steps: 2",
        "  total batch size (with 1 process(es) and accumulation): 4",
        "  total optimization steps: 12",  # 8 batches / 2 accumulated = 4 steps an epoch, x 3
    ]
    summary = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("running training"))
    assert summary.splitlines() == expected
    assert "nothing was trained yet, nothing was saved" in text


def test_resolution_says_the_size_really_used(train_config, monkeypatch, caplog):
    class Stop(Exception):
        pass

    def stop(*a, **k):
        raise Stop  # the sizes are said before the model loads

    monkeypatch.setattr("lorakit.models.loader.load_base_model", stop)
    with caplog.at_level(logging.INFO, logger="lorakit"), pytest.raises(Stop):
        build_trainer(train_config(resolution="100"))
    odd = [r for r in caplog.records if r.getMessage().startswith("resolution 100")]
    assert len(odd) == 1 and odd[0].levelno == logging.WARNING
    assert "trained at 100x100 (not a multiple of 64" in odd[0].getMessage()
    assert "covers only 96x96" in odd[0].getMessage()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lorakit"), pytest.raises(Stop):
        build_trainer(train_config(resolution="100", enable_bucket=True, min_bucket_reso=64))
    assert "resolution 100 -> buckets with sides multiple of 64 and an area up to 100x100" in caplog.text
    assert "bucket 0: resolution 64x64, count: 8" in caplog.text  # 4 images of 64x64, 2 repeats
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and "resolution" in r.getMessage()]


# --- one line per save -----------------------------------------------------------------------
def test_each_save_is_reported_once(train_config, tmp_path, capsys, caplog):
    from lorakit.cli import main

    toml = tmp_path / "cfg.toml"
    toml.write_text(train_config(max_train_epochs=2, save_every_n_epochs=1, reg_data_dir=None).to_toml())
    with caplog.at_level(logging.INFO, logger="lorakit"):
        assert main(["train", "--config", str(toml)]) == 0
    out = tmp_path / "out"
    said = caplog.text + capsys.readouterr().out
    assert said.count(str(out / "tiny-000001.safetensors")) == 1
    assert said.count(str(out / "tiny.safetensors")) == 1
    assert f"LoRA saved: {out / 'tiny.safetensors'}" in said


# --- a LoRA given as the base model ------------------------------------------------------------
def test_a_lora_as_base_model_names_network_weights(train_config, tmp_path):
    lora = tmp_path / "my-lora.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 4)}, str(lora))
    with pytest.raises(ModelError, match=r"my-lora\.safetensors is a LoRA file.*--network_weights"):
        train(train_config(pretrained_model_name_or_path=str(lora)))
    from lorakit.models.loader import load_base_model

    with pytest.raises(ModelError, match="LoRA file, not a base model") as e:  # drawing: no training flag
        load_base_model(lora)
    assert "network_weights" not in str(e.value)
    with safe_open(str(lora), "pt") as f:  # the file was only read
        assert list(f.keys()) == ["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"]
