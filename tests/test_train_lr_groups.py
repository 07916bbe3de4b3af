"""Optimizer groups per trained part: unset part lr = learning_rate, a given value, or 0 = not trained."""

import pytest
from safetensors.torch import load_file

from lorakit.errors import ConfigError
from lorakit.train.trainer import build_trainer, train


@pytest.mark.parametrize(
    ("unet_lr", "text_encoder_lr", "want_unet", "want_te"),
    [
        (None, None, 1e-3, 1e-3),  # both fall back to learning_rate (1e-3 in train_config)
        (5e-4, 2e-4, 5e-4, 2e-4),
        (None, 0, 1e-3, None),  # 0 is not "unset": the text-encoder LoRA is not trained
        (0, 3e-4, None, 3e-4),
    ],
)
def test_each_part_gets_its_own_group_and_lr(train_config, unet_lr, text_encoder_lr, want_unet, want_te):
    tr = build_trainer(train_config(unet_lr=unet_lr, text_encoder_lr=text_encoder_lr))
    groups = tr.optimizer.optimizer.param_groups
    want = [(is_te, lr) for is_te, lr in ((False, want_unet), (True, want_te)) if lr is not None]
    assert [g["lr"] for g in groups] == [lr for _, lr in want]
    for g, (is_te, _) in zip(groups, want):
        part = tr.network.parameters(is_te=is_te)
        assert part and [id(p) for p in g["params"]] == [id(p) for p in part]
    te_modules, unet_modules = tr.network.counts
    assert (te_modules > 0, unet_modules > 0) == (want_te is not None, want_unet is not None)


def test_text_encoder_lr_zero_trains_only_the_unet_and_allows_the_text_cache(train_config):
    cfg = train_config(text_encoder_lr=0, cache_text_encoder_outputs=True, max_train_steps=1)
    tr = build_trainer(cfg)
    assert tr.te_cache  # captions were encoded once, through the frozen text encoder
    keys = load_file(str(tr.run()))
    assert keys and all(k.startswith("lora_unet_") for k in keys)


def test_unet_lr_zero_writes_only_text_encoder_modules(train_config):
    keys = load_file(str(train(train_config(unet_lr=0, max_train_steps=1))))
    assert keys and all(k.startswith("lora_te_") for k in keys)


@pytest.mark.parametrize(
    ("opts", "match"),
    [
        ({"learning_rate": 0}, "learning_rate must be a number above 0"),
        ({"learning_rate": -1e-4}, "learning_rate must be a number above 0"),
        ({"learning_rate": "nan"}, "learning_rate must be a number above 0"),
        ({"unet_lr": -1e-4}, "unet_lr must be 0"),
        ({"text_encoder_lr": float("inf")}, "text_encoder_lr must be 0"),
        ({"unet_lr": 0, "text_encoder_lr": 0}, "nothing to train"),
        ({"unet_lr": 0, "network_train_unet_only": True}, "nothing to train"),
    ],
)
def test_bad_learning_rates_are_refused_before_loading(train_config, opts, match):
    with pytest.raises(ConfigError, match=match):
        train_config(**opts).validate()
