"""Bake LoRAs into a base model for good: kohya's merge_lora.py / sdxl_merge_lora.py with --sd_model.

The output keeps the input's layout. A single-file checkpoint (LDM keys for SD1, SGM keys for SDXL;
.safetensors or .ckpt) becomes a .safetensors with exactly the input's keys; a diffusers folder
becomes a diffusers folder. Only the tensors the LoRAs name change: W + Σ ratio·ΔW, each LoRA worked
out against the base weight by the same `module_update` / `bias_update` LoraMerger uses (so every
type delta.py reads bakes alike: LoRA/LoCon, LoHa, LoKr, (IA)³, full with diff_b, norm, DoRA).
Every other tensor is copied byte for byte.

No model is built with real weights: empty (meta) models give LoraMerger the kohya names and weight
shapes it checks a LoRA against, and each module's path is mapped onto the file's key (LDM/SGM names
through ldm_layout; SDXL's second text encoder stacks q/k/v in one OpenCLIP `in_proj_weight`, so those
modules own a third of its rows). The file is then streamed through (safetensors_stream): memory
stays at about one tensor plus the LoRAs, not a copy of the model.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch

from ..atomic import atomic_path, make_temp_dir, replace_file
from ..errors import ConfigError, ModelError
from .delta import ModuleDelta, bias_update, module_update
from .merge import LoraMerger

log = logging.getLogger("lorakit")

PRECISIONS = {"float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_TE2_QKV = {"self_attn.q_proj": 0, "self_attn.k_proj": 1, "self_attn.v_proj": 2}


@dataclass(frozen=True)
class Slot:
    """Where a module's weight lives in the checkpoint."""

    key: str  # the tensor's key in the file
    rows: tuple[int, int] | None = None  # the rows of that tensor it owns (bigG's stacked q/k/v); None: all
    part: str = ""  # diffusers: the component folder ("unet", "text_encoder", ...); "" for a single file


@dataclass
class _Edit:
    """One layer's weight or bias inside a tensor of the file, and the modules (with ratios) that change it."""

    rows: tuple[int, int] | None
    shape: torch.Size  # the layer's own shape of it (the file's may differ: 1x1 conv vs linear)
    param: str  # "weight" | "bias"
    modules: list[tuple[ModuleDelta, float]]


@dataclass
class _Patch:
    """What happens to one tensor of the file: its edits, in order."""

    edits: list[_Edit] = field(default_factory=list)

    def apply(self, t: torch.Tensor, merge_dtype: torch.dtype) -> torch.Tensor:
        out = t.to(merge_dtype, copy=True)
        for e in self.edits:
            base = (t if e.rows is None else t[e.rows[0] : e.rows[1]]).reshape(e.shape)
            target = out if e.rows is None else out[e.rows[0] : e.rows[1]]  # a view: adds land in `out`
            for m, ratio in e.modules:  # each LoRA against the base weight, as LoraMerger and A1111 do
                update = module_update(m, base, ratio) if e.param == "weight" else bias_update(m, ratio)
                if update is not None:
                    target.add_(update.reshape(target.shape).to(merge_dtype))
        return out


@dataclass
class BakeResult:
    path: Path
    modules: int  # modules changed (a module two LoRAs name counts once)
    tensors: int  # tensors changed in the file
    size: int  # bytes written
    seconds: float


@dataclass
class _Base:
    """A base model seen through its file: family, empty models, keys."""

    path: Path
    kind: str  # "single_file" | "diffusers"
    family: object  # detect.Family
    spec: object  # ModelFamily
    unet: torch.nn.Module
    text_encoders: tuple
    metadata: dict[str, str]
    source: object = None  # single file: SafetensorsSource / TensorSource


# --------------------------------------------------------------------------- opening the base


