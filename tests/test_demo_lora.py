"""LoRA training teaches the demo model the usu bear, and regularization images keep `bear` a bear.

Thresholds come from measurements on the shipped model (src/lorakit/demo/assets/README.md:
usu bear with the LoRA 0.86 without reg / 1.00 with reg; base 0.00; `bear` under the LoRA 0.98
without reg / 0.02 with reg), with wide margins. Each one is also shown to fail for a broken
trainer: LoRA strength 0, no training, or the wrong instance token.
"""

import pytest

from lorakit.demo import workflow as W

SEEDS = (2000, 16)  # first seed, count: fixed, and not the seeds the reg images were drawn with

LEARNED = 0.6  # usu bear <lora> (the workflow: trained with reg images) scores at least this
LEARNED_NOREG = 0.3  # without reg images the instance is learned less cleanly (measured 0.47-0.86)
BASE_MAX = 0.2  # the base model (and any broken LoRA) scores below this on usu bear
PRESERVED_MAX = 0.3  # `bear <lora>` after training with reg images stays below this
DRIFTED_MIN = 0.6  # ... and without reg images `bear` has become the usu bear


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("Lora")


@pytest.fixture(scope="module")
def gen(lora_dir):
    return W.demo_generator(lora_dir)


@pytest.fixture(scope="module")
def loras(tmp_path_factory, gen):
    """{name: LoRA path}: trained with and without regularization images."""
    root = tmp_path_factory.mktemp("demo-loras")
    return {
        "reg": W.train_demo_lora(root / "reg", with_reg=True, gen=gen),
        "noreg": W.train_demo_lora(root / "noreg", with_reg=False),
    }


def rate(gen, prompt):
    images = W.draw(gen, prompt, *SEEDS)
    gen.restore_base()
    return W.instance_rate(images), images


def lora_tag(path, weight=1):
    return f"<lora:{path.stem}:{weight}>"


def renamed(path, name, lora_dir):
    """Put a trained file into the generator's LoRA folder under `name`."""
    target = lora_dir / f"{name}.safetensors"
    if not target.exists():
        target.write_bytes(path.read_bytes())
    return target


def test_lora_teaches_the_instance_character(gen, loras):
    base_score, _ = rate(gen, "usu bear")
    assert base_score < BASE_MAX
    scores = {}
    for name in ("reg", "noreg"):
        lora = renamed(loras[name], f"usu-{name}", gen.lora_dir)
        scores[name] = rate(gen, f"usu bear {lora_tag(lora)}")[0]
    print("usu bear instance scores:", base_score, scores)
    assert scores["reg"] >= LEARNED and scores["noreg"] >= LEARNED_NOREG, scores


def test_reg_images_keep_the_class_closer_to_the_base(gen, loras):
    base_score, base_bears = rate(gen, "bear")
    reg = renamed(loras["reg"], "usu-reg", gen.lora_dir)
    noreg = renamed(loras["noreg"], "usu-noreg", gen.lora_dir)
    with_reg, reg_bears = rate(gen, f"bear {lora_tag(reg)}")
    without_reg, noreg_bears = rate(gen, f"bear {lora_tag(noreg)}")
    assert with_reg < PRESERVED_MAX < DRIFTED_MIN <= without_reg, (with_reg, without_reg)
    # and in pixels: the reg-trained LoRA's bears stay nearer the base model's bears
    assert W.pixel_distance(reg_bears, base_bears) < W.pixel_distance(noreg_bears, base_bears)


def test_a_broken_trainer_fails_the_learning_threshold(gen, loras, tmp_path):
    reg = renamed(loras["reg"], "usu-reg", gen.lora_dir)
    # strength 0: the LoRA does nothing
    assert rate(gen, f"usu bear {lora_tag(reg, 0)}")[0] < LEARNED
    # no training: one step at a learning rate too small to move anything
    untrained = W.train_demo_lora(
        tmp_path / "untrained", with_reg=False, learning_rate=1e-12, max_train_steps=1
    )
    untrained = renamed(untrained, "usu-untrained", gen.lora_dir)
    assert rate(gen, f"usu bear {lora_tag(untrained)}")[0] < LEARNED


def test_the_wrong_token_does_not_teach_usu(gen, tmp_path):
    """Trained on a folder named '10_sks bear' (with reg bears), the LoRA has not learned 'usu'."""
    import shutil

    from lorakit.demo.world import make_instance_dataset

    train_dir = make_instance_dataset(tmp_path / "data", n=16, repeats=10)
    shutil.move(train_dir / "10_usu bear", train_dir / "10_sks bear")
    lora = W.train_demo_lora(
        tmp_path / "run", with_reg=True, gen=gen, train_data_dir=str(train_dir), output_name="sks"
    )
    lora = renamed(lora, "sks-bear", gen.lora_dir)
    assert rate(gen, f"usu bear {lora_tag(lora)}")[0] < LEARNED
    assert rate(gen, f"sks bear {lora_tag(lora)}")[0] >= LEARNED  # the token it was taught
