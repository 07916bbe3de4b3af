"""A deterministic procedural world of small captioned animal pictures, and the demo's instance character.

Every picture is drawn from simple shapes with PIL (at 2x, then downsampled, so edges are smooth):
an animal (bear, cat, rabbit, bird, frog) of some colour and size, at some place, facing left, right
or the viewer, on a background (grass, snow, sand, water, or a plain colour). The caption says
what is drawn, e.g. "a small white rabbit, blue background" or "a brown bear on grass".

Plain bears are brown, tan, grey or white: never black, and never with a crescent. The instance
character ("usu bear") is a black bear with a white crescent on its chest, which the pretrained demo
model has never seen; `make_instance_dataset` writes a kohya folder of it.

The same (seed, index) always gives the same picture and caption (pure Python RNG, no numpy/torch).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from pathlib import Path

from PIL import Image, ImageDraw

DATA_VERSION = 2  # bump when any drawing or caption changes (the shipped model was trained on this one)

CLASSES = ("bear", "cat", "rabbit", "bird", "frog")
INSTANCE_TOKEN = "usu"
INSTANCE_PROMPT = "usu bear"
INSTANCE_CLASS = "usu bear"  # the metric's label for the instance character

COLOURS: dict[str, tuple[int, int, int]] = {
    "brown": (122, 74, 38),
    "tan": (196, 150, 96),
    "grey": (128, 128, 132),
    "white": (236, 236, 230),
    "black": (28, 26, 28),
    "orange": (232, 134, 40),
    "red": (206, 40, 36),
    "blue": (44, 92, 214),
    "yellow": (240, 206, 40),
    "green": (60, 168, 62),
}
ANIMAL_COLOURS: dict[str, tuple[str, ...]] = {
    "bear": ("brown", "tan", "grey", "white"),  # never black
    "cat": ("orange", "grey", "black", "white"),
    "rabbit": ("white", "brown", "grey"),
    "bird": ("red", "blue", "yellow"),
    "frog": ("green",),
}
SIZES = {"small": 0.62, "": 0.8, "big": 0.98}  # fraction of the canvas the animal spans
FACINGS = ("left", "front", "right")

# name -> (caption phrase, top colour, bottom colour or None for plain)
BACKGROUNDS: dict[str, tuple[str, tuple[int, int, int], tuple[int, int, int] | None]] = {
    "grass": ("on grass", (150, 200, 240), (80, 160, 60)),
    "snow": ("in the snow", (196, 210, 226), (246, 248, 252)),
    "sand": ("on the beach", (120, 190, 240), (226, 204, 146)),
    "water": ("by the water", (176, 220, 236), (40, 100, 170)),
    "blue": ("blue background", (70, 130, 230), None),
    "pink": ("pink background", (236, 150, 190), None),
    "yellow": ("yellow background", (244, 222, 110), None),
    "purple": ("purple background", (130, 90, 180), None),
}

_S = 2  # supersampling factor


@dataclass(frozen=True)
class Scene:
    animal: str  # one of CLASSES
    colour: str  # a key of COLOURS
    size: str  # a key of SIZES ("" = medium)
    facing: str  # left / front / right
    x: float  # centre, fraction of the width
    y: float  # centre, fraction of the height
    background: str  # a key of BACKGROUNDS
    instance: bool = False  # the usu bear (black, white crescent)


def random_scene(rng: random.Random, animal: str | None = None, instance: bool = False) -> Scene:
    """A random scene; `animal` fixes the class, `instance` draws the usu bear."""
    if instance:
        animal = "bear"
    animal = animal or rng.choice(CLASSES)
    colour = "black" if instance else rng.choice(ANIMAL_COLOURS[animal])
    size = rng.choice(tuple(SIZES))
    span = SIZES[size]
    margin = 0.5 - span / 2
    x = 0.5 + rng.uniform(-margin, margin) * 0.9
    y = 0.5 + rng.uniform(-margin, margin) * 0.6
    return Scene(animal, colour, size, rng.choice(FACINGS), x, y, rng.choice(tuple(BACKGROUNDS)), instance)


def caption(scene: Scene, rng: random.Random | None = None) -> str:
    """The scene in words, e.g. "a small white rabbit, blue background"."""
    rng = rng or random.Random(0)
    if scene.instance:
        subject = INSTANCE_PROMPT
    else:
        subject = " ".join(w for w in (scene.size, scene.colour, scene.animal) if w)
    r = rng.random()
    if r < 0.1:  # sometimes only the animal (teaches the bare class word)
        words = subject if scene.instance else scene.animal
        return words if scene.instance or rng.random() < 0.5 else f"a {words}"
    parts = [subject]
    if rng.random() < 0.3 and scene.facing != "front":
        parts.append(f"facing {scene.facing}")
    if rng.random() < 0.25 and abs(scene.x - 0.5) > 0.07:
        parts.append("on the left" if scene.x < 0.5 else "on the right")
    phrase = BACKGROUNDS[scene.background][0]
    text = " ".join(parts)
    text = f"{text}, {phrase}" if phrase.endswith("background") else f"{text} {phrase}"
    # "a brown bear on grass" or "brown bear on grass": the article carries no meaning
    return text if scene.instance or rng.random() < 0.5 else f"a {text}"


def _shade(c, f: float):
    return tuple(max(0, min(255, int(v * f))) for v in c)


def _draw_background(d: ImageDraw.ImageDraw, name: str, w: int, horizon: float) -> None:
    _, top, bottom = BACKGROUNDS[name]
    d.rectangle((0, 0, w, w), fill=top)
    if bottom is not None:
        d.rectangle((0, int(horizon * w), w, w), fill=bottom)


def _ell(d, cx, cy, rx, ry, fill):
    d.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=fill)


def _eyes(d, cx, cy, dx, r, fill=(10, 10, 10)):
    for sx in (-1, 1):
        _ell(d, cx + sx * dx, cy, r, r, fill)


def _draw_bear(d, sc: Scene, cx, cy, s, col):
    dark = _shade(col, 0.75) if sc.colour != "black" else (16, 14, 16)
    muzzle = _shade(col, 1.25) if sc.colour not in ("white", "black") else (200, 180, 150)
    face = {"left": -1, "front": 0, "right": 1}[sc.facing]
    # feet, body
    for sx in (-1, 1):
        _ell(d, cx + sx * 0.22 * s, cy + 0.36 * s, 0.14 * s, 0.1 * s, dark)
    _ell(d, cx, cy + 0.1 * s, 0.36 * s, 0.32 * s, col)
    if sc.instance:  # the white crescent (a "V"/moon) on the chest
        _ell(d, cx, cy + 0.0 * s, 0.22 * s, 0.15 * s, (250, 250, 250))
        _ell(d, cx, cy - 0.07 * s, 0.2 * s, 0.13 * s, col)
    hx, hy = cx + face * 0.06 * s, cy - 0.26 * s
    for sx in (-1, 1):  # round ears
        _ell(d, hx + sx * 0.17 * s, hy - 0.15 * s, 0.08 * s, 0.08 * s, col)
        _ell(d, hx + sx * 0.17 * s, hy - 0.15 * s, 0.04 * s, 0.04 * s, dark)
    _ell(d, hx, hy, 0.22 * s, 0.2 * s, col)
    mx = hx + face * 0.07 * s
    _ell(d, mx, hy + 0.07 * s, 0.1 * s, 0.08 * s, muzzle)
    _ell(d, mx, hy + 0.04 * s, 0.04 * s, 0.03 * s, (10, 10, 10))
    eye = (10, 10, 10) if sc.colour != "black" else (230, 230, 230)
    _eyes(d, hx + face * 0.05 * s, hy - 0.05 * s, 0.08 * s, 0.025 * s, eye)


def _draw_cat(d, sc: Scene, cx, cy, s, col):
    dark = _shade(col, 0.7) if sc.colour != "black" else (60, 60, 60)
    face = {"left": -1, "front": 0, "right": 1}[sc.facing]
    tail_side = -face if face else 1
    # tail: a thick curved line from the body side up
    tx = cx + tail_side * 0.22 * s
    pts = [
        (tx, cy + 0.3 * s),
        (tx + tail_side * 0.18 * s, cy + 0.15 * s),
        (tx + tail_side * 0.2 * s, cy - 0.1 * s),
    ]
    d.line(pts, fill=col, width=max(2, int(0.07 * s)), joint="curve")
    _ell(d, cx, cy + 0.14 * s, 0.22 * s, 0.26 * s, col)
    hx, hy = cx + face * 0.05 * s, cy - 0.17 * s
    for sx in (-1, 1):  # pointed ears
        ex = hx + sx * 0.12 * s
        d.polygon(
            [
                (ex - 0.08 * s, hy - 0.06 * s),
                (ex + 0.08 * s, hy - 0.06 * s),
                (ex + sx * 0.03 * s, hy - 0.3 * s),
            ],
            fill=col,
        )
    _ell(d, hx, hy, 0.18 * s, 0.16 * s, col)
    _eyes(d, hx + face * 0.04 * s, hy - 0.02 * s, 0.07 * s, 0.03 * s, (90, 200, 60))
    _ell(d, hx + face * 0.05 * s, hy + 0.05 * s, 0.02 * s, 0.015 * s, (230, 120, 140))
    wy = hy + 0.06 * s
    for sx in (-1, 1):  # whiskers
        for dy in (-0.02, 0.03):
            d.line(
                [(hx + sx * 0.06 * s, wy), (hx + sx * 0.26 * s, wy + dy * s)],
                fill=dark,
                width=max(1, int(0.012 * s)),
            )


def _draw_rabbit(d, sc: Scene, cx, cy, s, col):
    inner = (236, 160, 176)
    face = {"left": -1, "front": 0, "right": 1}[sc.facing]
    _ell(d, cx - (face or 1) * 0.24 * s, cy + 0.3 * s, 0.07 * s, 0.07 * s, (250, 250, 250))  # tail
    _ell(d, cx, cy + 0.2 * s, 0.22 * s, 0.22 * s, col)
    for sx in (-1, 1):
        _ell(d, cx + sx * 0.12 * s, cy + 0.4 * s, 0.09 * s, 0.05 * s, _shade(col, 0.85))
    hx, hy = cx + face * 0.05 * s, cy - 0.07 * s
    for sx in (-1, 1):  # long ears
        ex = hx + sx * 0.07 * s + face * 0.04 * s
        _ell(d, ex, hy - 0.27 * s, 0.055 * s, 0.2 * s, col)
        _ell(d, ex, hy - 0.26 * s, 0.025 * s, 0.14 * s, inner)
    _ell(d, hx, hy, 0.15 * s, 0.13 * s, col)
    _eyes(d, hx + face * 0.04 * s, hy - 0.02 * s, 0.06 * s, 0.022 * s)
    _ell(d, hx + face * 0.05 * s, hy + 0.05 * s, 0.025 * s, 0.018 * s, inner)


def _draw_bird(d, sc: Scene, cx, cy, s, col):
    face = {"left": -1, "front": 1, "right": 1}[sc.facing]
    leg = (230, 150, 30)
    for sx in (-1, 1):
        x = cx + sx * 0.06 * s
        d.line([(x, cy + 0.12 * s), (x, cy + 0.36 * s)], fill=leg, width=max(1, int(0.025 * s)))
    tx = cx - face * 0.26 * s  # tail
    d.polygon(
        [
            (tx + face * 0.08 * s, cy),
            (tx - face * 0.18 * s, cy - 0.12 * s),
            (tx - face * 0.16 * s, cy + 0.1 * s),
        ],
        fill=_shade(col, 0.7),
    )
    _ell(d, cx, cy, 0.26 * s, 0.18 * s, col)
    _ell(d, cx - face * 0.03 * s, cy + 0.01 * s, 0.14 * s, 0.09 * s, _shade(col, 0.7))  # wing
    hx, hy = cx + face * 0.2 * s, cy - 0.17 * s
    _ell(d, hx, hy, 0.12 * s, 0.12 * s, col)
    bx = hx + face * 0.1 * s
    d.polygon(
        [(bx, hy - 0.04 * s), (bx, hy + 0.04 * s), (bx + face * 0.14 * s, hy + 0.01 * s)], fill=(250, 170, 20)
    )
    _ell(d, hx + face * 0.04 * s, hy - 0.03 * s, 0.025 * s, 0.025 * s, (10, 10, 10))


def _draw_frog(d, sc: Scene, cx, cy, s, col):
    dark = _shade(col, 0.65)
    belly = (190, 220, 120)
    face = {"left": -1, "front": 0, "right": 1}[sc.facing]
    for sx in (-1, 1):  # legs
        _ell(d, cx + sx * 0.32 * s, cy + 0.22 * s, 0.14 * s, 0.08 * s, dark)
    _ell(d, cx, cy + 0.1 * s, 0.34 * s, 0.2 * s, col)
    _ell(d, cx, cy + 0.16 * s, 0.2 * s, 0.1 * s, belly)
    hx = cx + face * 0.04 * s
    for sx in (-1, 1):  # eye bumps
        ex, ey = hx + sx * 0.16 * s, cy - 0.12 * s
        _ell(d, ex, ey, 0.1 * s, 0.1 * s, col)
        _ell(d, ex, ey, 0.06 * s, 0.06 * s, (250, 250, 240))
        _ell(d, ex + face * 0.015 * s, ey, 0.03 * s, 0.03 * s, (10, 10, 10))
    d.line(
        [(hx - 0.15 * s, cy + 0.02 * s), (hx + 0.15 * s, cy + 0.02 * s)],
        fill=dark,
        width=max(1, int(0.02 * s)),
    )


_DRAW = {"bear": _draw_bear, "cat": _draw_cat, "rabbit": _draw_rabbit, "bird": _draw_bird, "frog": _draw_frog}


def draw_scene(scene: Scene, size: int = 64, backdrop: tuple[int, int, int] | None = None) -> Image.Image:
    """Draw `scene` as a size x size RGB image (on a plain `backdrop` colour instead of its background
    when given: subject_mask draws it on two)."""
    w = size * _S
    img = Image.new("RGB", (w, w))
    d = ImageDraw.Draw(img)
    s = SIZES[scene.size] * w * (1.15 if scene.animal == "cat" else 1.0)
    cx, cy = scene.x * w, scene.y * w
    if backdrop is None:
        _draw_background(d, scene.background, w, horizon=min(0.75, scene.y + 0.1 * SIZES[scene.size]))
    else:
        d.rectangle((0, 0, w, w), fill=backdrop)
    _DRAW[scene.animal](d, scene, cx, cy, s, COLOURS[scene.colour])
    return img.resize((size, size), Image.LANCZOS)


def _rng(seed: int, index: int, salt: str) -> random.Random:
    return random.Random(f"{salt}:{seed}:{index}")


def world_sample(index: int, seed: int = 0, animal: str | None = None, size: int = 64):
    """(image, caption, scene) number `index` of the world with `seed` (optionally one class only)."""
    rng = _rng(seed, index, f"world:{animal or ''}")
    sc = random_scene(rng, animal)
    return draw_scene(sc, size), caption(sc, rng), sc


def world_samples(n: int, seed: int = 0, animal: str | None = None, size: int = 64):
    """[(image, caption, scene)] for indices 0..n-1."""
    return [world_sample(i, seed, animal, size) for i in range(n)]


def instance_sample(index: int, seed: int = 0, size: int = 64):
    """(image, caption, scene): the usu bear (black bear, white crescent) in a varied pose/background."""
    rng = _rng(seed, index, "instance")
    sc = random_scene(rng, instance=True)
    return draw_scene(sc, size), caption(sc, rng), sc


def plain_bear(scene: Scene) -> Scene:
    """The same scene with an ordinary bear (brown) instead of the instance character."""
    return replace(scene, instance=False, colour="brown")


def make_instance_dataset(
    root: str | Path, n: int = 16, repeats: int = 10, seed: int = 0, size: int = 64
) -> Path:
    """Write n (15-20 recommended) pictures of the usu bear to root/train/<repeats>_usu bear/.

    No caption files: kohya takes the class token "usu bear" from the folder name. Returns root/train.
    """
    folder = Path(root) / "train" / f"{repeats}_{INSTANCE_PROMPT}"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img, _, _ = instance_sample(i, seed, size)
        img.save(folder / f"usu_{i:02d}.png")
    return folder.parent


def subject_mask(scene: Scene, size: int = 64) -> Image.Image:
    """The animal's silhouette as an 'L' image: 255 on the animal, 0 on the background, grey on its
    antialiased edge. The scene is drawn on black and on white: where the two agree is the animal."""
    import numpy as np

    on_black = np.asarray(draw_scene(scene, size, (0, 0, 0)), dtype=np.float32)
    on_white = np.asarray(draw_scene(scene, size, (255, 255, 255)), dtype=np.float32)
    background = (on_white - on_black).mean(axis=2) / 255.0  # 1 where the backdrop shows through
    mask = np.clip(np.rint((1.0 - background) * 255), 0, 255)
    mask[mask <= 4], mask[mask >= 251] = 0, 255  # the downsampling filter's ringing is no edge
    return Image.fromarray(mask.astype(np.uint8), "L")


def noisy_background(image: Image.Image, mask: Image.Image, seed: int) -> Image.Image:
    """`image` with its background (where `mask` is 0; blended on grey edges) replaced by random noise."""
    import numpy as np

    rng = np.random.default_rng(seed)
    a = np.asarray(image, dtype=np.float32)
    noise = rng.integers(0, 256, a.shape).astype(np.float32)
    m = np.asarray(mask, dtype=np.float32)[:, :, None] / 255.0
    return Image.fromarray(np.rint(a * m + noise * (1 - m)).astype(np.uint8), "RGB")


def make_masked_instance_dataset(
    root: str | Path, n: int = 16, repeats: int = 10, seed: int = 0, size: int = 64, noisy: bool = True
) -> tuple[Path, Path]:
    """make_instance_dataset's pictures, with (`noisy`) their background replaced by random noise, and
    a mask per picture: root/train/<repeats>_usu bear/usu_NN.png + root/masks/<repeats>_usu bear/usu_NN.png
    (white = the bear), the layout of conditioning_data_dir. Returns (root/train, root/masks)."""
    name = f"{repeats}_{INSTANCE_PROMPT}"
    folder, masks = Path(root) / "train" / name, Path(root) / "masks" / name
    folder.mkdir(parents=True, exist_ok=True)
    masks.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img, _, sc = instance_sample(i, seed, size)
        mask = subject_mask(sc, size)
        (noisy_background(img, mask, seed * 1000 + i) if noisy else img).save(folder / f"usu_{i:02d}.png")
        mask.save(masks / f"usu_{i:02d}.png")
    return folder.parent, masks.parent