def _open_single_file(path: Path) -> _Base:
    from ..models import loader
    from ..models.checkpoint import is_safetensors, read_state_dict
    from ..models.families import sdxl
    from ..models.families.base import family_spec
    from ..models.families.detect import SHAPE_KEYS, detect_family
    from ..models.safetensors_stream import SafetensorsSource, TensorSource

    if is_safetensors(path):
        source = SafetensorsSource(path)
        shapes = {k: source.info(k)[1] for k in source.keys()}
    else:  # a pickle: unpickled with the restricted (weights-only) unpickler, its tensors mapped
        source = TensorSource(*read_state_dict(path, mmap=True))
        shapes = {k: tuple(v.shape) for k, v in source.tensors.items()}
    try:
        keys = source.keys()
        family = detect_family(keys, {k: s for k, s in shapes.items() if k in SHAPE_KEYS})
        if family.key == "sdxl" and not family.inpainting:
            family = sdxl._check_sgm_keys(path, keys, shapes)
            unet, _, te1, te2 = sdxl.build_sdxl_empty(sdxl._arch_of(path, source.metadata))
            tes = (te1, te2)
        else:  # SD1, or a clear refusal: a LoRA given as the base, SD2, FLUX, inpainting, not a model
            loader._check_kind(path, keys, {k: s for k, s in shapes.items() if k in SHAPE_KEYS})
            if family.key != "sd1":
                raise ModelError(f"{path}: not an SD1.x or SDXL checkpoint ({family.label})")
            unet, _, te = loader._build_empty(loader._arch_from_metadata(path, source.metadata))
            tes = (te,)
    except BaseException:
        source.close()
        raise
    return _Base(path, "single_file", family, family_spec(family.key), unet, tes, source.metadata, source)


def _open_diffusers(path: Path) -> _Base:
    from ..models.families.base import family_spec
    from ..models.families.detect import unsupported_message
    from ..models.loader import base_family

    family = base_family(path, "diffusers")
    if family.key not in ("sd1", "sdxl") or family.inpainting:
        raise ModelError(f"{path}: {unsupported_message(family)}")
    parts = ("unet", "vae", "text_encoder") + (("text_encoder_2",) if family.key == "sdxl" else ())
    arch = {}
    for part in parts:
        config = path / part / "config.json"
        if not config.is_file():
            raise ModelError(f"{path}: the diffusers folder has no {part}/config.json")
        arch[part] = json.loads(config.read_text(encoding="utf-8"))
    from accelerate import init_empty_weights

    with init_empty_weights():
        if family.key == "sdxl":
            from ..models.families.sdxl import build_sdxl

            unet, _, te1, te2 = build_sdxl(arch)
            tes = (te1, te2)
        else:
            from ..models.loader import build_from_arch

            unet, _, te = build_from_arch(arch)
            tes = (te,)
    return _Base(path, "diffusers", family, family_spec(family.key), unet, tes, {})


# --------------------------------------------------------------------------- kohya name -> file key


def _module_paths(base: _Base) -> dict[int, tuple[str, str]]:
    """id(module) -> (part, path): "unet" or "te0"/"te1", and the module's path inside that model."""
    out = {id(m): ("unet", p) for p, m in base.unet.named_modules()}
    for i, te in enumerate(base.text_encoders):
        out.update({id(m): (f"te{i}", p) for p, m in te.named_modules()})
    return out


def _first_present(candidates: list[str], keys) -> str:
    return next((k for k in candidates if k in keys), candidates[0])


def _single_file_slot(base: _Base, part: str, path: str, module, keys, unet_ldm: dict, param: str) -> Slot:
    from ..models import ldm_layout
    from ..models.families import sgm_layout

    inner = path.removeprefix("text_model.")  # transformers >= 5.6 has no text_model wrapper
    if part == "unet":
        if path not in unet_ldm:
            raise ModelError(f"UNet module {path!r} has no name in the single-file (LDM/SGM) layout")
        return Slot(f"{ldm_layout.UNET_PREFIX}{unet_ldm[path]}.{param}")
    if base.family.key == "sd1":  # old files lack `text_model.` in their TE keys (kohya adds it)
        prefix = ldm_layout.TE_PREFIX
        return Slot(_first_present([f"{prefix}text_model.{inner}.{param}", f"{prefix}{inner}.{param}"], keys))
    if part == "te0":  # SDXL CLIP-L keeps the HF layout
        prefix = sgm_layout.TE1_PREFIX
        return Slot(_first_present([f"{prefix}text_model.{inner}.{param}", f"{prefix}{inner}.{param}"], keys))
    # SDXL bigG in OpenCLIP layout: q/k/v are the three thirds of in_proj_weight / in_proj_bias
    if inner == "final_layer_norm":
        return Slot(f"{sgm_layout.TE2_PREFIX}ln_final.{param}")
    m = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)", inner)
    if m is None:
        raise ModelError(f"text encoder 2 module {path!r} has no OpenCLIP equivalent")
    layer, child = m[1], m[2]
    block = f"{sgm_layout.TE2_PREFIX}transformer.resblocks.{layer}"
    if child in _TE2_QKV:
        width = module.weight.shape[0]
        start = _TE2_QKV[child] * width
        return Slot(f"{block}.attn.in_proj_{param}", (start, start + width))
    if child not in sgm_layout._TE2_LAYER:
        raise ModelError(f"text encoder 2 module {path!r} has no OpenCLIP equivalent")
    return Slot(f"{block}.{sgm_layout._TE2_LAYER[child]}.{param}")


