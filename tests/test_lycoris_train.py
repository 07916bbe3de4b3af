"""Training LyCORIS networks (lycoris.kohya: LoHa, LoKr, DoRA): the files are what lycoris-lora writes.

lycoris-lora is the reference here only (lorakit does not import it): its kohya network gives the
expected keys, shapes and alphas, its functional code the expected ΔW, and its loader must accept
our files.
"""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file

from lorakit.config import TrainConfig
from lorakit.errors import ConfigError
from lorakit.models.loader import load_base_model
from lorakit.network.lora import LoRANetwork
from lorakit.network.lycoris import LycorisNetwork, build_network, factorization
from lorakit.train.trainer import build_trainer, train

lk = pytest.importorskip("lycoris.kohya", reason="lycoris-lora is the reference for these tests")
from lycoris.functional import general as lyco_general  # noqa: E402
from lycoris.functional import locon as lyco_locon  # noqa: E402
from lycoris.functional import loha as lyco_loha  # noqa: E402
from lycoris.functional import lokr as lyco_lokr  # noqa: E402

LINEAR = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"  # 32x32
FF = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_0_proj"  # 256x32
CONV = "lora_unet_down_blocks_0_resnets_0_conv1"  # 32x32x3x3
CONV_OUT = "lora_unet_conv_out"  # 4x32x3x3: LyCORIS's `full` preset adds it by name
TE = "lora_te_text_model_encoder_layers_0_mlp_fc1"  # 64x32

CASES = {
    "loha": ["algo=loha", "conv_dim=4", "conv_alpha=2"],
    "loha-attn-mlp": ["algo=loha", "preset=attn-mlp"],
    "lokr": ["algo=lokr", "conv_dim=4"],
    "lokr-factor-decompose": ["algo=lokr", "factor=4", "decompose_both=True"],
    "locon-dora": ["algo=locon", "dora_wd=True", "conv_dim=2"],
    "loha-dora": ["algo=loha", "dora_wd=True"],
    "lokr-dora-input-axis": ["algo=lokr", "dora_wd=True", "wd_on_output=False"],
    "loha-tucker": ["algo=loha", "use_tucker=True", "conv_dim=4"],
    "lokr-tucker": ["algo=lokr", "use_tucker=True", "conv_dim=2"],  # rank 2 < 8/2: w2 split, so Tucker
    "locon-tucker": ["algo=locon", "use_cp=True", "conv_dim=4"],
}


def network_config(args, dim=8, alpha=4):
    flat = {
        "network_module": "lycoris.kohya",
        "network_dim": dim,
        "network_alpha": alpha,
        "network_args": args,
    }
    return TrainConfig.from_dict(flat, source="test").network


def our_network(tiny_base, args, dim=8, alpha=4):
    base = load_base_model(str(tiny_base))
    roots = {"unet": base.unet, "te": base.text_encoder}
    return base, build_network(network_config(args, dim, alpha), base.spec, base, roots, {"unet", "te"})


@pytest.fixture
def lycoris_presets(monkeypatch):
    """lycoris-lora 4.1.3 lists diffusers' "TimestepEmbedding" class (for Anima) in its presets: in
    `full` that names time_embedding.linear_1/2 a second time (its own duplicate-name assertion fails),
    in `attn-mlp` it adds them beyond kohya's targets, which LyCORIS 3.x and lorakit's attn-mlp do not.
    The reference here is the presets without that class entry."""
    for key in ("full", "attn-mlp"):
        preset = dict(lk.PRESET[key])
        preset["unet_target_module"] = [m for m in preset["unet_target_module"] if m != "TimestepEmbedding"]
        monkeypatch.setitem(lk.PRESET, key, preset)


