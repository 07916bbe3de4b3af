"""LoRA training teaches the demo models (SD1.x and SDXL family) the usu bear, and regularization
images keep `bear` a bear.

Thresholds come from measurements on the shipped models (src/lorakit/demo/assets/README.md), with
wide margins. SD1: usu bear with the LoRA 0.86 without reg / 1.00 with reg; base 0.00; `bear` under
the LoRA 0.98 without reg / 0.02 with reg. SDXL (400 steps; seeds 1000-1023 / these seeds 2000-2015):
usu bear 0.92 / 0.82 (0.85 / 0.63 here); base 0.13 (0.06 here: its dark bears fool the metric now
and then); `bear` 0.92 / 0.19; the sks-trained LoRA: usu bear 0.17, sks bear 0.88. Each one is also
shown to fail for a broken trainer: LoRA strength 0, no training, or the wrong instance token.
"""

from dataclasses import dataclass

import pytest

from lorakit.demo import workflow as W

SEEDS = (2000, 16)  # first seed, count: fixed, and not the seeds the reg images were drawn with


@dataclass(frozen=True)
class Thresholds:
    learned: float  # usu bear <lora> (the workflow: trained with reg images) scores at least this
    learned_noreg: float  # without reg images the instance is learned less cleanly
    base_max: float  # the base model scores below this on usu bear
    preserved_max: float  # `bear <lora>` after training with reg images stays below this
    drifted_min: float  # ... and without reg images `bear` has become the usu bear


THRESHOLDS = {
    "sd1": Thresholds(learned=0.6, learned_noreg=0.3, base_max=0.2, preserved_max=0.3, drifted_min=0.6),
    "sdxl": Thresholds(learned=0.45, learned_noreg=0.5, base_max=0.35, preserved_max=0.4, drifted_min=0.6),
}


@pytest.fixture(scope="module", params=["sd1", "sdxl"])
def family(request):
    return request.param


@pytest.fixture(scope="module")
def model(family):
    return W.demo_model(sdxl=family == "sdxl")


@pytest.fixture(scope="module")
def limits(family):
    return THRESHOLDS[family]


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory, family):
    return tmp_path_factory.mktemp(f"Lora-{family}")


@pytest.fixture(scope="module")
def gen(lora_dir, model):
    return W.demo_generator(lora_dir, model)


@pytest.fixture(scope="module")
def loras(tmp_path_factory, gen, model):
    """{name: LoRA path}: trained with and without regularization images."""
    root = tmp_path_factory.mktemp("demo-loras")
    return {
        "reg": W.train_demo_lora(root / "reg", with_reg=True, gen=gen, model=model),
        "noreg": W.train_demo_lora(root / "noreg", with_reg=False, model=model),
    }


def reg_images(loras):
    """The reg bears the "reg" run drew (the base model's `bear`, seeds 0..31): a later run with
    reg images reuses them instead of drawing the same 32 pictures again."""
    return loras["reg"].parent.parent / "data" / "reg"


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


def test_lora_teaches_the_instance_character(gen, loras, limits):
    base_score, _ = rate(gen, "usu bear")
    assert base_score < limits.base_max
    scores = {}
    for name in ("reg", "noreg"):
        lora = renamed(loras[name], f"usu-{name}", gen.lora_dir)
        scores[name] = rate(gen, f"usu bear {lora_tag(lora)}")[0]
    print("usu bear instance scores:", base_score, scores)
    assert scores["reg"] >= limits.learned and scores["noreg"] >= limits.learned_noreg, scores


def test_reg_images_keep_the_class_closer_to_the_base(gen, loras, limits):
    base_score, base_bears = rate(gen, "bear")
    reg = renamed(loras["reg"], "usu-reg", gen.lora_dir)
    noreg = renamed(loras["noreg"], "usu-noreg", gen.lora_dir)
    with_reg, reg_bears = rate(gen, f"bear {lora_tag(reg)}")
    without_reg, noreg_bears = rate(gen, f"bear {lora_tag(noreg)}")
    assert with_reg < limits.preserved_max < limits.drifted_min <= without_reg, (with_reg, without_reg)
    # and in pixels: the reg-trained LoRA's bears stay nearer the base model's bears
    assert W.pixel_distance(reg_bears, base_bears) < W.pixel_distance(noreg_bears, base_bears)


def test_a_broken_trainer_fails_the_learning_threshold(gen, loras, model, limits, tmp_path):
    reg = renamed(loras["reg"], "usu-reg", gen.lora_dir)
    # strength 0: the LoRA does nothing
    assert rate(gen, f"usu bear {lora_tag(reg, 0)}")[0] < limits.learned
    # no training: one step at a learning rate too small to move anything
    untrained = W.train_demo_lora(
        tmp_path / "untrained", with_reg=False, model=model, learning_rate=1e-12, max_train_steps=1
    )
    untrained = renamed(untrained, "usu-untrained", gen.lora_dir)
    assert rate(gen, f"usu bear {lora_tag(untrained)}")[0] < limits.learned


def test_the_wrong_token_does_not_teach_usu(gen, loras, model, limits, tmp_path):
    """Trained on a folder named '10_sks bear' (with reg bears), the LoRA has not learned 'usu'."""
    import shutil

    from lorakit.demo.world import make_instance_dataset

    train_dir = make_instance_dataset(tmp_path / "data", n=16, repeats=10)
    shutil.move(train_dir / "10_usu bear", train_dir / "10_sks bear")
    reg_dir = reg_images(loras)  # the same 32 bears train_demo_lora(with_reg=True) would draw
    assert len(list((reg_dir / "1_bear").glob("*.png"))) == 32
    lora = W.train_demo_lora(
        tmp_path / "run",
        with_reg=False,
        model=model,
        train_data_dir=str(train_dir),
        reg_data_dir=str(reg_dir),
        output_name="sks",
    )
    lora = renamed(lora, "sks-bear", gen.lora_dir)
    usu, sks = rate(gen, f"usu bear {lora_tag(lora)}")[0], rate(gen, f"sks bear {lora_tag(lora)}")[0]
    print("sks-trained LoRA: usu bear", usu, "sks bear", sks)
    assert usu < limits.learned <= sks  # only the token it was taught
