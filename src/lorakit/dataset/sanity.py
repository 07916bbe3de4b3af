"""Dataset sanity: warnings (never errors) about data that trains badly, found cheaply, with no model.

Used by the trainer's pre-flight log and by the GUI's Dataset tab, so both say the same things:
images much smaller than the training resolution, byte-identical and near-identical images,
captions that forget the folder's trigger word.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image

from ..config import resolution_of
from ..hashing import file_sha256
from .folders import DatasetPlan, parse_folder_name

UPSCALE_LIMIT = 2.0  # an image blown up more than 2x (each side) trains blurry
NEAR_DUPLICATE_BITS = 2  # Hamming distance of two 8x8 average hashes that counts as "the same picture"
NEAR_COLOUR_DIFFERENCE = 12  # mean |difference| (0-255) of their 8x8 RGB thumbnails, to confirm it
SHOWN = 5  # files named in a warning; the rest are counted


def sanity_warnings(plan: DatasetPlan, resolution, enable_bucket: bool = False) -> list[str]:
    """All the checks of this module, each warning naming the files and what to do."""
    images = unique_images(plan)
    return [
        *small_image_warnings(plan, resolution, enable_bucket),
        *duplicate_warnings(images),
        *trigger_word_warnings(plan),
    ]


def unique_images(plan: DatasetPlan) -> list[Path]:
    """Each image once, in plan order (repeats make equal samples)."""
    return list(dict.fromkeys(s.image for s in plan.samples))


def _listed(paths: Sequence[Path | str]) -> str:
    shown = ", ".join(str(p) for p in paths[:SHOWN])
    return shown + (f" and {len(paths) - SHOWN} more" if len(paths) > SHOWN else "")


# --- small images -----------------------------------------------------------------------------


def upscale_factor(size: tuple[int, int], resolution: tuple[int, int], enable_bucket: bool) -> float:
    """How much an image is enlarged for training: without buckets it is resized to cover the
    resolution; with buckets to about the resolution's area (kohya keeps the aspect ratio)."""
    (iw, ih), (w, h) = size, resolution
    if enable_bucket:
        return ((w * h) / (iw * ih)) ** 0.5
    return max(w / iw, h / ih)


def small_image_warnings(plan: DatasetPlan, resolution, enable_bucket: bool = False) -> list[str]:
    reso = resolution_of(resolution)
    sizes = {s.image: s.size for s in plan.samples}
    small = [p for p, size in sizes.items() if upscale_factor(size, reso, enable_bucket) > UPSCALE_LIMIT]
    if not small:
        return []
    shown = [f"{p} ({sizes[p][0]}x{sizes[p][1]})" for p in small]
    return [
        f"{len(small)} image(s) are less than half the training resolution {reso[0]}x{reso[1]} and are "
        f"upscaled more than {UPSCALE_LIMIT:g}x, which trains blurry: {_listed(shown)}. "
        "Replace them with larger originals, or lower the resolution."
    ]


# --- duplicates -------------------------------------------------------------------------------


def fingerprint(path: Path) -> tuple[int, bytes] | None:
    """(64-bit average hash of the 8x8 grayscale image: 1 where brighter than the mean, the 8x8 RGB
    pixels), or None if unreadable. The hash finds candidates; the colours confirm them, since a
    hash alone matches any two plain pictures with a blob at the same place."""
    try:
        with Image.open(path) as im:
            im.draft("RGB", (64, 64))  # JPEG decodes at a fraction of its size: much faster
            rgb = im.convert("RGB").resize((8, 8), Image.Resampling.BOX)
    except Exception:  # the folder scan already reports unreadable images
        return None
    pixels = rgb.convert("L").tobytes()
    mean = sum(pixels) / len(pixels)
    return sum(1 << i for i, v in enumerate(pixels) if v > mean), rgb.tobytes()


def _same_colours(a: bytes, b: bytes, tolerance: float = NEAR_COLOUR_DIFFERENCE) -> bool:
    return sum(abs(x - y) for x, y in zip(a, b)) / len(a) <= tolerance


def _parallel(fn, paths: list[Path]) -> list:
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return list(pool.map(fn, paths))


def _groups(pairs: Iterable[tuple[int, int]], n: int) -> list[list[int]]:
    """Connected groups (size 2+) of the indices joined by `pairs` (union-find)."""
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in pairs:
        parent[root(a)] = root(b)
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(root(i), []).append(i)
    return [g for g in groups.values() if len(g) > 1]


