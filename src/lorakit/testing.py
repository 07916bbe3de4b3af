"""A tiny random SD1.x-family model and a folder of drawn discs, built in a second: the fixtures
the tests train on (the shipped, pretrained demo model is lorakit.demo; `lorakit quickstart` is
demo/workflow.py)."""

from __future__ import annotations

import logging
import random
from pathlib import Path

log = logging.getLogger("lorakit")


def draw_shapes(path: Path, seed: int, colour: tuple[int, int, int], size: int = 64) -> None:
    """A disc of one colour on a random plain background, at a random place and size."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    bg = tuple(rng.randint(0, 255) for _ in range(3))
    img = Image.new("RGB", (size, size), bg)
    r = rng.randint(size // 6, size // 3)
    cx, cy = rng.randint(r, size - r), rng.randint(r, size - r)
    ImageDraw.Draw(img).ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def make_dataset(root: Path, n_train: int = 6, n_reg: int = 6, repeats: int = 5) -> tuple[Path, Path]:
    """root/train/<repeats>_usu bear (black discs) and root/reg/1_bear (brown discs)."""
    train = root / "train" / f"{repeats}_usu bear"
    reg = root / "reg" / "1_bear"
    for i in range(n_train):
        draw_shapes(train / f"usu_{i:02d}.png", seed=i, colour=(20, 20, 20))
    for i in range(n_reg):
        draw_shapes(reg / f"bear_{i:02d}.png", seed=1000 + i, colour=(120, 80, 40))
    return root / "train", root / "reg"


def make_tiny_base(path: Path, seed: int = 0) -> Path:
    """A tiny SD1.x-family model as an LDM-layout .safetensors (random weights)."""
    from .models.loader import save_ldm_checkpoint
    from .models.tiny import build_models, tiny_arch

    arch = tiny_arch()
    unet, vae, te = build_models(arch, seed)
    save_ldm_checkpoint(path, unet, vae, te, arch)
    return path


# A tiny WD14-format tagger's tags: (name, category, weights on the image's mean B, G, R in 0-1, bias).
# Its score is sigmoid(weights . mean + bias): a red square scores 0.88 on long_hair and the character,
# a blue one on blue_sky; solo is always 0.88, ^_^ always 0.5, faint_tag always 0.27.
TINY_TAGGER_TAGS = (
    ("general", "9", (0, 0, 0), 2.0),
    ("sensitive", "9", (0, 0, 0), -2.0),
    ("questionable", "9", (0, 0, 0), -3.0),
    ("explicit", "9", (0, 0, 0), -4.0),
    ("solo", "0", (0, 0, 0), 2.0),
    ("long_hair", "0", (0, 0, 4), -2.0),
    ("blue_sky", "0", (4, 0, 0), -2.0),
    ("^_^", "0", (0, 0, 0), 0.0),
    ("faint_tag", "0", (0, 0, 0), -1.0),
    ("usu_bear_(series)", "4", (0, 0, 4), -2.0),
)


def make_tiny_tagger(folder: Path, tags=TINY_TAGGER_TAGS, size: int = 16) -> Path:
    """A WD14-format tagger folder (model.onnx + selected_tags.csv) whose scores are known: NHWC
    [N, size, size, 3] BGR 0-255 -> mean over the pixels -> /255 -> MatMul -> + bias -> Sigmoid.
    Needs the onnx package."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weights = np.array([t[2] for t in tags], dtype=np.float32).T / 255.0  # (3, T), on 0-255 input
    bias = np.array([t[3] for t in tags], dtype=np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["input_1"], ["mean"], axes=[1, 2], keepdims=0),
            helper.make_node("MatMul", ["mean", "weights"], ["logits_nobias"]),
            helper.make_node("Add", ["logits_nobias", "bias"], ["logits"]),
            helper.make_node("Sigmoid", ["logits"], ["predictions_sigmoid"]),
        ],
        "tiny_wd14_tagger",
        [helper.make_tensor_value_info("input_1", TensorProto.FLOAT, ["batch", size, size, 3])],
        [helper.make_tensor_value_info("predictions_sigmoid", TensorProto.FLOAT, ["batch", len(tags)])],
        [numpy_helper.from_array(weights, "weights"), numpy_helper.from_array(bias, "bias")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8  # read by every onnxruntime since 1.10
    onnx.checker.check_model(model)
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(folder / "model.onnx"))
    rows = ["tag_id,name,category,count"] + [f"{i},{t[0]},{t[1]},{100 - i}" for i, t in enumerate(tags)]
    (folder / "selected_tags.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return folder


def write_random_lora(base, path: Path, seed: int, scale: float = 0.2) -> Path:
    """A kohya LoRA file (rank 4, alpha 4) with random factors on every module of `base`'s family (UNet
    and text encoders), with the family's ss_base_model_version: what the drawing tests apply."""
    import torch
    from safetensors.torch import save_file

    spec = base.spec
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for target in spec.lora_targets(base, 4, 4.0, None, None, {"unet", *spec.text_encoder_parts}):
        w = target.module.weight
        tensors[f"{target.name}.lora_down.weight"] = (
            torch.randn(4, w.shape[1], *w.shape[2:], generator=g) * scale
        )
        tensors[f"{target.name}.lora_up.weight"] = (
            torch.randn(w.shape[0], 4, *([1] * (w.ndim - 2)), generator=g) * scale
        )
        tensors[f"{target.name}.alpha"] = torch.tensor(4.0)
    save_file(tensors, str(path), metadata={"ss_base_model_version": spec.version_string(False)})
    return Path(path)


def cpu_generator_with_random_lora(base_path: Path, lora_dir: Path, lora_name: str, seed: int = 1):
    """A CPU Generator over `base_path` whose `lora_dir` holds one random LoRA, `<lora_name>.safetensors`
    (write_random_lora): the drawing tests' model with a LoRA to call by name."""
    from .generate.pipeline import Generator

    gen = Generator.from_path(base_path, lora_dir, device="cpu")
    write_random_lora(gen.base, Path(lora_dir) / f"{lora_name}.safetensors", seed=seed)
    return gen