def _diffusers_slot(part: str, path: str, keys_of: Callable[[str], set], param: str) -> Slot:
    if part == "unet":
        return Slot(f"{path}.{param}", part="unet")
    folder = "text_encoder" if part == "te0" else "text_encoder_2"
    inner = path.removeprefix("text_model.")
    key = _first_present([f"text_model.{inner}.{param}", f"{inner}.{param}"], keys_of(folder))
    return Slot(key, part=folder)


# --------------------------------------------------------------------------- metadata


def model_title(path: Path, metadata: dict[str, str]) -> str:
    return metadata.get("modelspec.title") or path.stem  # kohya's build_merged_from


def bake_metadata(
    base: _Base, loras: list[tuple[Path, dict[str, str]]], save_to: Path, no_metadata: bool
) -> dict[str, str]:
    """The base's own metadata (lorakit.arch included), less its now stale hashes, plus modelspec
    as kohya's merge_lora writes it: title = the output's name, merged_from = base and LoRA titles."""
    out = {k: v for k, v in base.metadata.items() if not k.startswith("modelspec.hash")}
    out.setdefault("format", "pt")
    if no_metadata:
        return out
    spec = base.spec
    out.setdefault("modelspec.sai_model_spec", "1.0.1")
    out.setdefault("modelspec.architecture", spec.modelspec_architecture)
    out.setdefault("modelspec.implementation", spec.modelspec_implementation)
    if base.family.key == "sdxl":  # SD1 v-pred shows in no key: leave prediction_type to the base's own
        out.setdefault("modelspec.prediction_type", "v" if base.family.v_pred else "epsilon")
    titles = [model_title(base.path, base.metadata)] + [model_title(p, md) for p, md in loras]
    out.update(
        {
            "modelspec.title": save_to.stem,
            "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "modelspec.merged_from": ", ".join(titles),
        }
    )
    return out


# --------------------------------------------------------------------------- baking


def _check_output(sd_model: Path, save_to: Path, kind: str, overwrite: bool) -> None:
    if save_to.exists() and sd_model.exists() and save_to.resolve() == sd_model.resolve():
        raise ConfigError(
            f"--save_to {save_to} is the base model itself: write the merged model under another name"
        )
    if kind == "single_file" and save_to.suffix.lower() != ".safetensors":
        raise ConfigError(
            f"--save_to {save_to}: lorakit writes checkpoints as .safetensors; name it *.safetensors"
        )
    if kind == "diffusers" and save_to.suffix.lower() in (".safetensors", ".ckpt"):
        raise ConfigError(
            f"--save_to {save_to}: the base is a diffusers folder, so the merged model is one too; "
            "give a folder name (without .safetensors)"
        )
    if save_to.exists() and not overwrite:
        raise ConfigError(f"--save_to {save_to} already exists; pass --overwrite to replace it")
    if save_to.exists() and (save_to.is_dir() != (kind == "diffusers")):
        what = "a folder" if save_to.is_dir() else "a file"
        raise ConfigError(f"--save_to {save_to} is {what}; it cannot be replaced by the merged model")


