"""What a LoRA file is: architecture, rank/alpha, module counts, and its training metadata."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

from .delta import lora_modules
from .file import addnet_hash, read_lora_file
from .lycoris_delta import ALGOS

TRAINING_KEYS = (
    ("ss_sd_model_name", "base model"),
    ("ss_base_model_version", "base model version"),
    ("ss_output_name", "output name"),
    ("ss_training_started_at", "started at"),
    ("ss_num_train_images", "train images (x repeats)"),
    ("ss_num_reg_images", "reg images"),
    ("ss_num_epochs", "epochs"),
    ("ss_epoch", "epoch saved"),
    ("ss_steps", "steps"),
    ("ss_learning_rate", "learning rate"),
    ("ss_unet_lr", "unet lr"),
    ("ss_text_encoder_lr", "text encoder lr"),
    ("ss_optimizer", "optimizer"),
    ("ss_lr_scheduler", "lr scheduler"),
    ("ss_resolution", "resolution"),
    ("ss_batch_size_per_device", "batch size"),
    ("ss_mixed_precision", "mixed precision"),
    ("ss_clip_skip", "clip skip"),
    ("ss_seed", "seed"),
    ("ss_training_comment", "comment"),
)


def architecture(keys: list[str]) -> str:
    # SD1 files may use LDM UNet names too (input_blocks_...); SDXL's have two text encoders, a
    # label embedding and transformer depth > 1, which SD1/SD2 never have
    sdxl_unet = re.compile(r"lora_unet_(label_emb|.*_transformer_blocks_[1-9])")
    if any(k.startswith(("lora_te1_", "lora_te2_")) or sdxl_unet.match(k) for k in keys):
        return "SDXL"
    if any(k.startswith("lora_transformer_") or "double_blocks" in k for k in keys):
        return "FLUX.1"
    if any(k.startswith(("lora_unet_", "lora_te_")) for k in keys):
        return "SD1.x/SD2.x"
    return "unknown"


# Who loads a kohya-format LoRA / LoCon file for SD1.x, SD2.x or SDXL (shared/reference
# lycoris-and-tools.md section 2). LyCORIS types, Tucker (lora_mid) and DoRA (dora_scale) narrow
# the list ("kohya sd-scripts" is its own networks.lora, not the LyCORIS package run from it).
KOHYA_CONSUMERS = ("A1111", "Forge", "ComfyUI", "kohya sd-scripts", "diffusers")


def consumers(architecture_name: str, modules: dict) -> list[str]:
    """The programs that load a kohya-format file of `architecture_name` with these ModuleDeltas."""
    if architecture_name not in ("SDXL", "SD1.x/SD2.x"):
        return []  # FLUX.1 / unknown: not a format lorakit vouches for
    out = list(KOHYA_CONSUMERS)
    kinds = {m.kind for m in modules.values()}
    if kinds - {"lora"}:
        # diffusers' SD/SDXL converter renames down/up/alpha/dora_scale only (it raises on the rest);
        # kohya's networks.lora knows none of LoHa/LoKr/(IA)3/full/norm
        out = [c for c in out if c not in ("diffusers", "kohya sd-scripts")]
    if "ia3" in kinds:
        out = [c for c in out if c != "ComfyUI"]  # comfy/weight_adapter has no (IA)3 adapter
    if any(m.mid is not None for m in modules.values()):
        # diffusers' kohya converter raises on keys it does not rename; kohya's networks.lora has no lora_mid
        out = [c for c in out if c not in ("diffusers", "kohya sd-scripts")]
    dora = [m for m in modules.values() if m.dora_scale is not None]
    if dora:
        out = [c for c in out if c != "kohya sd-scripts"]  # DoRA only through the LyCORIS package
        # A1111 (#15283) reads the input-axis dora_scale only: (1, in, ...), LyCORIS < 3.2's default
        if any(m.dora_scale.shape[0] != 1 for m in dora):
            out = [c for c in out if c != "A1111"]
    return out


def prediction(meta: dict[str, str]) -> str | None:
    """'v-prediction' / 'epsilon' from kohya's metadata (SDXL: modelspec.prediction_type only;
    SD1/SD2: ss_base_model_version's `_v`), None when the file says neither."""
    kind = meta.get("modelspec.prediction_type")
    version = meta.get("ss_base_model_version")
    if kind == "v" or (version or "").endswith("_v"):
        return "v-prediction"
    if kind == "epsilon" or version:
        return "epsilon"
    return None


def family_name(names: list[str], meta: dict[str, str], architecture_name: str) -> str:
    """'SD1.x' / 'SDXL' (the lorakit model family the file is for), else what the keys tell."""
    from ..models.families.base import lora_family

    family = lora_family(names, meta)
    if family is not None:
        return family.name
    if meta.get("ss_v2") == "True" or meta.get("ss_base_model_version", "").startswith("sd_v2"):
        return "SD2.x"
    return architecture_name


def dora_axis(m) -> str:
    """'output' (dora_scale (out, 1, ...), LyCORIS >= 3.2's default) or 'input' ((1, in, ...))."""
    return "input" if m.dora_scale.shape[0] == 1 and m.dora_scale.numel() > 1 else "output"


