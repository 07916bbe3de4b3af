"""Data-parallel training: 2 CPU processes with gloo, launched as users launch it (accelerate launch)."""

import subprocess
import sys

import pytest
from safetensors import safe_open


@pytest.mark.slow
def test_two_processes_split_the_data_and_stay_in_sync(tiny_base, tiny_data, tmp_path):
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29531",
        "-m",
        "lorakit",
        "train",
        "--pretrained_model_name_or_path",
        str(tiny_base),
        "--train_data_dir",
        str(tiny_data[0]),
        "--reg_data_dir",
        str(tiny_data[1]),
        "--resolution",
        "64",
        "--output_dir",
        str(out),
        "--max_train_epochs",
        "2",
        "--train_batch_size",
        "2",
        "--learning_rate",
        "1e-3",
        "--seed",
        "5",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    # the trainer gathers a fingerprint of every rank's weights and fails if they differ
    assert "diverged" not in r.stderr
    assert r.stdout.count("LoRA saved") == 1
    with safe_open(str(out / "last.safetensors"), "pt") as f:
        meta = f.metadata()
    # 8 train + 8 reg samples = 8 batches of 2; each of 2 ranks takes 4 per epoch
    assert meta["ss_num_batches_per_epoch"] == "4"
    assert meta["ss_steps"] == "8"
    assert meta["ss_total_batch_size"] == "4"
