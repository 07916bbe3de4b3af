"""Drawing shows which image and which sampling step it is on, with an ETA."""

import io

import pytest

from lorakit.generate.params import GenerationParams
from lorakit.generate.progress import DrawProgress, format_duration


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_log_lines_every_few_seconds_with_eta():
    out, clock = io.StringIO(), Clock()
    bar = DrawProgress(images=2, steps=10, stream=out, every_s=5.0, clock=clock)
    for image in range(2):
        for step in range(1, 11):
            clock.t += 1.0  # one second a step
            bar.step(image, step)
    bar.close()
    lines = out.getvalue().splitlines()
    # the first step, then one line per 5 s, then the summary
    assert lines[0] == "image 1/2, step 1/10, ETA 19s"
    assert lines[1] == "image 1/2, step 6/10, ETA 14s"
    assert lines[-1] == "2 image(s) in 20s"
    assert len(lines) == 1 + 19 // 5 + 1


def test_format_duration():
    assert [format_duration(s) for s in (0, 59.4, 61, 3725)] == ["0s", "59s", "1m01s", "1h02m05s"]


@pytest.fixture(scope="module")
def gen(tiny_base):
    from lorakit.generate.pipeline import Generator

    return Generator.from_path(tiny_base, device="cpu")


@pytest.mark.parametrize("sampler", ["Euler", "Heun", "DPM2", "DDIM"])
def test_every_sampler_reports_its_steps_in_order(gen, sampler):
    seen = []
    p = GenerationParams(prompt="bear", steps=4, width=64, height=64, seed=1, sampler=sampler, batch_count=2)
    gen.generate(p, on_step=lambda batch, done, total: seen.append((batch, done, total)))
    for batch in (0, 1):
        mine = [(d, t) for b, d, t in seen if b == batch]
        done = [d for d, _ in mine]
        assert done == sorted(done) and done[-1] == mine[-1][1], (sampler, mine)  # ends on the last step
        assert len({t for _, t in mine}) == 1 and 3 <= mine[0][1] <= 5


def test_reg_images_cli_shows_step_progress(tiny_base, tmp_path, capsys):
    from lorakit.cli import main

    rc = main(["reg-images", "--model", str(tiny_base), "--class_prompt", "bear", "--count", "2",
               "--out", str(tmp_path / "reg"), "--steps", "3", "--width", "64", "--height", "64"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 0
    assert "regularization image 1/2, step 1/3" in err and "2 regularization image(s) in" in err
