"""One run per output name: the lock file, stale locks, process liveness on POSIX and (patched) Windows,
and no run silently replacing another run's LoRA or leaving another run's state beside its own."""

import json
import logging
import os
import socket
import subprocess
import sys
import time

import pytest
from safetensors import safe_open

from lorakit.errors import ConfigError, TrainingError
from lorakit.train import output_lock
from lorakit.train.output_lock import OutputLock, pid_alive
from lorakit.train.trainer import Trainer, train


def write_lock(path, pid, host=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(), "started": time.time()}))


@pytest.fixture
def sleeper():
    """A live process that is not this one."""
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield p
    p.kill()
    p.wait()


def ended_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.fixture
def no_model_load(monkeypatch):
    import lorakit.models.loader as loader

    def never(*a, **k):
        raise AssertionError("the model was loaded before the output name was checked")

    monkeypatch.setattr(loader, "load_base_model", never)


def session_of(path):
    with safe_open(str(path), "pt") as f:
        return f.metadata()["ss_session_id"]


# --- the lock ---------------------------------------------------------------------------------
def test_a_second_run_is_refused_with_the_first_runs_pid(train_config, tmp_path, sleeper, no_model_load):
    lock = tmp_path / "out" / "tiny.lock"
    write_lock(lock, sleeper.pid)
    with pytest.raises(TrainingError, match=rf"in use by another training run: PID {sleeper.pid} on "):
        train(train_config())
    assert json.loads(lock.read_text())["pid"] == sleeper.pid  # the other run's lock is left alone


def test_a_lock_from_another_computer_is_never_taken_over(tmp_path):
    write_lock(tmp_path / "x.lock", ended_pid(), host="some-other-pc")
    with pytest.raises(TrainingError, match=r"PID \d+ on some-other-pc.*delete .*x\.lock"):
        OutputLock.acquire(tmp_path, "x")


def test_a_stale_lock_is_taken_over_and_every_exit_releases_it(train_config, tmp_path, caplog):
    lock = tmp_path / "out" / "tiny.lock"
    dead = ended_pid()
    write_lock(lock, dead)
    held = []
    real = Trainer.loss_of

    def looks_at_the_lock(self, batch, step):
        held.append(json.loads(lock.read_text())["pid"])
        if len(held) == 2:
            raise KeyboardInterrupt
        return real(self, batch, step)

    with caplog.at_level(logging.WARNING, logger="lorakit"):
        with pytest.MonkeyPatch.context() as m:
            m.setattr(Trainer, "loss_of", looks_at_the_lock)
            with pytest.raises(KeyboardInterrupt):
                train(train_config(max_train_steps=3))
    assert held == [os.getpid(), os.getpid()]  # this run held it while training
    assert f"took over {lock}: the run that left it (PID {dead} " in caplog.text
    assert not lock.exists()  # released after Ctrl-C
    with pytest.raises(ConfigError, match="NoSuchOptimizer"):  # and after an error while building
        train(train_config(optimizer_type="NoSuchOptimizer", overwrite=True))
    assert not lock.exists()
    train(train_config(max_train_steps=1, overwrite=True))
    assert not lock.exists()  # and after a finished run


def test_release_leaves_a_later_runs_lock_alone(tmp_path):
    first = OutputLock.acquire(tmp_path, "x")
    (tmp_path / "x.lock").unlink()  # e.g. deleted by hand, and a new run took the name
    second = OutputLock.acquire(tmp_path, "x")
    first.release()
    assert second.is_held()
    second.release()
    assert not (tmp_path / "x.lock").exists()


