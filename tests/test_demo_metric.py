"""The demo metric tells the world's classes and the usu bear apart, on clean and on blurry pictures."""

import numpy as np
import pytest
from PIL import ImageFilter

from lorakit.demo import METRIC_WEIGHTS
from lorakit.demo import metric as M
from lorakit.demo import world as W

pytestmark = pytest.mark.skipif(not METRIC_WEIGHTS.exists(), reason="metric weights not built")

HELD_OUT = 424242  # a world seed the metric never saw


def _accuracy(blur: float) -> float:
    samples = W.world_samples(150, seed=HELD_OUT)
    imgs = [im.filter(ImageFilter.GaussianBlur(blur)) if blur else im for im, _, _ in samples]
    pred = M.classify(imgs)
    return float(np.mean([p == s.animal for p, (_, _, s) in zip(pred, samples)]))


def test_labels():
    assert M.LABELS == ("bear", "cat", "rabbit", "bird", "frog", "usu bear")


@pytest.mark.parametrize(("blur", "threshold"), [(0, 0.95), (1.5, 0.85)])
def test_classifies_held_out_world_pictures(blur, threshold):
    assert _accuracy(blur) >= threshold


def test_separates_the_instance_character_from_plain_bears():
    inst = [W.instance_sample(i, seed=HELD_OUT)[0] for i in range(40)]
    bears = [im for im, _, _ in W.world_samples(40, seed=HELD_OUT, animal="bear")]
    # the same scenes with a plain brown bear instead of the usu bear
    plain = [W.draw_scene(W.plain_bear(W.instance_sample(i, seed=HELD_OUT)[2])) for i in range(40)]
    s_inst, s_bears, s_plain = (np.array(M.instance_score(x)) for x in (inst, bears, plain))
    assert s_inst.mean() > 0.9 and s_bears.mean() < 0.1 and s_plain.mean() < 0.1
    assert (s_inst > 0.5).mean() >= 0.95 and (s_bears < 0.5).mean() >= 0.95
    blurred = [im.filter(ImageFilter.GaussianBlur(1.5)) for im in inst]
    assert np.mean(M.instance_score(blurred)) > 0.7
    assert M.classify(inst).count("usu bear") >= 36


def test_class_scores_and_instance_scores_are_probabilities():
    imgs = [im for im, _, _ in W.world_samples(6, seed=HELD_OUT)]
    for label in M.LABELS:
        s = M.class_scores(imgs, label)
        assert len(s) == 6 and all(0 <= v <= 1 for v in s)
    p = M.probabilities(imgs)
    assert p.shape == (6, len(M.LABELS)) and np.allclose(p.sum(-1).numpy(), 1, atol=1e-5)
