"""The background training job: a process of its own, its status/progress files, Stop and Resume."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from safetensors import safe_open

from lorakit import processes
from lorakit.config import TrainConfig
from lorakit.errors import ConfigError, TrainingError
from lorakit.testing import make_dataset, make_tiny_base
from lorakit.train.job import HEARTBEAT_FILE, find_jobs, latest_job, start_job

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("job")
    base = make_tiny_base(root / "tiny.safetensors")
    train_dir, reg_dir = make_dataset(root / "data", n_train=4, n_reg=2, repeats=2)
    return root, base, train_dir, reg_dir


def config(root: Path, base: Path, train_dir: Path, **over) -> TrainConfig:
    flat = {
        "pretrained_model_name_or_path": str(base),
        "train_data_dir": str(train_dir),
        "resolution": "64",
        "output_dir": str(root / "out"),
        "output_name": "job",
        "network_dim": 2,
        "network_alpha": 2,
        "learning_rate": 1e-3,
        "max_train_steps": 6,
        "train_batch_size": 2,
        "progress_every_n_steps": 2,
        "seed": 1,
    }
    flat.update(over)
    return TrainConfig.from_dict(flat)


def wait_for(cond, timeout: float, what: str):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = cond()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_job_runs_to_the_end(tiny):
    root, base, train_dir, _ = tiny
    runs = root / "runs"
    job = start_job(config(root, base, train_dir), runs, sample_prompts_text="usu bear --s 2 --w 64 --h 64")
    assert job.status()["state"] == "running" and job.status()["pid"]
    assert latest_job(runs) == job
    st = job.wait(timeout=180)
    assert st["state"] == "done", (st, job.log_text())
    lora = Path(st["lora_path"])
    assert lora == root / "out" / "job.safetensors" and lora.is_file()
    with safe_open(str(lora), "pt") as f:
        assert f.metadata()["ss_steps"] == "6"
    rows = job.progress()
    assert [r["step"] for r in rows] == [2, 4, 6]
    assert all(r["total_steps"] == 6 and r["loss"] > 0 and "eta_s" in r for r in rows)
    cfg = job.config()  # the run folder's config.toml is the CLI's TOML
    assert cfg.output.save_state and Path(cfg.dataset.train_data_dir).is_absolute()
    assert (root / "out" / "job-state").is_dir()
    assert "LoRA saved" in job.log_text()
    assert job.samples() == []  # no sample_every_n_*: the prompts file is written but not drawn
    assert (job.run_dir / "sample_prompts.txt").read_text().startswith("usu bear")


def test_stop_then_resume_finishes(tiny):
    root, base, train_dir, _ = tiny
    runs = root / "runs-stop"
    cfg = config(root, base, train_dir, output_name="long", max_train_steps=100000, progress_every_n_steps=1)
    job = start_job(cfg, runs)
    with pytest.raises(TrainingError, match="stop it first"):  # one run at a time
        start_job(cfg, runs)
    wait_for(lambda: len(job.progress()) >= 3, 180, "three progress reports")
    job.stop()
    st = job.wait(timeout=60)
    assert st["state"] == "stopped", (st, job.log_text())
    state = root / "out" / "long-state"
    assert (state / "train_state.json").is_file() and (state / "network.safetensors").is_file()
    stopped_at = job.progress()[-1]["step"]
    assert not (root / "out" / "long.safetensors").exists()

    # Resume with a reachable end: edit the step count in the stopped run's config as a user would.
    (job.run_dir / "config.toml").write_text(
        (job.run_dir / "config.toml").read_text().replace("max_train_steps = 100000", "max_train_steps = 12")
    )
    resumed = job.resume()
    assert resumed.config().output.resume == str(state)
    assert resumed.info["resumed_from"] == str(job.run_dir)
    st = resumed.wait(timeout=180)
    assert st["state"] == "done", (st, resumed.log_text())
    rows = resumed.progress()
    assert rows[0]["step"] > stopped_at - 1 and rows[-1]["step"] == 12
    chain = resumed.progress(with_previous=True)
    assert chain[0]["step"] == 1 and chain[-1]["step"] == 12
    assert [j.name for j in find_jobs(runs)] == [job.name, resumed.name]


def test_stop_file_alone_stops_and_resumes_as_on_windows(tiny, monkeypatch):
    """Windows' Stop: no signal at all, only the stop file, which the trainer polls at each step.
    Folders with spaces and Japanese names, as Windows users have them."""
    root, base, train_dir, _ = tiny
    out, runs = root / "出力 フォルダ", root / "ジョブ runs"
    cfg = config(root, base, train_dir, output_dir=str(out), output_name="usu クマ", max_train_steps=100000)
    cfg.update({"progress_every_n_steps": 1})
    job = start_job(cfg, runs)
    beat = job.run_dir / HEARTBEAT_FILE
    first_beat = beat.stat().st_mtime_ns  # the parent's, at start
    wait_for(lambda: len(job.progress()) >= 2, 180, "two progress reports")
    wait_for(lambda: beat.stat().st_mtime_ns > first_beat, 30, "a heartbeat from the child")

    sent = []
    with monkeypatch.context() as m:
        m.setattr(processes, "WINDOWS", True)  # Stop takes the Windows branch...
        m.setattr(os, "kill", lambda pid, sig: sent.append(sig))  # ...and could not signal anyway
        job.stop()
        st = job.wait(timeout=60)
    assert sent == []
    assert st["state"] == "stopped" and "the state was saved" in st["message"], (st, job.log_text())
    assert "stop requested (stop_requested)" in job.log_text()
    state = out / "usu クマ-state"
    assert (state / "train_state.json").is_file() and job.resumable_state() == state
    stopped_at = json.loads((state / "train_state.json").read_text())["step"]

    (job.run_dir / "config.toml").write_text(
        (job.run_dir / "config.toml")
        .read_text()
        .replace("max_train_steps = 100000", f"max_train_steps = {stopped_at + 2}")
    )
    st = job.resume().wait(timeout=180)
    assert st["state"] == "done", st
    assert st["lora_path"] == str(out / "usu クマ.safetensors") and Path(st["lora_path"]).is_file()


def test_bad_folder_ends_in_error_with_the_message(tiny):
    root, base, train_dir, _ = tiny
    bad = root / "bad"
    (bad / "usu bear").mkdir(parents=True)  # no <repeats>_ prefix
    job = start_job(config(root, base, bad, output_name="bad"), root / "runs-bad")
    st = job.wait(timeout=120)
    assert st["state"] == "error"
    assert "folder names must be <repeats>_<prompt>" in st["message"]
    assert "Traceback" not in job.log_text()


def test_config_errors_raise_before_a_process_starts(tiny, tmp_path):
    root, base, train_dir, _ = tiny
    with pytest.raises(ConfigError, match="train_data_dir is not set"):
        start_job(config(root, base, ""), tmp_path / "runs")
    assert find_jobs(tmp_path / "runs") == []


def test_a_dead_process_is_reported(tiny, tmp_path):
    root, base, train_dir, _ = tiny
    job = start_job(config(root, base, train_dir, output_name="dead"), tmp_path / "runs")
    job.kill()
    st = job.wait(timeout=30)
    assert st["state"] == "stopped" and "nothing was saved" in st["message"]
    assert not os.path.exists(root / "out" / "dead.safetensors")
    with pytest.raises(TrainingError, match="nothing to resume"):
        job.resume()