def bake_loras(
    sd_model: str | Path,
    models: list[str | Path],
    ratios: list[float] | None,
    save_to: str | Path,
    *,
    save_precision: str | None = None,
    precision: str = "float",
    no_metadata: bool = False,
    overwrite: bool = False,
) -> BakeResult:
    """Bake LoRA files `models` (each at its ratio, default 1.0) into the base `sd_model` and write the
    result to `save_to` in the base's layout, atomically. Every LoRA is checked against the base
    before anything is written: a LoRA for another family is refused and no output is left."""
    from ..models.loader import model_kind
    from .file import read_lora_file

    started = time.monotonic()
    sd_model, save_to = Path(sd_model).expanduser(), Path(save_to).expanduser()
    ratios = ratios_for(models, ratios)
    if save_precision is not None and save_precision not in PRECISIONS:
        raise ConfigError(f"--save_precision {save_precision!r}: choose one of {', '.join(PRECISIONS)}")
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    kind = model_kind(sd_model)
    _check_output(sd_model, save_to, kind, overwrite)
    loras = [(Path(p), *read_lora_file(p)) for p in models]
    base = _open_diffusers(sd_model) if kind == "diffusers" else _open_single_file(sd_model)
    try:
        merger = LoraMerger.for_base(
            SimpleNamespace(spec=base.spec, unet=base.unet, text_encoders=base.text_encoders)
        )
        resolved = [
            (path, merger.resolve(path.name, tensors), ratio)
            for (path, tensors, _), ratio in zip(loras, ratios)
        ]
        patches, modules = _plan(base, merger, resolved)
        log.info(
            "merging %d LoRA(s) into %s: %d modules, %d tensors change",
            len(loras), sd_model.name, modules, len(patches),
        )  # fmt: skip
        cast = PRECISIONS[save_precision] if save_precision else None
        if kind == "diffusers":
            size = _write_diffusers(base, save_to, patches, PRECISIONS[precision], cast)
        else:
            metadata = bake_metadata(base, [(p, md) for p, _, md in loras], save_to, no_metadata)
            size = _write_single_file(base, save_to, patches, PRECISIONS[precision], cast, metadata)
    finally:
        if base.source is not None:
            base.source.close()
    seconds = time.monotonic() - started
    log.info("saved %s (%s) in %.1f s", save_to, size_text(size), seconds)
    return BakeResult(save_to, modules, len(patches), size, seconds)


def size_text(size: int) -> str:
    return f"{size / 1e9:.2f} GB" if size >= 1e9 else f"{size / 1e6:.1f} MB"


def ratios_for(models: list, ratios: list[float] | None) -> list[float]:
    if not models:
        raise ConfigError("--models: name at least one LoRA file to merge")
    if not ratios:
        return [1.0] * len(models)
    if len(ratios) != len(models):
        raise ConfigError(
            f"--ratios: {len(ratios)} given for {len(models)} models; give one per model (or none: 1.0)"
        )
    return [float(r) for r in ratios]


def _plan(base: _Base, merger: LoraMerger, resolved) -> tuple[dict[tuple[str, str], _Patch], int]:
    """(part, key) -> _Patch for every tensor that changes, and the number of modules changed."""
    from ..models.ldm_layout import unet_module_paths_to_ldm

    paths = _module_paths(base)
    per_module: dict[str, list[tuple[ModuleDelta, float]]] = {}
    for _, modules, ratio in resolved:
        for name, m in modules.items():
            if ratio != 0:
                per_module.setdefault(name, []).append((m, ratio))
    layers = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.GroupNorm, torch.nn.LayerNorm)
    if base.kind == "single_file":
        keys = set(base.source.keys())
        unet_ldm = unet_module_paths_to_ldm(
            [p for p, m in base.unet.named_modules() if isinstance(m, layers)]
        )
    else:
        shape_cache: dict[str, dict[str, tuple]] = {}

        def keys_of(folder: str) -> dict[str, tuple]:
            if folder not in shape_cache:
                shape_cache[folder] = _folder_shapes(base.path, folder)
            return shape_cache[folder]

    patches: dict[tuple[str, str], _Patch] = {}
    for name, modules in sorted(per_module.items()):
        layer = merger.layer(name)
        part, path = paths[id(layer)]
        params = ["weight"] + (["bias"] if any(m.bias_delta is not None for m, _ in modules) else [])
        for param in params:
            if base.kind == "single_file":
                slot = _single_file_slot(base, part, path, layer, keys, unet_ldm, param)
                shape = base.source.info(slot.key)[1] if slot.key in keys else None
            else:
                slot = _diffusers_slot(part, path, keys_of, param)
                shape = keys_of(slot.part).get(slot.key)
            own = getattr(layer, param).shape
            _check_slot(base, name, slot, shape, own)
            patches.setdefault((slot.part, slot.key), _Patch()).edits.append(
                _Edit(slot.rows, own, param, modules)
            )
    return patches, len(per_module)


def _check_slot(base: _Base, name: str, slot: Slot, shape: tuple | None, own: torch.Size) -> None:
    """The file's tensor exists and holds exactly the layer's weight / bias (or its rows)."""
    if shape is None:
        raise ModelError(
            f"{base.path}: LoRA module {name} belongs in tensor '{slot.key}', which the checkpoint "
            "lacks; is it a complete base model?"
        )
    rows = slot.rows or (0, shape[0] if shape else 1)
    if (rows[1] - rows[0]) * _numel(shape[1:]) != _numel(own) or rows[1] > (shape[0] if shape else 1):
        raise ModelError(
            f"{base.path}: tensor '{slot.key}' {list(shape)} does not hold module {name}'s "
            f"{list(own)}; the checkpoint is not the architecture it claims"
        )


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _write_single_file(base: _Base, save_to: Path, patches, merge_dtype, cast, metadata) -> int:
    from ..models.safetensors_stream import write_streamed

    change = {key: _changer(p, merge_dtype) for (_, key), p in patches.items()}
    with atomic_path(save_to) as tmp:  # a failure or Ctrl-C leaves no output behind
        return write_streamed(tmp, base.source, metadata, change, cast, _Progress(save_to.name))


