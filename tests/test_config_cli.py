"""The typed config as TOML and CLI flags fill it; errors name the option and suggest the right one."""

import subprocess
import sys

import pytest

from lorakit.cli import build_parser, main
from lorakit.cli.train import config_from_args
from lorakit.config import TrainConfig, field_index
from lorakit.errors import ConfigError


def test_defaults_are_kohyas():
    c = TrainConfig()
    assert (c.network.network_dim, c.network.network_alpha) == (4, 1.0)
    assert c.dataset.caption_extension == ".caption"
    assert (c.dataset.min_bucket_reso, c.dataset.max_bucket_reso, c.dataset.bucket_reso_steps) == (
        256,
        1024,
        64,
    )
    assert c.training.optimizer_type == "AdamW" and c.training.lr_scheduler == "constant"
    assert c.training.max_train_steps == 1600 and c.training.max_grad_norm == 1.0
    assert c.output.output_name == "last" and c.dataset.prior_loss_weight == 1.0


def test_toml_flat_and_sectioned_keys(tmp_path):
    f = tmp_path / "x.toml"
    f.write_text(
        'network_dim = 16\n[whatever]\nlearning_rate = 5e-4\n[dataset]\nflip_aug = true\nresolution = "768"\n'
    )
    c = TrainConfig.from_toml(f)
    assert c.network.network_dim == 16 and c.training.learning_rate == 5e-4 and c.dataset.flip_aug


def test_unknown_toml_key_suggests(tmp_path):
    f = tmp_path / "x.toml"
    f.write_text("netwrk_dim = 16\n")
    with pytest.raises(ConfigError, match=r"x.toml: unknown option 'netwrk_dim'.*'network_dim'"):
        TrainConfig.from_toml(f)


def test_bad_values_name_the_option(tmp_path):
    with pytest.raises(ConfigError, match="'network_dim' = 'abc'"):
        TrainConfig.from_dict({"network_dim": "abc"})
    with pytest.raises(ConfigError, match="mixed_precision.*no, fp16, bf16"):
        TrainConfig.from_dict({"mixed_precision": "fp8"})
    with pytest.raises(ConfigError, match="resolution"):
        TrainConfig.from_dict(
            {"resolution": "big", "pretrained_model_name_or_path": "x", "train_data_dir": "y"}
        ).validate()
    f = tmp_path / "bad.toml"
    f.write_text("network_dim = [")
    with pytest.raises(ConfigError, match="bad.toml: not valid TOML"):
        TrainConfig.from_toml(f)


def test_flags_override_toml(tmp_path):
    f = tmp_path / "x.toml"
    f.write_text("network_dim = 16\nnetwork_alpha = 8\nflip_aug = true\n")
    args = build_parser().parse_args(
        [
            "train",
            "--config",
            str(f),
            "--network_dim",
            "32",
            "--no-flip_aug",
            "--optimizer_args",
            "weight_decay=0.1",
        ]
    )
    c = config_from_args(args)
    assert c.network.network_dim == 32 and c.network.network_alpha == 8.0
    assert c.dataset.flip_aug is False and c.training.optimizer_args == ["weight_decay=0.1"]


def test_network_args_fold_into_conv_fields():
    c = TrainConfig.from_dict({"network_args": ["conv_dim=8", "conv_alpha=4"]})
    assert c.network.conv_dim == 8 and c.network.conv_alpha == 4.0
    with pytest.raises(ConfigError, match="unsupported key 'block_size'"):
        TrainConfig.from_dict({"network_args": ["block_size=4"]})
    # LyCORIS's keys fold too; networks.lora refuses them when the config is validated
    c = TrainConfig.from_dict(
        {"pretrained_model_name_or_path": "m", "train_data_dir": "d", "network_args": ["algo=lokr"]}
    )
    assert c.network.algo == "lokr"
    with pytest.raises(ConfigError, match="need network_module = lycoris.kohya"):
        c.validate()


def test_toml_round_trip():
    c = TrainConfig.from_dict(
        {"network_dim": 12, "reg_data_dir": "reg", "optimizer_args": ["a=1"], "seed": 3}
    )
    import tomllib

    back = TrainConfig.from_dict({k: v for t in tomllib.loads(c.to_toml()).values() for k, v in t.items()})
    assert back == c


def test_unknown_flag_suggests(capsys):
    assert main(["train", "--network_dimm", "8"]) == 2
    err = capsys.readouterr().err
    assert "unknown option 'network_dimm'" in err and "'network_dim'" in err


def test_help_explains_every_option_without_importing_torch():
    code = (
        "import sys, io, contextlib\n"
        "from lorakit.cli import main\n"
        "buf = io.StringIO()\n"
        "with contextlib.redirect_stdout(buf):\n"
        "    try: main(['train', '--help'])\n"
        "    except SystemExit: pass\n"
        "print('TORCH' if 'torch' in sys.modules else 'NOTORCH')\n"
        "print(buf.getvalue())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.startswith("NOTORCH")
    flat = " ".join(out.split())  # argparse wraps lines
    for name, (_, f) in field_index().items():
        assert f"--{name}" in out, name
        assert " ".join(f.metadata["help"].split()) in flat, name


def test_missing_required_options_are_named():
    with pytest.raises(ConfigError, match="pretrained_model_name_or_path is not set"):
        TrainConfig().validate()
    with pytest.raises(ConfigError, match="train_data_dir is not set"):
        TrainConfig.from_dict({"pretrained_model_name_or_path": "m.safetensors"}).validate()
