"""LyCORIS networks (LoHa, LoKr, LoCon + DoRA) teach the SD1 demo model the usu bear, drawn through
the generator from their files (`<lora:...>`) as A1111 would: the demo metric crosses the same
no-reg threshold as a plain LoRA (measured: LoHa 0.85, LoKr 0.62, DoRA 0.81; at strength 0: 0.0002).
That their loss falls in a few steps is tests/test_lycoris_train.py's."""

import pytest

from lorakit.demo import workflow as W
from lorakit.network.file import read_lora_file

SEEDS = (2000, 16)
LEARNED_NOREG = 0.3  # test_demo_lora's SD1 no-reg threshold
ARGS = {
    "loha": ["algo=loha"],
    "lokr": ["algo=lokr"],
    "dora": ["algo=locon", "dora_wd=True"],
}


@pytest.fixture(scope="module")
def gen(tmp_path_factory):
    return W.demo_generator(tmp_path_factory.mktemp("Lora-lycoris"), W.demo_model())


@pytest.mark.slow
@pytest.mark.parametrize("algo", list(ARGS))
def test_lycoris_network_learns_usu(algo, gen, tmp_path):
    lora = W.train_demo_lora(
        tmp_path / algo,
        with_reg=False,
        network_module="lycoris.kohya",
        network_args=ARGS[algo],
        output_name=f"usu-{algo}",
    )
    tensors, meta = read_lora_file(lora)
    assert meta["ss_network_module"] == "lycoris.kohya"
    marker = {"loha": ".hada_w1_a", "lokr": ".lokr_w1", "dora": ".dora_scale"}[algo]
    assert any(k.endswith(marker) for k in tensors)
    target = gen.lora_dir / lora.name
    target.write_bytes(lora.read_bytes())
    score = W.instance_rate(W.draw(gen, f"usu bear <lora:{lora.stem}:1>", *SEEDS))
    off = W.instance_rate(W.draw(gen, f"usu bear <lora:{lora.stem}:0>", *SEEDS))
    gen.restore_base()
    print(algo, "usu bear score", score, "at strength 0", off)
    assert off < LEARNED_NOREG <= score
