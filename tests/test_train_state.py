"""State folders for resume: a kill at any moment of a save leaves a complete state."""

import os
import shutil

import pytest
import torch

from lorakit.train import state as state_mod
from lorakit.train.state import Position, clean_output_folder, load_state, read_position, save_state


class OneTensorNetwork:
    """What save_state/load_state need of a LoRA network."""

    def __init__(self, value: float):
        self.weight = torch.nn.Parameter(torch.full((2, 3), value))

    def kohya_state_dict(self, dtype=None):
        return {"lora_unet_x.lora_down.weight": self.weight.detach().to(dtype or torch.float32)}

    def load_kohya_state_dict(self, sd, source=""):
        with torch.no_grad():
            self.weight.copy_(sd["lora_unet_x.lora_down.weight"])


def training_objects(value: float):
    net = OneTensorNetwork(value)
    opt = torch.optim.AdamW([net.weight], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return net, opt, sched


def save_at(folder, step: int, scaler=None):
    net, opt, sched = training_objects(float(step))
    extra = {"scaler": scaler} if scaler is not None else {}
    return save_state(folder, net, opt, sched, Position(0, step, 0, seed=1), **extra)


def test_a_kill_at_any_moment_of_a_save_leaves_a_complete_state(tmp_path, monkeypatch):
    """Copy the folder just before every rename and delete of a second save: each copy is what a
    kill at that moment would leave; each must resume, and the next run must tidy it up."""
    out = tmp_path / "out"
    save_at(out / "tiny-state", step=1)
    snapshots = []

    def snapshot_then(op):
        def run(*args, **kwargs):
            snapshots.append(shutil.copytree(out, tmp_path / f"killed-{len(snapshots)}"))
            return op(*args, **kwargs)

        return run

    monkeypatch.setattr(state_mod.os, "replace", snapshot_then(os.replace))
    monkeypatch.setattr(state_mod.shutil, "rmtree", snapshot_then(shutil.rmtree))
    save_at(out / "tiny-state", step=2)
    monkeypatch.undo()
    assert read_position(out / "tiny-state").step == 2
    for killed in snapshots:
        folder = killed / "tiny-state"
        step = read_position(folder).step  # a resume straight after the kill
        assert step in (1, 2), killed
        net, opt, sched = training_objects(0.0)
        assert load_state(folder, net, opt, sched).step == step
        assert torch.equal(net.weight, torch.full((2, 3), float(step)))
        clean_output_folder(killed, "tiny")  # the next run
        assert sorted(p.name for p in killed.iterdir()) == ["tiny-state"], killed
        assert read_position(folder).step == step
    assert len(snapshots) >= 3  # old aside, new in, old deleted


def test_a_save_after_a_kill_keeps_the_state_set_aside(tmp_path, monkeypatch):
    out = tmp_path / "out"
    save_at(out / "tiny-state", step=1)
    real = os.replace

    def killed_before_the_new_state_goes_in(src, dst):
        if os.path.basename(dst) == "tiny-state" and os.path.basename(src) != ".tiny-state.old":
            raise KeyboardInterrupt
        real(src, dst)

    monkeypatch.setattr(state_mod.os, "replace", killed_before_the_new_state_goes_in)
    with pytest.raises(KeyboardInterrupt):
        save_at(out / "tiny-state", step=2)
    monkeypatch.undo()
    assert read_position(out / "tiny-state").step == 1  # the old state was put back
    assert sorted(p.name for p in out.iterdir()) == ["tiny-state"]


def test_clean_output_folder_removes_only_this_runs_leftovers(tmp_path):
    out = tmp_path / "out"
    save_at(out / "tiny-000002-state", step=2)
    (out / ".tiny-000002-state.ab12cd_9.tmp").mkdir()  # a state being written when killed
    (out / ".tiny-000002-state.ab12cd_9.tmp" / "optimizer.pt").write_bytes(b"half")
    (out / ".tiny.safetensors.x1y2z3w4.tmp").write_bytes(b"half a LoRA")
    os.replace(out / "tiny-000002-state", out / ".tiny-000002-state.old")  # killed mid-swap
    keep = [
        ".other.safetensors.x1y2z3w4.tmp",
        ".tinyx.safetensors.x1y2z3w4.tmp",
        "tiny.safetensors",
        ".hidden",
    ]
    for name in keep:
        (out / name).write_bytes(b"not ours")
    clean_output_folder(out, "tiny")
    assert sorted(p.name for p in out.iterdir()) == sorted([*keep, "tiny-000002-state"])
    assert read_position(out / "tiny-000002-state").step == 2


@pytest.mark.skipif(os.name == "nt", reason="Windows cannot fsync a folder; NTFS journals renames")
def test_state_files_and_folders_are_fsynced(tmp_path, monkeypatch):
    synced = set()
    real = os.fsync

    def record(fd):
        synced.add(os.fstat(fd).st_ino)
        real(fd)

    monkeypatch.setattr(state_mod.os, "fsync", record)
    folder = save_at(tmp_path / "tiny-state", step=1)
    for path in [*folder.iterdir(), folder, tmp_path]:  # every file, the folder, the rename into the parent
        assert path.stat().st_ino in synced, path


def test_the_fp16_loss_scaler_round_trips(tmp_path):
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=3)
    scaler.scale(torch.ones(()))  # creates the scale tensor
    scaler.update(new_scale=2.0**7)  # not the state a fresh scaler starts in
    scaler._growth_tracker.fill_(2)
    folder = save_at(tmp_path / "tiny-state", step=1, scaler=scaler)
    fresh = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=3)
    net, opt, sched = training_objects(0.0)
    load_state(folder, net, opt, sched, fresh)
    assert fresh.state_dict() == scaler.state_dict()
    assert fresh.get_scale() == 2.0**7