class _Progress:
    """Logs how far a long write is, at most every few seconds (an SDXL checkpoint takes a minute)."""

    def __init__(self, name: str, every_s: float = 5.0):
        self.name, self.every_s = name, every_s
        self.next = time.monotonic() + every_s

    def __call__(self, done: int, total: int) -> None:
        if time.monotonic() >= self.next and done < total:
            log.info("  %s: %.2f of %.2f GB written", self.name, done / 1e9, total / 1e9)
            self.next = time.monotonic() + self.every_s


def _changer(patch: _Patch, merge_dtype: torch.dtype):
    return lambda t: patch.apply(t, merge_dtype)


# --------------------------------------------------------------------------- diffusers folders


_PARTS = ("unet", "text_encoder", "text_encoder_2")
_PICKLES = (".bin", ".pt", ".pth", ".ckpt")


def _weight_files(root: Path, folder: str) -> list[Path]:
    files = sorted((root / folder).glob("*.safetensors"))
    if not files:
        found = sorted(p.name for p in (root / folder).glob("*") if p.suffix in _PICKLES)
        what = f" only {', '.join(found)} (pickles, which lorakit does not load)" if found else " no weights"
        raise ModelError(
            f"{root}: {folder}/ has{what}; lorakit bakes into .safetensors weights. Convert the folder "
            "with diffusers (save_pretrained(..., safe_serialization=True)) first"
        )
    return files


def _folder_shapes(root: Path, folder: str) -> dict[str, tuple[int, ...]]:
    """key -> shape over all the component's .safetensors files (shards, variants), from headers."""
    from ..models.checkpoint import safetensors_header

    out: dict[str, tuple[int, ...]] = {}
    for f in _weight_files(root, folder):
        out.update(safetensors_header(f).shapes)
    return out


def _write_diffusers(base: _Base, save_to: Path, patches, merge_dtype, cast) -> int:
    """Copy the folder; rewrite each component .safetensors (shards, variants) that holds a changed
    tensor; then rename the copy into place. Files without changes are copied as they are (cast
    with --save_precision when they are weights)."""
    from ..models.safetensors_stream import SafetensorsSource, write_streamed

    tmp = make_temp_dir(save_to)
    size = 0
    done: set[tuple[str, str]] = set()
    try:
        for src in sorted(base.path.rglob("*")):
            rel = src.relative_to(base.path)
            dst = tmp / rel
            if src.is_dir():
                dst.mkdir(parents=True, exist_ok=True)
                continue
            part = rel.parts[0] if len(rel.parts) > 1 else ""
            if src.suffix in _PICKLES and any(p == part for p, _ in patches):
                # the same weights as pickles would keep the base's values beside the baked .safetensors
                log.warning("  left out %s: pickle weights beside the baked .safetensors ones", rel)
                continue
            weights = src.suffix == ".safetensors" and (part in _PARTS or cast is not None)
            if not weights:
                shutil.copy2(src, dst)
                size += dst.stat().st_size
                continue
            source = SafetensorsSource(src)
            try:
                change = {
                    key: _changer(p, merge_dtype)
                    for (p_part, key), p in patches.items()
                    if p_part == part and key in source.entries
                }
                done.update((part, key) for key in change)
                size += write_streamed(dst, source, source.metadata, change, cast, _Progress(str(rel)))
            finally:
                source.close()
        missing = sorted(set(patches) - done)
        if missing:
            raise ModelError(f"{base.path}: no weight file holds '{missing[0][1]}' in {missing[0][0]}/")
        _replace_folder(tmp, save_to)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return size


def _replace_folder(tmp: Path, save_to: Path) -> None:
    """Rename the finished copy onto `save_to`; an old folder there (--overwrite) is moved aside
    first and removed after, so a failure in between leaves one complete folder under a name."""
    old = None
    if save_to.exists():
        old = make_temp_dir(save_to, ".old")
        old.rmdir()
        replace_file(save_to, old)
    replace_file(tmp, save_to)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
