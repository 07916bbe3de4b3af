"""Natural-language captions from a transformers image-to-text model folder (BLIP
`BlipForConditionalGeneration`, GIT `GitForCausalLM`, or what `AutoModelForImageTextToText` loads),
with the processor saved beside it. Loaded with local_files_only: nothing is downloaded."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ..errors import ModelError

EXAMPLE_REPO = "Salesforce/blip-image-captioning-large"


@dataclass
class TextOptions:
    """kohya make_captions.py's generation flags (beam search or greedy, no sampling: repeatable)."""

    max_length: int = 75
    min_length: int = 5
    num_beams: int = 1
    prompt: str = ""  # a conditional start ("a photo of"), or a model's task token


def _load_model(folder: Path):
    import transformers

    config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    names = getattr(config, "architectures", None) or []
    for name in names:  # the class the folder was saved from, when transformers has it
        cls = getattr(transformers, name, None)
        if cls is not None and name.endswith(("ForConditionalGeneration", "ForCausalLM")):
            return cls.from_pretrained(folder, local_files_only=True)
    return transformers.AutoModelForImageTextToText.from_pretrained(folder, local_files_only=True)


class TextCaptioner:
    """One sentence per image, from the model folder's own processor and generate()."""

    kind = "text"

    def __init__(self, folder: str | Path, opts: TextOptions | None = None, device: str | None = None):
        import torch
        import transformers

        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise ModelError(
                f"captioning model folder {folder}: no config.json. Save an image-to-text model there "
                f"with save_pretrained (e.g. download {EXAMPLE_REPO}'s files into it)"
            )
        self.opts = opts or TextOptions()
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            self.processor = transformers.AutoProcessor.from_pretrained(folder, local_files_only=True)
            if getattr(self.processor, "image_processor", None) is None:  # before loading the weights
                raise ModelError(
                    f"captioning model folder {folder}: its processor takes no images (a text-only model?); "
                    "give an image-to-text model such as BLIP or GIT"
                )
            self.model = _load_model(folder)
        except (OSError, ValueError, KeyError) as e:
            raise ModelError(
                f"captioning model folder {folder}: transformers cannot load it as an image-to-text model "
                f"with its processor ({e}). It needs config.json, the weights and the processor's files "
                "(preprocessor_config.json and the tokenizer's), as save_pretrained writes them"
            ) from None
        self.model.to(self.device).eval()
        self.provider = self.device

    def __call__(self, images: list[Image.Image]) -> list[list[str]]:
        import torch

        rgb = [im.convert("RGB") for im in images]
        kwargs = {"images": rgb, "return_tensors": "pt"}
        if self.opts.prompt:
            kwargs["text"] = [self.opts.prompt] * len(rgb)
        inputs = self.processor(**kwargs).to(self.device)
        with torch.no_grad():
            ids = self.model.generate(
                **inputs,
                max_length=self.opts.max_length,
                min_length=min(self.opts.min_length, self.opts.max_length),
                num_beams=self.opts.num_beams,
                do_sample=False,
            )
        texts = self.processor.batch_decode(ids, skip_special_tokens=True)
        return [[" ".join(t.split())] for t in texts]  # one part: the sentence, on one line
