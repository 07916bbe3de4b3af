"""Training metadata as kohya writes it: ss_epoch, modelspec.date, the legacy hash; built in train/."""

import ast
import datetime
import hashlib
import os
from pathlib import Path

from safetensors import safe_open

import lorakit.network
from lorakit.hashing import legacy_hash
from lorakit.train.metadata import kohya_epoch, modelspec
from lorakit.train.trainer import train


def metadata(path):
    with safe_open(str(path), "pt") as f:
        return f.metadata()


def test_kohya_epoch_is_the_epoch_a_save_falls_in():
    assert kohya_epoch(epochs_done=0, batch_in_epoch=1) == 1  # stopped inside the first epoch
    assert kohya_epoch(epochs_done=1, batch_in_epoch=0) == 1  # saved at the end of the first epoch
    assert kohya_epoch(epochs_done=2, batch_in_epoch=3) == 3


def test_a_run_stopped_in_its_first_epoch_says_epoch_1(train_config):
    # 4 images x 2 repeats / batch 2 = 4 batches an epoch: step 1 is inside epoch 1, step 6 inside epoch 2
    assert metadata(train(train_config(max_train_steps=1)))["ss_epoch"] == "1"
    meta = metadata(train(train_config(max_train_steps=6, overwrite=True)))
    assert (meta["ss_epoch"], meta["ss_steps"]) == ("2", "6")


def test_modelspec_date_has_whole_seconds_like_kohya(train_config):
    started = datetime.datetime(2024, 5, 6, 7, 8, 9, 987654).timestamp()
    date = modelspec(train_config(), started)["modelspec.date"]
    assert date == "2024-05-06T07:08:09"


def test_legacy_hash_of_a_file_and_of_its_bytes_agree(tmp_path):
    data = os.urandom(0x100000 + 0x20000)
    path = tmp_path / "model.safetensors"
    path.write_bytes(data)
    want = hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    assert legacy_hash(path) == legacy_hash(data) == want
    assert legacy_hash(b"tiny") == "e3b0c442"  # under 1 MiB: the empty window, as kohya's files show


def test_the_network_layer_does_not_depend_on_the_training_config():
    for file in Path(lorakit.network.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                assert node.module not in ("config", "lorakit.config"), file
                assert not (node.module or "").startswith(("train", "lorakit.train")), file
