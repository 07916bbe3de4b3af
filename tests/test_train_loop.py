"""The training loop's guarantees: what it loads, when it stops, what it never writes."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorakit.errors import TrainingError
from lorakit.train import trainer as trainer_mod
from lorakit.train.trainer import Trainer, build_trainer, train


def test_network_weights_load_unrounded_under_bf16(train_config, tmp_path):
    """The file's fp32 values reach the fp32 LoRA exactly, not rounded through the bf16 base."""
    shapes = build_trainer(train_config()).network.kohya_state_dict()
    g = torch.Generator().manual_seed(0)
    # 1 + u * 2^-10 needs more than bf16's 8 (and fp16's 11) mantissa bits
    weights = {
        k: (v if k.endswith(".alpha") else 1 + torch.rand(v.shape, generator=g) * 2**-10)
        for k, v in shapes.items()
    }
    assert any((w.bfloat16().float() != w).any() for w in weights.values())
    file = tmp_path / "start.safetensors"
    save_file(weights, str(file))
    tr = build_trainer(train_config(mixed_precision="bf16", network_weights=str(file)))
    loaded = tr.network.kohya_state_dict()
    assert loaded.keys() == weights.keys()
    for k, w in weights.items():
        assert loaded[k].dtype == torch.float32, k
        assert torch.equal(loaded[k], w), k


# --- item: nan/inf never reaches a file -------------------------------------------------------
def poison_losses_after(monkeypatch, n_good: int):
    real = trainer_mod.N.per_sample_loss
    calls = {"n": 0}

    def poisoned(pred, target):
        calls["n"] += 1
        loss = real(pred, target)
        return loss * float("nan") if calls["n"] > n_good else loss

    monkeypatch.setattr(trainer_mod.N, "per_sample_loss", poisoned)


def all_finite(folder):
    files = list(folder.rglob("*.safetensors"))
    return files, all(torch.isfinite(t).all() for f in files for t in load_file(str(f)).values())


def test_nan_between_reports_is_never_saved_and_the_error_names_the_real_last_save(
    train_config, tmp_path, monkeypatch
):
    """4 batches an epoch, reports every 10 steps: the loss turns nan at step 6, before the epoch-2 save."""
    poison_losses_after(monkeypatch, 5)
    cfg = train_config(max_train_epochs=4, save_every_n_epochs=1, save_state=True, reg_data_dir=None)
    with pytest.raises(TrainingError, match=r"loss became nan or inf at step 6 \(found at step 8\)") as e:
        train(cfg)
    out = tmp_path / "out"
    assert f"the last good save, {out / 'tiny-000001.safetensors'}, was kept" in str(e.value)
    assert sorted(p.name for p in out.iterdir()) == ["tiny-000001-state", "tiny-000001.safetensors"]
    files, finite = all_finite(out)
    assert len(files) == 2 and finite


