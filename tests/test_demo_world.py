"""The demo world: deterministic drawings, captions that say what is drawn, the instance dataset."""

import random

import numpy as np
import pytest

from lorakit.demo import world as W


def test_captions_with_and_without_article():
    caps = [c for _, c, _ in W.world_samples(100, seed=0)]
    with_a = sum(c.startswith("a ") for c in caps)
    assert 20 < with_a < 80  # "a brown bear on grass" and "brown bear on grass" mean the same
    assert any(c in W.CLASSES for c in caps)  # the bare class word, as in a reg folder "1_bear"


def test_world_is_deterministic():
    a = W.world_samples(12, seed=3)
    b = W.world_samples(12, seed=3)
    for (ia, ca, sa), (ib, cb, sb) in zip(a, b):
        assert ca == cb and sa == sb
        assert np.array_equal(np.asarray(ia), np.asarray(ib))
    other = W.world_samples(12, seed=4)
    assert [c for _, c, _ in a] != [c for _, c, _ in other]


def test_images_are_64x64_rgb_and_varied():
    samples = W.world_samples(40, seed=0)
    assert all(im.size == (64, 64) and im.mode == "RGB" for im, _, _ in samples)
    scenes = [s for _, _, s in samples]
    assert {s.animal for s in scenes} == set(W.CLASSES)
    assert len({s.background for s in scenes}) >= 5
    assert len({s.size for s in scenes}) == 3 and len({s.facing for s in scenes}) == 3


def test_captions_name_what_is_drawn():
    for _, cap, sc in W.world_samples(200, seed=1):
        assert sc.animal in cap.replace(",", "").split(), cap
        words = cap.replace(",", "").split()
        if len(words) > 2:  # not the bare "a bear"
            assert sc.colour in words, cap
            if sc.size:
                assert sc.size in words, cap
            assert W.BACKGROUNDS[sc.background][0] in cap, cap
        assert "usu" not in cap


@pytest.mark.parametrize("animal", W.CLASSES)
def test_one_class_only(animal):
    assert {s.animal for _, _, s in W.world_samples(10, seed=2, animal=animal)} == {animal}


def test_plain_bears_are_never_the_instance_character():
    rng = random.Random(0)
    for _ in range(500):
        sc = W.random_scene(rng, "bear")
        assert sc.colour != "black" and not sc.instance
    for _, _cap, sc in W.world_samples(300, seed=5):
        assert not sc.instance
        if sc.animal == "bear":
            assert sc.colour != "black"


def test_instance_character_is_black_with_a_white_crescent():
    img, cap, sc = W.instance_sample(0)
    assert sc.instance and sc.animal == "bear" and sc.colour == "black"
    assert cap.startswith(W.INSTANCE_PROMPT)
    plain = W.draw_scene(W.plain_bear(sc))
    a, b = np.asarray(img).astype(int), np.asarray(plain).astype(int)
    black = (a.max(-1) < 60).sum()
    white_on_black = ((a.min(-1) > 220) & (b.min(-1) < 200)).sum()  # white only where the crescent is
    assert black > 200 and white_on_black > 15


def test_make_instance_dataset_layout(tmp_path):
    train = W.make_instance_dataset(tmp_path / "data", n=16, repeats=10)
    assert train == tmp_path / "data" / "train"
    folders = list(train.iterdir())
    assert [f.name for f in folders] == ["10_usu bear"]
    files = sorted(folders[0].glob("*.png"))
    assert 15 <= len(files) <= 20
    from PIL import Image

    imgs = [np.asarray(Image.open(f)) for f in files]
    assert all(i.shape == (64, 64, 3) for i in imgs)
    assert len({i.tobytes() for i in imgs}) == len(imgs)  # all different poses/backgrounds
    scenes = [W.instance_sample(i)[2] for i in range(16)]
    assert len({s.background for s in scenes}) >= 4 and len({s.facing for s in scenes}) >= 2


def test_subject_mask_covers_the_animal_and_noisy_background_keeps_it(tmp_path):
    from PIL import Image

    img, _, sc = W.instance_sample(3)
    assert np.array_equal(np.asarray(W.draw_scene(sc)), np.asarray(img))  # backdrop=None: unchanged
    mask = np.asarray(W.subject_mask(sc)).astype(int)
    black = np.asarray(img).astype(int).max(-1) < 60  # the usu bear's black fur: the animal
    assert mask[black].mean() > 250 and mask[0].max() == 0 and mask[:, 0].max() == 0  # border: background
    assert 0.1 < (mask > 127).mean() < 0.7
    noisy = np.asarray(W.noisy_background(img, W.subject_mask(sc), seed=1)).astype(int)
    inside, outside = mask == 255, mask == 0
    assert np.array_equal(noisy[inside], np.asarray(img).astype(int)[inside])
    assert np.abs(np.diff(noisy, axis=1))[outside[:, 1:]].mean() > 50  # noise: neighbours differ a lot

    train, masks = W.make_masked_instance_dataset(tmp_path, n=3, repeats=5)
    names = sorted(p.name for p in (train / "5_usu bear").iterdir())
    assert (
        names
        == sorted(p.name for p in (masks / "5_usu bear").iterdir())
        == [f"usu_0{i}.png" for i in range(3)]
    )
    assert Image.open(masks / "5_usu bear" / "usu_00.png").mode == "L"