def test_only_rank_0_takes_the_lock(train_config, tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    assert output_lock.claim_output_name(train_config(), "123") is None
    assert not (tmp_path / "out" / "tiny.lock").exists()
    monkeypatch.setenv("RANK", "0")
    lock = output_lock.claim_output_name(train_config(), "123")
    assert lock is not None and lock.is_held()
    lock.release()


# --- is a process alive: lorakit.processes.pid_alive (its Windows branch: tests/test_processes.py)
def test_pid_alive_on_this_system(sleeper):
    assert pid_alive(os.getpid()) and pid_alive(sleeper.pid)
    assert not pid_alive(ended_pid())
    assert not pid_alive(0)


# --- another run's files ---------------------------------------------------------------------
def test_another_runs_lora_is_replaced_only_with_overwrite(train_config, tmp_path, monkeypatch):
    first = train(train_config(max_train_steps=1))
    before, first_session = first.read_bytes(), session_of(first)
    with monkeypatch.context() as m:
        m.setattr("lorakit.models.loader.load_base_model", lambda *a, **k: pytest.fail("model loaded"))
        with pytest.raises(
            ConfigError, match=r"tiny\.safetensors is the LoRA of another training run.*overwrite"
        ):
            train(train_config(max_train_steps=1))
    assert first.read_bytes() == before
    second = train(train_config(max_train_steps=1, overwrite=True))
    assert second == first and session_of(second) != first_session  # replaced by the new run


def test_a_lora_without_session_id_is_never_taken_for_this_runs(train_config, tmp_path, no_model_load):
    import torch
    from safetensors.torch import save_file

    (tmp_path / "out").mkdir()
    save_file({"x": torch.zeros(1)}, str(tmp_path / "out" / "tiny.safetensors"))  # e.g. no_metadata
    with pytest.raises(ConfigError, match=r"another training run \(no ss_session_id metadata"):
        train(train_config())


def test_a_resumed_run_keeps_its_session_and_replaces_its_own_files(train_config, tmp_path):
    common = dict(max_train_epochs=2, save_every_n_epochs=1, save_state=True, reg_data_dir=None)
    final = train(train_config(**common))
    session = session_of(final)
    out = tmp_path / "out"
    state = out / "tiny-000001-state"
    assert json.loads((state / "train_state.json").read_text())["session_id"] == session
    resumed = train(train_config(resume=str(state), **common))  # no overwrite needed
    assert session_of(resumed) == session == session_of(out / "tiny-000001.safetensors")


def test_a_state_saved_before_states_kept_the_session_takes_it_from_its_lora(train_config, tmp_path):
    import torch
    from safetensors.torch import save_file

    state = tmp_path / "out" / "tiny-000001-state"
    state.mkdir(parents=True)
    (state / "train_state.json").write_text('{"epoch": 1, "step": 4, "batch_in_epoch": 0, "seed": 1}')
    save_file(
        {"x": torch.zeros(1)}, str(tmp_path / "out" / "tiny-000001.safetensors"), {"ss_session_id": "42"}
    )
    assert output_lock.run_session_id(train_config(resume=str(state))) == "42"
    assert output_lock.run_session_id(train_config()) != "42"


def test_another_runs_state_is_not_left_beside_this_runs_lora(train_config, tmp_path, caplog):
    """Run 1 is stopped with save_state; run 2 (not resuming) is refused, or with overwrite removes it."""
    real, calls = Trainer.loss_of, []

    def ctrl_c_at_the_third_batch(self, batch, step):
        calls.append(step)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, batch, step)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(Trainer, "loss_of", ctrl_c_at_the_third_batch)
        with pytest.raises(KeyboardInterrupt):
            train(train_config(save_state=True, reg_data_dir=None))
    state = tmp_path / "out" / "tiny-state"
    assert state.is_dir()
    with pytest.raises(ConfigError, match=rf"tiny-state \(step 2\).*--resume {state}.*overwrite = true"):
        train(train_config(max_train_steps=1))
    assert state.is_dir()
    with caplog.at_level(logging.WARNING, logger="lorakit"):
        train(train_config(max_train_steps=1, overwrite=True))
    assert not state.exists()
    assert f"removed {state}, the saved state of another run" in caplog.text
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["tiny.safetensors"]


def test_overwrite_is_a_flag_and_a_toml_option():
    from lorakit.cli import build_parser
    from lorakit.cli.train import config_from_args

    args, _ = build_parser().parse_known_args(["train", "--overwrite"])
    assert config_from_args(args).output.overwrite is True
    assert "overwrite = true" in config_from_args(args).to_toml()