def test_nan_before_any_save_writes_no_state_on_interrupt(train_config, tmp_path, monkeypatch):
    poison_losses_after(monkeypatch, 0)
    real, calls = Trainer.loss_of, []

    def interrupted_at_the_third_batch(self, batch, step):
        calls.append(step)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, batch, step)

    monkeypatch.setattr(Trainer, "loss_of", interrupted_at_the_third_batch)
    with pytest.raises(TrainingError, match=r"loss became nan or inf at step 1 .*nothing was saved"):
        train(train_config(save_state=True, reg_data_dir=None))
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# --- item: a stop inside gradient accumulation resumes exactly --------------------------------
def test_stop_inside_gradient_accumulation_resumes_bit_exact(train_config, tmp_path, monkeypatch):
    """2 micro-batches a step; Ctrl-C arrives after the first micro-batch of step 2 was backpropagated."""
    common = dict(
        max_train_steps=4,
        gradient_accumulation_steps=2,
        reg_data_dir=None,
        save_state=True,
        save_precision="float",
        flip_aug=True,
    )
    full = train(train_config(output_dir=str(tmp_path / "full"), **common))

    real, calls = Trainer.loss_of, []

    def ctrl_c_at_the_fourth_micro_batch(self, batch, step):
        calls.append(step)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(self, batch, step)

    split = tmp_path / "split"
    with monkeypatch.context() as m:
        m.setattr(Trainer, "loss_of", ctrl_c_at_the_fourth_micro_batch)
        with pytest.raises(KeyboardInterrupt):
            train(train_config(output_dir=str(split), **common))
    state = split / "tiny-state"
    assert json.loads((state / "train_state.json").read_text())["batch_in_epoch"] == 2  # step 1's end
    # what a run killed while saving leaves; the resumed run clears it
    (split / ".tiny.safetensors.k1ll3d00.tmp").write_bytes(b"half")
    (split / ".tiny-state.k1ll3d00.tmp").mkdir()
    resumed = train(train_config(output_dir=str(split), resume=str(state), **common))
    assert sorted(p.name for p in split.iterdir()) == ["tiny-state", "tiny.safetensors"]
    tf, tr = load_file(str(full)), load_file(str(resumed))
    assert tf.keys() == tr.keys()
    for k in tf:
        assert torch.equal(tr[k], tf[k]), k


# --- item: fp16's loss scaler ------------------------------------------------------------------
@pytest.fixture
def cpu_loss_scaler(monkeypatch):
    """accelerate has no fp16 loss scaler on CPU: give it torch's CPU GradScaler, as on CUDA."""
    import accelerate

    def install(**scaler_kwargs):
        class ScalingAccelerator(accelerate.Accelerator):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                self.scaler = torch.amp.GradScaler("cpu", **scaler_kwargs)

        monkeypatch.setattr(accelerate, "Accelerator", ScalingAccelerator)

    return install


def test_lr_scheduler_does_not_step_when_fp16_skips_the_step(train_config, cpu_loss_scaler):
    cpu_loss_scaler(init_scale=float("inf"))  # every scaled gradient overflows: every step is skipped
    tr = build_trainer(train_config(mixed_precision="fp16", max_train_steps=3, lr_scheduler="linear"))
    before = [p.detach().clone() for p in tr.network.parameters()]
    tr.run()
    assert tr.pos.step == 3
    assert all(torch.equal(a, b) for a, b in zip(before, tr.network.parameters()))
    assert tr.lr_scheduler.last_epoch == 0


def test_lr_scheduler_steps_when_fp16_steps(train_config, cpu_loss_scaler):
    cpu_loss_scaler(init_scale=2.0**10)
    tr = build_trainer(train_config(mixed_precision="fp16", max_train_steps=3, lr_scheduler="linear"))
    tr.run()
    assert tr.lr_scheduler.last_epoch == 3


def test_fp16_resume_restores_the_loss_scale(train_config, tmp_path, cpu_loss_scaler):
    cpu_loss_scaler(init_scale=2.0**10, growth_interval=1)  # the scale doubles after each good step
    common = dict(mixed_precision="fp16", max_train_steps=6, save_state=True, progress_every_n_steps=1)
    tr = build_trainer(train_config(**common))

    def stop_at_3(p):
        if p.step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        tr.run(stop_at_3)
    scale = tr.acc.scaler.get_scale()
    assert scale == 2.0**13
    resumed = build_trainer(train_config(resume=str(tmp_path / "out" / "tiny-state"), **common))
    assert resumed.acc.scaler.get_scale() == scale
    assert resumed.acc.scaler.state_dict() == tr.acc.scaler.state_dict()


def test_ctrl_c_during_the_optimizer_step_waits_for_its_end():
    import signal

    from lorakit.train.interrupts import interrupts_deferred

    done = []
    with pytest.raises(KeyboardInterrupt):
        with interrupts_deferred():
            signal.raise_signal(signal.SIGINT)
            done.append("the rest of the step")
    assert done == ["the rest of the step"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