def lycoris_reference(tiny_base, args, dim=8, alpha=4) -> dict[str, torch.Tensor]:
    """The state dict lycoris.kohya's create_network saves for the same model and network_args; its TE
    names follow the installed transformers' module paths, mapped to kohya's fixed ones."""
    base = load_base_model(str(tiny_base))
    kwargs = dict(a.split("=", 1) for a in args)
    net = lk.create_network(1.0, dim, alpha, None, base.text_encoder, base.unet, **kwargs)
    net.apply_to(base.text_encoder, base.unet, True, True)
    return {
        k.replace("lora_te_encoder_", "lora_te_text_model_encoder_"): v for k, v in net.state_dict().items()
    }


def randomise(net, seed=0):
    """Non-zero values on every trainable tensor (an untrained ΔW is 0 and would compare trivially)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if p.dim() and p.shape[-1] == 1 else 0))


# --- the file: keys, shapes, alpha ------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_file_keys_shapes_and_alphas_equal_lycoris(tiny_base, lycoris_presets, case):
    args = CASES[case]
    _, net = our_network(tiny_base, args)
    ours = net.kohya_state_dict()
    ref = lycoris_reference(tiny_base, args)
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in ref.items()}
    alphas = {k: float(v) for k, v in ours.items() if k.endswith(".alpha")}
    assert alphas == {k: float(v) for k, v in ref.items() if k.endswith(".alpha")}
    # the modules the assertions below look at are there, in the expected form
    algo = args[0].split("=")[1]
    names = {k.split(".")[0] for k in ours}
    assert {LINEAR, TE} <= names
    assert (CONV in names and CONV_OUT in names) == ("preset=attn-mlp" not in args)
    if algo == "loha":
        assert ours[f"{LINEAR}.hada_w1_a"].shape == (32, 8) and ours[f"{LINEAR}.hada_w2_b"].shape == (8, 32)
    if "dora_wd=True" in args:
        axis = (1, 32) if "wd_on_output=False" in args else (32, 1)
        assert ours[f"{LINEAR}.dora_scale"].shape == axis


def test_lokr_factorisation_and_forced_alpha(tiny_base):
    """32 -> (4, 8): rank 8 >= 8/2 makes w2 a full matrix, w1 is full too -> alpha stored as the rank."""
    assert factorization(32) == (4, 8) and factorization(256) == (16, 16) and factorization(320, 8) == (8, 40)
    assert factorization(1280) == (32, 40) and factorization(127) == (1, 127)
    # and LyCORIS's own function everywhere (peft's differs where factor > sqrt(dim), e.g. 8 by 4)
    assert all(
        factorization(d, f) == lyco_general.factorization(d, f)
        for d in range(1, 1400)
        for f in (-1, 2, 3, 4, 8, 16, 64)
    )
    _, net = our_network(tiny_base, ["algo=lokr"], dim=2, alpha=1)
    sd = net.kohya_state_dict()
    # rank 2 < 8/2: w2 is split (w2_a (8, 2), w2_b (2, 8)), alpha stays 1
    assert sd[f"{LINEAR}.lokr_w1"].shape == (4, 4) and sd[f"{LINEAR}.lokr_w2_a"].shape == (8, 2)
    assert float(sd[f"{LINEAR}.alpha"]) == 1.0
    # the conv's kernel goes into w2_b: (2, 8*3*3)
    assert sd[f"{CONV}.lokr_w2_b"].shape == (2, 72)
    _, full = our_network(tiny_base, ["algo=lokr"], dim=8, alpha=1)
    sd = full.kohya_state_dict()
    assert sd[f"{LINEAR}.lokr_w2"].shape == (8, 8) and float(sd[f"{LINEAR}.alpha"]) == 8.0


# --- ΔW and the forward -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "case", ["loha", "lokr", "lokr-factor-decompose", "locon-dora", "loha-dora", "lokr-tucker"]
)
def test_untrained_network_leaves_the_model_unchanged(tiny_base, case):
    """LyCORIS's init makes ΔW 0; DoRA's dora_scale = ‖W‖ makes its rescale the identity (up to eps)."""
    base, net = our_network(tiny_base, CASES[case])
    for name, module in net.modules.items():
        w = module.org[0].weight
        assert module.delta().abs().max() <= 1e-6 * max(1.0, w.abs().max().item()), name


@pytest.mark.parametrize("case", ["loha", "lokr-dora-input-axis", "locon-dora"])
def test_multiplier_scales_the_change_and_zero_is_the_base(tiny_base, case):
    base, net = our_network(tiny_base, CASES[case])
    randomise(net, seed=5)
    full = {name: m.delta() for name, m in net.modules.items()}
    net.set_multiplier(0.5)
    for name, m in net.modules.items():
        torch.testing.assert_close(m.delta(), 0.5 * full[name], msg=name)
    net.set_multiplier(0.0)
    org = net.modules[LINEAR].org[0]
    x = torch.randn(3, 32)
    with torch.no_grad():
        torch.testing.assert_close(org(x), F.linear(x, org.weight, org.bias))


def test_dropouts_act_in_training_steps_only(tiny_base):
    """rank_dropout zeroes output rows of ΔW, module_dropout skips the module: with gradients on and the
    module training; never while sampling or measuring (no_grad) or in eval mode."""
    base, net = our_network(tiny_base, ["algo=loha", "rank_dropout=0.5", "module_dropout=0.5"])
    randomise(net, seed=6)
    module = net.modules[FF]  # 256 output rows
    org = module.org[0]
    with torch.no_grad():
        full = module.delta()
    assert (full.abs().sum(1) > 0).all()
    torch.manual_seed(0)
    dropped = module.delta()
    zero_rows = (dropped.abs().sum(1) == 0).sum().item()
    assert 64 < zero_rows < 192  # about half of 256
    kept = dropped.abs().sum(1) > 0
    torch.testing.assert_close(dropped[kept], full[kept])  # no rescaling, as LyCORIS under kohya
    x = torch.randn(2, 32)
    base_out = F.linear(x, org.weight, org.bias)
    skipped = [torch.equal(org(x), base_out) for _ in range(40)]
    assert 5 < sum(skipped) < 35
    with torch.no_grad():
        assert not any(torch.equal(org(x), base_out) for _ in range(10))
    module.eval()
    assert not any(torch.equal(org(x), base_out) for _ in range(10))


def test_rank_dropout_routes_plain_locon_to_the_lycoris_module(tiny_base):
    _, net = our_network(tiny_base, ["algo=locon", "rank_dropout=0.1"])
    assert isinstance(net, LycorisNetwork)
    assert {k.split(".", 1)[1] for k in net.kohya_state_dict()} == {
        "lora_down.weight",
        "lora_up.weight",
        "alpha",
    }


def reference_delta(sd: dict, name: str, weight: torch.Tensor, wd_on_output: bool = True) -> torch.Tensor:
    """W' - W from the saved tensors of module `name`, by lycoris-lora's functional code."""

    def get(key):
        return sd.get(f"{name}.{key}")

    alpha = float(get("alpha"))
    if get("hada_w1_a") is not None:
        rank = get("hada_w1_b").shape[0]
        diff = lyco_loha.diff_weight(
            get("hada_w1_b"),
            get("hada_w1_a"),
            get("hada_w2_b"),
            get("hada_w2_a"),
            get("hada_t1"),
            get("hada_t2"),
            gamma=alpha / rank,
        ).reshape(weight.shape)
    elif get("lokr_w1") is not None or get("lokr_w1_a") is not None:  # gamma is alpha: it divides by rank
        keys = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
        weights = [get(k) for k in keys]
        if get("lokr_t2") is None:
            diff = lyco_lokr.diff_weight(*weights, None, gamma=alpha)
        else:  # diff_weight takes the rank from w2_a.shape[1], the output factor in Tucker form: as the module
            diff = lyco_lokr.kron_weight(*weights, get("lokr_t2"), scale=alpha / get("lokr_t2").shape[0])
        diff = diff.reshape(weight.shape)
    else:
        down, up = get("lora_down.weight"), get("lora_up.weight")
        diff = lyco_locon.diff_weight(down, up, get("lora_mid.weight"), gamma=alpha / down.shape[0]).reshape(
            weight.shape
        )
    if get("dora_scale") is None:
        return diff
    return lyco_general.weight_decompose(weight + diff, get("dora_scale"), 1, wd_on_output) - weight


@pytest.mark.parametrize("case", list(CASES))
def test_forward_is_w_x_plus_lycoris_delta(tiny_base, case):
    args = CASES[case]
    base, net = our_network(tiny_base, args)
    randomise(net)
    sd = net.kohya_state_dict()
    wd_on_output = "wd_on_output=False" not in args
    g = torch.Generator().manual_seed(1)
    names = [LINEAR, FF, TE] + ([CONV, CONV_OUT] if "preset=attn-mlp" not in args else [])
    for name in names:
        org = net.modules[name].org[0]
        w = org.weight.detach()
        delta = reference_delta(sd, name, w, wd_on_output)
        assert delta.abs().max() > 1e-3, name  # randomised: a real change to compare
        if isinstance(org, torch.nn.Conv2d):
            x = torch.randn(2, w.shape[1], 8, 8, generator=g)
            want = F.conv2d(x, w + delta, org.bias, org.stride, org.padding)
        else:
            x = torch.randn(3, w.shape[1], generator=g)
            want = F.linear(x, w + delta, org.bias)
        with torch.no_grad():
            got = org(x)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=name)


@pytest.mark.parametrize(
    "case",
    [
        "loha",
        "lokr",
        "lokr-factor-decompose",
        "locon-dora",
        "loha-dora",
        "loha-tucker",
        "locon-tucker",
    ],
)
def test_lycoris_loader_reads_our_file_to_the_same_outputs(tiny_base, case):
    """lycoris.kohya's create_network_from_weights (what kohya-side tools load LyCORIS files with) picks
    the algo from the keys, infers rank/factor and gives the same module outputs as ours. (Not for a
    Tucker LoKr: lycoris-lora 4.1.3's LokrModule.make_module_from_state_dict reads the rank from
    lokr_w2_a.size(1), which in Tucker form is the output factor, and fails on its own files too.)"""
    base, net = our_network(tiny_base, CASES[case])
    randomise(net, seed=2)
    sd = net.kohya_state_dict()
    fresh = load_base_model(str(tiny_base))
    unet_sd = {k: v for k, v in sd.items() if k.startswith("lora_unet_")}
    ref, _ = lk.create_network_from_weights(1.0, None, None, None, fresh.unet, weights_sd=unet_sd)
    ref.apply_to(None, fresh.unet, False, True)
    assert len(ref.unet_loras) == sum(not t.is_te for t in net.targets)
    g = torch.Generator().manual_seed(3)
    for name in (LINEAR, FF, CONV, CONV_OUT):
        org = net.modules[name].org[0]
        path = next(t.path for t in net.targets if t.name == name)
        theirs = fresh.unet.get_submodule(path)
        shape = (
            (2, org.weight.shape[1], 8, 8) if isinstance(org, torch.nn.Conv2d) else (3, org.weight.shape[1])
        )
        x = torch.randn(shape, generator=g)
        with torch.no_grad():
            torch.testing.assert_close(org(x), theirs(x), rtol=1e-4, atol=1e-4, msg=name)


# --- training, saving, resuming ------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["algo=loha", "conv_dim=2", "conv_alpha=1"],
        ["algo=lokr", "factor=4", "module_dropout=0.05"],
        ["algo=locon", "dora_wd=True", "conv_dim=2"],
    ],
    ids=["loha", "lokr", "locon-dora"],
)
def test_training_lowers_the_loss_and_saves_a_lycoris_file(train_config, args):
    cfg = train_config(
        network_module="lycoris.kohya",
        network_args=args,
        max_train_steps=12,
        learning_rate=3e-3,
        cache_latents=True,
        network_dim=4,
        network_alpha=4,
        reg_data_dir=None,
        save_precision="float",
    )
    tr = build_trainer(cfg)
    assert isinstance(tr.network, LycorisNetwork)
    before = tr.mean_loss()
    path = tr.run()
    after = tr.mean_loss()
    assert after < 0.95 * before, (before, after)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_module"] == "lycoris.kohya"
    written = json.loads(meta["ss_network_args"])
    assert all(isinstance(v, str) for v in written.values())
    assert written["algo"] == args[0].split("=")[1] and written["conv_dim"] == (
        "2" if "conv_dim=2" in args else "4"
    )
    if "dora_wd=True" in args:
        assert written["dora_wd"] == "True" and written["wd_on_output"] == "True"
    if "module_dropout=0.05" in args:
        assert written["module_dropout"] == "0.05"
    saved = load_file(str(path))
    assert saved.keys() == tr.network.kohya_state_dict().keys()

    # network_weights: a new run starts from the file's values
    resumed = build_trainer(
        train_config(
            network_module="lycoris.kohya",
            network_args=args,
            network_dim=4,
            network_alpha=4,
            network_weights=str(path),
            output_name="resumed",
        )
    )
    again = resumed.network.kohya_state_dict()
    assert again.keys() == saved.keys()
    for k, v in saved.items():
        assert torch.equal(again[k], v), k


def test_lokr_metadata_names_factor(train_config):
    from lorakit.train.metadata import lycoris_network_args

    n = network_config(["algo=lokr", "conv_dim=8", "conv_alpha=4"])
    assert lycoris_network_args(n) == {
        "algo": "lokr",
        "preset": "full",
        "conv_dim": "8",
        "conv_alpha": "4",
        "factor": "-1",
        "decompose_both": "False",
    }
    assert lycoris_network_args(network_config(["algo=loha", "preset=attn-mlp"])) == {
        "algo": "loha",
        "preset": "attn-mlp",
    }
    dora = lycoris_network_args(
        network_config(["algo=locon", "use_cp=True", "dora_wd=True", "wd_on_output=False"])
    )
    assert dora == {
        "algo": "locon",
        "preset": "full",
        "conv_dim": "8",  # LyCORIS's default: network_dim / network_alpha
        "conv_alpha": "4",
        "use_tucker": "True",
        "dora_wd": "True",
        "wd_on_output": "False",
    }


def test_disk_estimate_counts_lycoris_convs_and_loha_pairs():
    from lorakit.train.preflight import estimated_lora_params

    def params(**flat):
        return estimated_lora_params(TrainConfig.from_dict({"network_dim": 8, **flat}))

    lora = params()
    assert params(network_module="lycoris.kohya", network_args=["preset=attn-mlp"]) == lora
    locon = params(network_module="lycoris.kohya")  # full preset: convs at network_dim
    assert locon == params(conv_dim=8) > lora
    assert params(network_module="lycoris.kohya", network_args=["algo=loha"]) == 2 * locon


def test_plain_locon_stays_on_peft_lora_with_lycoris_targets(tiny_base, lycoris_presets):
    """algo=locon without DoRA: peft's LoRA layers already write a LyCORIS LoCon file."""
    _, net = our_network(tiny_base, ["algo=locon", "conv_dim=4", "conv_alpha=2"])
    assert isinstance(net, LoRANetwork)
    ours = net.kohya_state_dict()
    ref = lycoris_reference(tiny_base, ["algo=locon", "conv_dim=4", "conv_alpha=2"])
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in ref.items()}
    assert {k: float(v) for k, v in ours.items() if k.endswith("alpha")} == {
        k: float(v) for k, v in ref.items() if k.endswith("alpha")
    }