def inspect_lora(path: str | Path) -> dict:
    """A summary dict (what `lorakit inspect --json` prints)."""
    path = Path(path)
    tensors, meta = read_lora_file(path)
    modules = lora_modules(tensors, str(path))
    names = list(modules)
    # rank and alpha where the type has them (not (IA)3, full, norm, nor a LoKr of two full halves)
    dims = {n: m.rank for n, m in modules.items()}
    alphas = {
        n: (float(m.alpha) if m.alpha is not None and float(m.alpha) else float(m.rank))
        for n, m in modules.items()
        if m.rank is not None
    }
    conv3 = [
        n
        for n, m in modules.items()
        if m.kind == "lora" and (m.mid is not None or (m.down.dim() == 4 and m.down.shape[2] > 1))
    ]
    kinds = Counter(m.kind for m in modules.values())
    pairs = Counter((modules[n].kind, dims[n], alphas[n]) for n in alphas)
    dora = [m for m in modules.values() if m.dora_scale is not None]
    varies = len(pairs) > 1 or len(kinds) > 1
    tag_frequency = json.loads(meta["ss_tag_frequency"]) if meta.get("ss_tag_frequency") else {}
    top_tags = {
        folder: sorted(tags.items(), key=lambda kv: -kv[1])[:10] for folder, tags in tag_frequency.items()
    }
    arch = architecture(list(tensors))
    return {
        "file": str(path),
        "architecture": arch,
        "modules": {
            "text_encoder": sum(n.startswith("lora_te") for n in names),
            "unet": sum(n.startswith("lora_unet_") for n in names),
            "conv3x3_locon": len(conv3),
            "tucker": sum(m.tucker for m in modules.values()),
            "dora": len(dora),
            "algorithms": {k: kinds[k] for k in ALGOS if kinds[k]},  # "lora", "loha", "lokr", "ia3", ...
            "dora_axis": sorted({dora_axis(m) for m in dora}),
        },
        "dim_alpha": [
            {"algo": k, "dim": d, "alpha": a, "modules": c} for (k, d, a), c in pairs.most_common()
        ],
        "per_module": (
            {n: {"algo": m.kind, "dim": dims[n], "alpha": alphas.get(n)} for n, m in modules.items()}
            if varies
            else None
        ),
        "dtype": str(next(iter(tensors.values())).dtype).replace("torch.", ""),
        "hash": addnet_hash(path)[:12],
        "training": {label: meta[k] for k, label in TRAINING_KEYS if k in meta},
        "network_args": json.loads(meta["ss_network_args"]) if meta.get("ss_network_args") else None,
        "tag_frequency": top_tags,
        "metadata_keys": len(meta),
        "family": family_name(names, meta, arch),
        "prediction": prediction(meta),
        "zero_terminal_snr": meta.get("ss_zero_terminal_snr") == "True",
        "loads_in": consumers(arch, modules),
    }


def display_width(text: str) -> int:
    """Columns a terminal gives `text`: CJK and other wide characters take two."""
    import unicodedata

    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def readable_time(value: str) -> str:
    """kohya's unix times ('1764140000.123') as local date and time; other text unchanged."""
    import time

    try:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(value)))
    except (TypeError, ValueError, OverflowError, OSError):
        return str(value)


def format_table(info: dict) -> str:
    lines = [f"{info['file']}", ""]

    def row(k, v):
        lines.append(f"  {k}{' ' * max(1, 27 - display_width(str(k)))}{v}")

    row("architecture", info["architecture"])
    if "family" in info:  # (summaries from before these keys lack them)
        row("family", info["family"])
        if info["prediction"]:
            ztsnr = ", zero terminal SNR" if info["zero_terminal_snr"] else ""
            row("prediction", info["prediction"] + ztsnr)
        row("loads in", ", ".join(info["loads_in"]) or "not known (not a kohya SD1.x/SD2.x/SDXL LoRA)")
    m = info["modules"]
    row(
        "modules",
        f"{m['text_encoder']} text encoder + {m['unet']} U-Net ({m['conv3x3_locon']} LoCon 3x3 convs)",
    )
    algos = m.get("algorithms", {})  # (summaries from before LyCORIS types lack it)
    if set(algos) - {"lora"}:
        row("algorithms", ", ".join(f"{ALGOS[k].label} {n}" for k, n in algos.items()))
    if m["tucker"] or m["dora"]:
        axis = f", {' and '.join(m['dora_axis'])} axis" if m.get("dora_axis") else ""
        row("LyCORIS", f"{m['tucker']} Tucker modules, {m['dora']} DoRA (dora_scale{axis}) modules")
    for da in info["dim_alpha"]:
        algo = f"{ALGOS[da['algo']].label}, " if da.get("algo", "lora") != "lora" else ""
        row(
            "dim / alpha",
            f"{da['dim']} / {da['alpha']:g}  ({algo}{da['modules']} modules, scale {da['alpha'] / da['dim']:g})",
        )
    ranked = Counter()
    for da in info["dim_alpha"]:
        ranked[da.get("algo", "lora")] += da["modules"]
    for kind, count in algos.items():  # (IA)3, full, norm, LoKr of two full halves: no rank/alpha
        if count > ranked[kind]:
            row("no rank", f"{ALGOS[kind].label}, {count - ranked[kind]} modules, scale 1")
    row("dtype", info["dtype"])
    row("hash (A1111 'Lora hashes')", info["hash"])
    if info["network_args"]:
        row("network args", info["network_args"])
    if info["training"]:
        lines += ["", "  training"]
        for k, v in info["training"].items():
            row(k, readable_time(v) if k == "started at" else v)
    if info["tag_frequency"]:
        lines += ["", "  tag frequency"]
        for folder, tags in info["tag_frequency"].items():
            row(folder, ", ".join(f"{t} ({c})" for t, c in tags))
    if info["per_module"]:
        lines += ["", "  per module (type or dim/alpha vary)"]
        for n, v in info["per_module"].items():
            algo = v.get("algo", "lora")
            label = ALGOS[algo].label + (" (two full matrices, scale 1)" if algo == "lokr" else "")
            row(n, f"{ALGOS[algo].label} {v['dim']} / {v['alpha']:g}" if v["dim"] is not None else label)
    return "\n".join(lines)
