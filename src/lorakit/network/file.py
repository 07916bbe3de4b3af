"""Reading and writing LoRA `.safetensors` files the way kohya does, written atomically."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import torch

from ..atomic import atomic_file
from ..errors import ModelError
from ..hashing import legacy_hash
from .lycoris_delta import TELLING_PARAMS, UNSUPPORTED
from .naming import needs_conversion, to_kohya

SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "float": torch.float32}


def addnet_hash_of_bytes(data: bytes) -> str:
    """sha256 of the tensor data: the bytes after the 8-byte length and the JSON header.

    This is kohya's `sshs_model_hash` and the hash A1111 shows as "Lora hashes" (first 12 hex)."""
    (n,) = struct.unpack("<Q", data[:8])
    return hashlib.sha256(data[8 + n :]).hexdigest()


def addnet_hash(path: str | Path) -> str:
    return addnet_hash_of_bytes(Path(path).read_bytes())


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_file(path) as f:
        f.write(data)


def save_lora_file(
    path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str], precision: str = "fp16"
) -> Path:
    """Cast to `precision` (alpha included, like kohya), add kohya's sshs_* hashes, write atomically."""
    from safetensors.torch import save

    dtype = SAVE_DTYPES[precision]
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in tensors.items()}
    # kohya hashes a serialisation that carries only the ss_* metadata; the data part is the same.
    probe = save(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    metadata = {
        **metadata,
        "sshs_model_hash": addnet_hash_of_bytes(probe),
        "sshs_legacy_hash": legacy_hash(probe),
    }
    atomic_write_bytes(path, save(tensors, metadata))
    return Path(path)


PICKLE_SUFFIXES = (".pt", ".ckpt", ".bin", ".pth")


def _to_kohya(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]
) -> dict[str, torch.Tensor]:
    try:
        return to_kohya(tensors, metadata)
    except ModelError as e:
        raise ModelError(f"{path}: {e}") from None


def read_lora_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A LoRA's tensors and metadata: the one reader for drawing, inspecting and network_weights.

    safetensors only: a .pt/.ckpt is a pickle, which can run code when loaded."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"LoRA file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        target = path.with_suffix(".safetensors")
        raise ModelError(
            f"{path}: a {suffix} LoRA is a pickle, which lorakit does not load (it can run code). Convert it "
            f'once, if you trust it, to {target.name}, e.g.: python -c "import torch, safetensors.torch as st; '
            f"st.save_file(torch.load(r'{path}', weights_only=True), r'{target}')\""
        )
    if suffix != ".safetensors":
        raise ModelError(f"{path}: lorakit reads LoRAs as .safetensors files only")
    data = path.read_bytes()
    try:
        tensors = load(data)
        (n,) = struct.unpack("<Q", data[:8])
        metadata = json.loads(data[8 : 8 + n]).get("__metadata__", {}) or {}
    except (SafetensorError, struct.error, ValueError) as e:
        raise ModelError(f"{path}: not a readable .safetensors file ({e})") from None
    if needs_conversion(tensors):  # diffusers/PEFT, ComfyUI, ai-toolkit names -> kohya's
        tensors = _to_kohya(path, tensors, metadata)
    params = {k.partition(".")[2] for k in tensors}
    if not params & set(TELLING_PARAMS):
        unsupported = sorted({label for p, label in UNSUPPORTED.items() if p in params})
        kind = (
            f"a LyCORIS {'/'.join(unsupported)} file, which lorakit does not apply"
            if unsupported
            else "no kohya LoRA keys (`*.lora_down.weight`) nor LyCORIS ones (`*.hada_w1_a`, `*.lokr_w1`, "
            "`*.diff`, `*.w_norm`, `*.on_input`)"
        )
        raise ModelError(
            f"{path}: {kind}; lorakit applies kohya LoRA / LoCon and LyCORIS LoHa, LoKr, (IA)³, full and "
            "norm files (incl. DoRA)"
        )
    return tensors, metadata