def test_network_weights_of_another_algo_is_a_clear_error(train_config):
    from lorakit.errors import ModelError

    cfg = train_config(
        network_module="lycoris.kohya", network_args=["algo=loha"], max_train_steps=1, reg_data_dir=None
    )
    path = train(cfg)
    with pytest.raises(ModelError, match="does not fit this lokr network"):
        build_trainer(
            train_config(
                network_module="lycoris.kohya",
                network_args=["algo=lokr"],
                network_weights=str(path),
                output_name="b",
            )
        )


# --- config -------------------------------------------------------------------------------------


def test_network_args_fold_into_typed_fields():
    n = network_config(
        [
            "algo=LoKr",
            "factor=8",
            "decompose_both=True",
            "dora_wd=true",
            "wd_on_output=False",
            "use_cp=False",
            "preset=attn-mlp",
            "dropout=0",
        ]
    )
    assert (n.algo, n.factor, n.decompose_both, n.dora_wd, n.wd_on_output, n.lycoris_preset) == (
        "lokr",
        8,
        True,
        True,
        False,
        "attn-mlp",
    )
    assert n.network_args == []


@pytest.mark.parametrize(
    "flat, message",
    [
        ({"network_args": ["algo=glora"]}, "must be one of lora, locon, loha, lokr"),
        ({"network_args": ["preset=attn-only"]}, "must be one of full, attn-mlp"),
        ({"network_args": ["dropout=0.1"]}, "does not implement dropout .*bypass_mode"),
        ({"network_args": ["rank_dropout=x"]}, "rank_dropout"),
        (
            {"network_args": ["block_size=4"]},
            "unsupported key 'block_size'; lorakit knows conv_dim, conv_alpha, algo",
        ),
        ({"network_args": ["factor=x"]}, "factor"),
    ],
)
def test_bad_network_args_are_config_errors(flat, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig.from_dict({"network_module": "lycoris.kohya", **flat})


def validated(**flat):
    cfg = TrainConfig.from_dict({"pretrained_model_name_or_path": "m", "train_data_dir": "d", **flat})
    cfg.validate()
    return cfg


@pytest.mark.parametrize(
    "flat, message",
    [
        (
            {"network_module": "networks.lora", "network_args": ["dora_wd=True"]},
            "dora_wd need network_module = lycoris.kohya",
        ),
        (
            {"network_module": "networks.lora", "network_args": ["algo=loha"]},
            "algo need network_module = lycoris.kohya",
        ),
        ({"network_module": "networks.oft"}, "use networks.lora .* or lycoris.kohya"),
        (
            {"network_module": "lycoris.kohya", "network_args": ["preset=attn-mlp", "conv_dim=4"]},
            "drop conv_dim",
        ),
        ({"network_module": "lycoris.kohya", "network_args": ["algo=lokr", "factor=-3"]}, "factor = -3"),
        ({"network_module": "networks.lora", "network_args": ["rank_dropout=0.1"]}, "rank_dropout need"),
        (
            {"network_module": "lycoris.kohya", "network_args": ["module_dropout=1"]},
            "module_dropout = 1.0: a prob",
        ),
    ],
)
def test_network_module_rules(flat, message):
    with pytest.raises(ConfigError, match=message):
        validated(**flat)


def test_cli_takes_kohya_style_network_args():
    from lorakit.cli import build_parser
    from lorakit.cli.train import config_from_args

    def parsed(*argv):
        return config_from_args(build_parser().parse_args(["train", *argv])).network

    n = parsed(
        "--network_module", "lycoris.kohya", "--network_args", "algo=loha", "conv_dim=4", "--network_dim", "8"
    )
    assert (n.network_module, n.algo, n.conv_dim, n.network_dim) == ("lycoris.kohya", "loha", 4, 8)
    n = parsed("--network_module", "lycoris.kohya", "--algo", "lokr", "--factor", "8", "--dora_wd")
    assert (n.algo, n.factor, n.dora_wd) == ("lokr", 8, True)


@pytest.mark.parametrize("tucker", [False, True], ids=["plain", "tucker"])
@pytest.mark.parametrize("algo", ["loha", "lokr"])
def test_modules_equal_lycoris_modules(algo, tucker):
    """Our LoHa/LoKr module and lycoris-lora's, holding the same tensors, give the same scaled ΔW."""
    from lycoris.modules.loha import LohaModule
    from lycoris.modules.lokr import LokrModule

    from lorakit.network.lycoris import LoHaModule, LoKrModule
    from lorakit.network.targets import Target

    ours_cls, theirs_cls = {"loha": (LoHaModule, LohaModule), "lokr": (LoKrModule, LokrModule)}[algo]
    for org in (torch.nn.Conv2d(32, 32, 3, padding=1), torch.nn.Linear(32, 64)):
        ours = ours_cls(Target("m", "m", org, 2, 1.0, False), use_tucker=tucker)
        theirs = theirs_cls("m", org, 1.0, 2, 1.0, use_tucker=tucker)
        randomise(ours, seed=4)
        assert ours.tensors().keys() == {k for k in theirs.custom_state_dict() if k != "alpha"}
        with torch.no_grad():
            for k, v in ours.tensors().items():
                getattr(theirs, k).copy_(v)
            torch.testing.assert_close(ours.diff() * ours.scale, theirs.get_weight(theirs.shape))


def test_sdxl_lycoris_file_has_kohya_sdxl_names(sdxl_config):
    """SDXL: the same modules as kohya's LoCon (SGM names, lora_te1_/lora_te2_); LyCORIS's `full` names
    (conv_in, time_embedding) match nothing in kohya's SGM-layout UNet, so they are not added."""
    path = train(
        sdxl_config(
            network_module="lycoris.kohya",
            network_args=["algo=lokr", "dora_wd=True"],
            max_train_steps=2,
            reg_data_dir=None,
        )
    )
    sd = load_file(str(path))
    locon = build_trainer(
        sdxl_config(conv_dim=4, conv_alpha=1, output_name="locon")
    ).network.kohya_state_dict()
    names = {k.split(".")[0] for k in sd}
    assert names == {k.split(".")[0] for k in locon}
    assert any(n.startswith("lora_unet_input_blocks_") for n in names)
    assert {n[:9] for n in names if n.startswith("lora_te")} == {"lora_te1_", "lora_te2_"}
    assert all(f"{n}.dora_scale" in sd and f"{n}.lokr_w1" in sd for n in names)


def test_save_state_and_resume_carry_a_lycoris_network(train_config, tmp_path):
    """--save_state / --resume round-trip the LyCORIS tensors (LoKr with its forced alpha, DoRA's scale)."""
    args = ["algo=lokr", "dora_wd=True", "conv_dim=2"]
    first = train(
        train_config(network_module="lycoris.kohya", network_args=args, max_train_steps=2, save_state=True)
    )
    state = first.parent / f"{first.stem}-state"
    assert state.is_dir()
    tr = build_trainer(
        train_config(
            network_module="lycoris.kohya",
            network_args=args,
            max_train_steps=3,
            save_state=True,
            resume=str(state),
        )
    )
    saved = load_file(str(state / "network.safetensors"))  # the state keeps float32
    now = tr.network.kohya_state_dict()
    assert now.keys() == saved.keys()
    assert all(torch.equal(now[k], v) for k, v in saved.items())
    trained = [k for k in saved if k.endswith(".lokr_w2") and saved[k].abs().max() > 0]
    assert trained  # LoKr's w2 starts at 0: the state holds trained values, not a fresh init
    assert tr.run().is_file()


@pytest.mark.parametrize("case", list(CASES))
def test_trained_file_reads_back_to_the_same_delta(tiny_base, case, tmp_path):
    """train -> file -> lorakit's reader (what drawing, merge and bake use): the same ΔW per module."""
    from lorakit.network.delta import lora_modules, module_update
    from lorakit.network.file import read_lora_file, save_lora_file

    base, net = our_network(tiny_base, CASES[case])
    randomise(net)
    path = save_lora_file(tmp_path / "l.safetensors", net.kohya_state_dict(), {}, "float")
    modules = lora_modules(read_lora_file(path)[0], str(path))
    assert set(modules) == set(net.modules)
    for name, ours in net.modules.items():
        ours.eval()
        w = ours.org[0].weight.detach()
        with torch.no_grad():
            want = ours.delta()
        got = module_update(modules[name], w, 1.0)
        torch.testing.assert_close(got.reshape(want.shape), want, rtol=1e-4, atol=1e-5, msg=name)