def near_pairs(hashes: Sequence[int], max_bits: int = NEAR_DUPLICATE_BITS) -> list[tuple[int, int]]:
    """Index pairs whose hashes differ in at most `max_bits` bits. Split into max_bits + 1 chunks, two
    such hashes agree exactly on one chunk at least, so only hashes sharing a chunk are compared."""
    chunks = max_bits + 1
    width = -(-64 // chunks)
    mask = (1 << width) - 1
    pairs: set[tuple[int, int]] = set()
    for c in range(chunks):
        by_chunk: dict[int, list[int]] = {}
        for i, h in enumerate(hashes):
            by_chunk.setdefault((h >> (c * width)) & mask, []).append(i)
        for members in by_chunk.values():
            for x, a in enumerate(members):
                for b in members[x + 1 :]:
                    if bin(hashes[a] ^ hashes[b]).count("1") <= max_bits:
                        pairs.add((a, b))
    return sorted(pairs)


def duplicate_groups(images: Sequence[Path]) -> tuple[list[list[Path]], list[list[Path]]]:
    """(byte-identical groups, near-identical groups). A near group lists one file of each
    byte-identical group, so a plain copy is reported once, as identical."""
    by_size: dict[int, list[Path]] = {}
    for p in images:
        by_size.setdefault(p.stat().st_size, []).append(p)
    same_size = [p for g in by_size.values() if len(g) > 1 for p in g]  # only these can be copies
    by_sha: dict[str, list[Path]] = {}
    for p, sha in zip(same_size, _parallel(file_sha256, same_size)):
        by_sha.setdefault(sha, []).append(p)
    identical = [g for g in by_sha.values() if len(g) > 1]
    copies = {p for g in identical for p in g[1:]}
    distinct = [p for p in images if p not in copies]
    prints = _parallel(fingerprint, distinct)
    readable = [(p, f) for p, f in zip(distinct, prints) if f is not None]
    pairs = near_pairs([f[0] for _, f in readable])
    pairs = [(a, b) for a, b in pairs if _same_colours(readable[a][1][1], readable[b][1][1])]
    near_idx = _groups(pairs, len(readable))
    near = [[readable[i][0] for i in g] for g in near_idx]
    return identical, near


def duplicate_warnings(images: Sequence[Path]) -> list[str]:
    identical, near = duplicate_groups(images)
    out = []
    for g in identical:
        out.append(
            f"{len(g)} files are byte-identical: {_listed(g)}. A copy trains that image more often; "
            "delete the copies (use repeats to weight an image)."
        )
    for g in near:
        out.append(
            f"{len(g)} images look nearly identical: {_listed(g)}. They weigh that picture more than the "
            "others; keep one unless that is what you want."
        )
    return out


# --- trigger word -----------------------------------------------------------------------------


def trigger_word_warnings(plan: DatasetPlan) -> list[str]:
    """Train folders named `<repeats>_<token> <class>` whose images' captions lack <token>.

    A caption file replaces the folder prompt, so kohya users who caption their images often forget
    to write the trigger word in them; the LoRA then does not answer to it."""
    missing: dict[Path, list[Path]] = {}
    tokens: dict[Path, str] = {}
    seen: set[Path] = set()
    for s in plan.samples:
        if s.is_reg or s.image in seen:
            continue
        seen.add(s.image)
        parsed = parse_folder_name(s.image.parent.name)
        words = parsed[1].split() if parsed else []
        if len(words) < 2:  # no '<token> <class>': nothing to check against
            continue
        token = words[0]
        if not re.search(rf"(?<!\w){re.escape(token)}(?!\w)", s.caption, re.IGNORECASE):
            missing.setdefault(s.image.parent, []).append(s.image)
            tokens[s.image.parent] = token
    return [
        f"{folder}: {len(imgs)} caption(s) do not contain the trigger word '{tokens[folder]}' "
        f"(the first word of the folder name): {_listed([p.name for p in imgs])}. "
        f"Add '{tokens[folder]}' to those captions, or the LoRA will not answer to it."
        for folder, imgs in missing.items()
    ]


# --- batches, without building the dataset (no torch): the GUI's step math ---------------------


def count_batches(plan: DatasetPlan, cfg) -> int:
    """Batches per epoch as DreamBoothDataset counts them: Σ over buckets of ceil(samples / batch size)."""
    from .buckets import BucketManager

    manager = BucketManager.from_config(cfg)
    bucket_of = {p: manager.select(*s.size).bucket for p, s in {s.image: s for s in plan.samples}.items()}
    counts: dict[tuple[int, int], int] = {}
    for s in plan.samples:
        counts[bucket_of[s.image]] = counts.get(bucket_of[s.image], 0) + 1
    batch = max(1, int(cfg.train_batch_size))
    return sum(-(-n // batch) for n in counts.values())
