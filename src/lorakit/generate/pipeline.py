"""txt2img as A1111 users know it: prompt syntax, LoRAs by name, sampler names, seeds, PNG info.

Any model family (SD1.x, SDXL): the prompt is encoded by the family as A1111 does (ModelFamily.
encode_prompts), the model is called through ModelFamily.predict (family_draw.py). SD1.x without CFG
rescale or zero terminal SNR keeps its original route: k-diffusion over the UNet, or diffusers'
StableDiffusionPipeline fed with A1111-weighted embeddings. LoRAs are merged into the weights (and
restored afterwards), so they cost nothing per step.

A Generator is built once per model and reused: its models, the diffusers pipeline and schedulers of
the SD1.x route and the last prompt's text encoding are kept between batches and calls, so a new
sampler or request never rebuilds or reloads a model. On CUDA, `optimize` puts the UNet in
channels_last and can compile it (torch.compile); attention runs through torch's SDPA (diffusers'
AttnProcessor2_0, its default). The noise is drawn where A1111's "RNG source" says (p.rng).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import __version__
from ..errors import GenerationError, ModelError
from .params import GenerationParams


@dataclass
class GeneratedImage:
    image: object  # PIL.Image
    seed: int
    infotext: str
    path: Path | None = None


@dataclass
class _Lora:
    name: str
    path: Path
    tensors: dict
    short_hash: str
    family: object = None  # the lorakit ModelFamily the file was made for; None: not told


@dataclass
class Generator:
    """Holds a base model (and its LoRA merger) between requests.

    Generator(unet, vae, text_encoder, tokenizer, ...) is an SD1.x model; any family (SDXL) comes from
    a loaded BaseModel: Generator.from_base(base) or Generator.from_path(file)."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    model_path: Path | None = None
    lora_dir: Path = Path("models/Lora")
    prediction_type: str = "epsilon"
    base: object = field(default=None, repr=False)  # BaseModel; None: an SD1.x one of the parts above
    zero_terminal_snr: bool = False  # draw with A1111's zero-terminal-SNR alphas_cumprod
    _merger: object = field(default=None, repr=False)
    _lora_cache: dict = field(default_factory=dict, repr=False)
    _model_hash: str | None = field(default=None, repr=False)
    _pipe: object = field(default=None, repr=False)  # the SD1.x route's diffusers pipeline, built once
    _schedulers: dict = field(default_factory=dict, repr=False)  # (sampler, schedule, ...) -> scheduler
    _encoded: tuple | None = field(default=None, repr=False)  # (key, cond, uncond) of the last prompt
    compiled: str | None = field(default=None, repr=False)  # the torch.compile backend of the UNet, if any

    def __post_init__(self):
        if self.base is None:
            from ..models.loader import BaseModel

            self.base = BaseModel(
                self.unet, self.vae, (self.text_encoder,), (self.tokenizer,),
                source=self.model_path or Path(), arch={}, kind="in_memory",
            )  # fmt: skip

    @classmethod
    def from_base(
        cls,
        base,
        model_path: str | Path | None = None,
        lora_dir: str | Path = "models/Lora",
        prediction_type: str | None = None,
        zero_terminal_snr: bool | None = None,
    ) -> Generator:
        """A generator over a loaded BaseModel of any family; v-prediction and zero terminal SNR follow
        the base's markers (Family.v_pred / zero_terminal_snr) unless given."""
        family = base.family
        if prediction_type is None:
            prediction_type = "v_prediction" if family.v_pred else "epsilon"
        if zero_terminal_snr is None:
            zero_terminal_snr = family.zero_terminal_snr
        return cls(
            base.unet, base.vae, base.text_encoder, base.tokenizer,
            model_path=Path(model_path) if model_path is not None else None, lora_dir=Path(lora_dir),
            prediction_type=prediction_type, base=base, zero_terminal_snr=zero_terminal_snr,
        )  # fmt: skip

    @classmethod
    def from_path(
        cls,
        model_path: str | Path,
        lora_dir: str | Path = "models/Lora",
        device=None,
        dtype=None,
        channels_last: bool | None = None,
        compile: str | bool | None = None,
        compile_mode: str | None = None,
    ):
        """Load an SD1.x or SDXL base (any file or folder load_base_model reads) to draw with.
        channels_last / compile / compile_mode: see `optimize` (channels_last defaults to on for CUDA)."""
        from ..models.loader import load_base_model

        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
        base = load_base_model(model_path, dtype=dtype, device=device)
        base.vae.float()  # SD's and SDXL's VAEs overflow in fp16 (NaN images); fp32 costs ~160 MB
        gen = cls.from_base(base, model_path, lora_dir)
        return gen.optimize(channels_last=channels_last, compile=compile, compile_mode=compile_mode)

    def optimize(
        self,
        channels_last: bool | None = None,
        compile: str | bool | None = None,
        compile_mode: str | None = None,
    ) -> Generator:
        """Speed settings for a Generator that owns its models (not for the training UNet: from_base
        leaves it alone). channels_last (None: on CUDA only): the UNet's conv weights in NHWC, which
        cuDNN's fp16 convolutions prefer; the same image within float tolerance. compile: torch.compile
        the UNet in place (module names, weights and LoRA merging unchanged; True = "inductor", or a
        backend name such as "aot_eager"); the first step of each new image size pays the compile.
        compile_mode: torch.compile's mode ("reduce-overhead": CUDA graphs)."""
        unet = self.unet
        if channels_last is None:
            channels_last = unet.device.type == "cuda"
        if channels_last:
            unet.to(memory_format=torch.channels_last)
        if compile and self.compiled is None:
            backend = "inductor" if compile is True else str(compile)
            unet.compile(backend=backend, mode=compile_mode)
            self.compiled = backend
        return self

    @property
    def family(self):
        """The base's family module (lorakit.models.families): SD1 or SDXL."""
        return self.base.spec

    # --- LoRAs ------------------------------------------------------------------------
    def _load_lora(self, name: str) -> _Lora:
        from ..models.families.base import lora_family
        from ..network.delta import lora_module_names
        from ..network.file import addnet_hash, read_lora_file
        from .loras import list_loras, resolve

        found = resolve(name, list_loras(self.lora_dir), self.lora_dir)
        key = (str(found.path), found.path.stat().st_mtime_ns)
        if key not in self._lora_cache:
            tensors, metadata = read_lora_file(found.path)
            family = lora_family(lora_module_names(tensors), metadata)
            self._lora_cache[key] = _Lora(name, found.path, tensors, addnet_hash(found.path)[:12], family)
        return self._lora_cache[key]

    def _check_family(self, lora: _Lora) -> None:
        """An SD1.x LoRA on an SDXL base (or the reverse) is refused by name, before any weight moves."""
        if lora.family is None or lora.family.key == self.family.key:
            return
        model = self.model_path.name if self.model_path is not None else "the base model"
        self.restore_base()  # as a merge that fails: the base as loaded, no LoRA left merged
        raise ModelError(
            f"LoRA {lora.name!r} ({lora.path.name}) is an {lora.family.name} LoRA but {model} is an "
            f"{self.family.name} model: it was made for another architecture and was not applied (no "
            f"LoRA was). Use it with an {lora.family.name} base, or a LoRA trained on {self.family.name}."
        )

    def apply_loras(self, prompt: str) -> tuple[str, list[_Lora]]:
        """Merge the prompt's <lora:...> tags (and only those); returns the prompt without them."""
        from ..network.merge import LoraMerger
        from .prompt import extract_loras

        text, refs = extract_loras(prompt)
        loaded = [(ref, self._load_lora(ref.name)) for ref in refs]
        for _, lr in loaded:
            self._check_family(lr)
        if self._merger is None:
            self._merger = LoraMerger.for_base(self.base)  # te= reaches every text encoder (SDXL: both)
        self._merger.apply(
            [
                (f"{lr.name}@{lr.path}", lr.tensors, ref.te_multiplier, ref.unet_multiplier)
                for ref, lr in loaded
            ]
        )
        return text, [lr for _, lr in loaded]

    def restore_base(self) -> None:
        if self._merger is not None:
            self._merger.restore()

    # --- drawing ----------------------------------------------------------------------
    def model_hash(self) -> str | None:
        from .pnginfo import model_hash

        if self._model_hash is None and self.model_path is not None and self.model_path.is_file():
            self._model_hash = model_hash(self.model_path)
        return self._model_hash

    def infotext(self, p: GenerationParams, seed: int, loras: list[_Lora], batch_pos: int) -> str:
        from .pnginfo import format_parameters
        from .samplers import display_name

        sampler, schedule = display_name(p.sampler, p.schedule_type)
        params: dict = {"Steps": p.steps, "Sampler": sampler}
        if schedule:
            params["Schedule type"] = schedule
        params.update({"CFG scale": _num(p.cfg_scale), "Seed": seed, "Size": f"{p.width}x{p.height}"})
        if self.model_hash():
            params["Model hash"] = self.model_hash()[:10]
        if self.model_path is not None:
            params["Model"] = self.model_path.stem
        if p.batch_size > 1:
            params.update({"Batch size": p.batch_size, "Batch pos": batch_pos})
        if p.clip_skip > 1:
            params["Clip skip"] = p.clip_skip
        if p.rng != "gpu":
            params["RNG"] = p.rng.upper()  # A1111 writes its RNG source only when not its default GPU
        hashes = [f"{lr.name}: {lr.short_hash}" for lr in loras if lr.short_hash]
        if hashes:
            params["Lora hashes"] = ", ".join(hashes)
        if p.cfg_rescale:
            params["Rescale CFG"] = _num(p.cfg_rescale)  # Forge's key (reForge: rescale_cfg_multiplier)
        if self.zero_terminal_snr:
            params["Noise Schedule"] = "Zero Terminal SNR"  # A1111's apply_alpha_schedule_override
        params["Version"] = f"lorakit {__version__}"
        return format_parameters(p.prompt, p.negative_prompt, params)

    @torch.no_grad()
    def generate(self, p: GenerationParams, on_image=None, on_step=None) -> list[GeneratedImage]:
        """Draw batch_count x batch_size images; image i of the run uses seed + i (as A1111).
        on_step(batch, step, steps) after each sampling step of batch `batch` (0-based)."""
        from .prompt import extract_loras

        p.check()
        seed = p.seed if p.seed != -1 else random.randint(0, 2**32 - 1)
        text, loras = self.apply_loras(p.prompt)
        neg_text, _ = extract_loras(p.negative_prompt)  # LoRA tags there are ignored, as in A1111
        clip_skip = p.clip_skip if p.clip_skip > 1 else None
        cond, uncond = self.encode(text, neg_text, clip_skip)
        out: list[GeneratedImage] = []
        for b in range(p.batch_count):
            seeds = [seed + b * p.batch_size + i for i in range(p.batch_size)]
            batch_step = (lambda done, total, b=b: on_step(b, done, total)) if on_step else None
            images = self.draw(cond, uncond, seeds, p, batch_step)
            for i, (img, s) in enumerate(zip(images, seeds)):
                item = GeneratedImage(img, s, self.infotext(p, s, loras, i))
                out.append(item)
                if on_image:
                    on_image(item)
        return out

    def encode(self, text: str, negative: str, clip_skip: int | None):
        """(cond, uncond) for a prompt pair (without LoRA tags), encoded by the family as A1111 does. The
        last pair is kept: drawing it again (another seed, sampler or batch) does not run the text
        encoders again. The key holds the text encoders' weight versions, so a merged or restored LoRA
        (or any in-place change of their weights) encodes anew."""
        try:
            versions = tuple(p._version for te in self.base.text_encoders for p in te.parameters())
        except RuntimeError:  # weights made under torch.inference_mode keep no version: never kept
            versions = None
        key = (text, negative, clip_skip, versions)
        if versions is None or self._encoded is None or self._encoded[0] != key:
            self._encoded = (key, *self.family.encode_prompts(self.base, text, negative, clip_skip))
        return self._encoded[1], self._encoded[2]

    def alphas_cumprod(self) -> torch.Tensor:
        """The noise schedule drawing uses: SD's own, or A1111's zero-terminal-SNR one."""
        from ..models.schedule import draw_alphas_cumprod

        return draw_alphas_cumprod(self.zero_terminal_snr)

    def draw(self, cond, uncond, seeds: list[int], p: GenerationParams, on_step=None) -> list:
        """The denoising loop and the VAE decode, for one batch of seeds; on_step(done, total).
        cond/uncond: Conditioning (ModelFamily.encode_prompts), or SD1.x context tensors."""
        from ..models.families.base import Conditioning

        cond = cond if isinstance(cond, Conditioning) else Conditioning(cond)
        uncond = uncond if isinstance(uncond, Conditioning) else Conditioning(uncond)
        if self.family.key == "sd1" and not p.cfg_rescale and not self.zero_terminal_snr:
            return self._draw_sd1(cond.context, uncond.context, seeds, p, on_step)
        return self._draw_family(cond, uncond, seeds, p, on_step)

    def _draw_family(self, cond, uncond, seeds: list[int], p: GenerationParams, on_step=None) -> list:
        """Any family, through ModelFamily.predict (family_draw.py)."""
        from .family_draw import FamilyPredictor, scheduler_sample
        from .samplers import is_k_sampler, k_sample
        from .sdxl_prompt import sdxl_size_ids

        shape = (self.unet.config.in_channels, p.height // 8, p.width // 8)
        predict = FamilyPredictor(self.base, cond, uncond, sdxl_size_ids(p.width, p.height))
        ac = self.alphas_cumprod()
        if is_k_sampler(p.sampler, p.schedule_type):
            latents = k_sample(
                self.unet, cond, uncond, seeds, shape, p, self.prediction_type, on_step,
                alphas_cumprod=ac, predict=predict,
            )  # fmt: skip
        else:
            scheduler = self._scheduler(p.sampler, p.schedule_type, ac)
            latents = scheduler_sample(
                predict, seeds, shape, p, self.prediction_type, ac, self.unet.device, on_step, scheduler
            )
        return decode_latents(self.vae, latents, seeds)

    def _draw_sd1(
        self, cond: torch.Tensor, uncond: torch.Tensor, seeds: list[int], p: GenerationParams, on_step=None
    ) -> list:
        """SD1.x's own route (k-diffusion over the UNet, or diffusers' StableDiffusionPipeline)."""
        from .kdiffusion import SeededNoise
        from .samplers import is_k_sampler, k_sample

        shape = (4, p.height // 8, p.width // 8)
        if is_k_sampler(p.sampler, p.schedule_type):
            latents = k_sample(self.unet, cond, uncond, seeds, shape, p, self.prediction_type, on_step)
            return decode_latents(self.vae, latents, seeds)
        pipe = self._pipeline(self._scheduler(p.sampler, p.schedule_type))
        device, dtype = self.unet.device, self.unet.dtype
        # noise per seed, where A1111's RNG source draws it: the same image for a seed in any batch
        latents = SeededNoise(seeds, shape, device, p.rng).next().to(dtype)
        n = len(seeds)

        def step_end(pipe, i, t, kwargs):
            if on_step is not None:
                on_step(i + 1, pipe.num_timesteps)
            return kwargs

        latents = pipe(
            prompt_embeds=cond.to(device, dtype).expand(n, -1, -1),
            negative_prompt_embeds=uncond.to(device, dtype).expand(n, -1, -1),
            num_inference_steps=p.steps,
            guidance_scale=p.cfg_scale,
            height=p.height,
            width=p.width,
            latents=latents,
            output_type="latent",
            callback_on_step_end=step_end,
        ).images
        return decode_latents(self.vae, latents, seeds)

    def _scheduler(self, sampler: str, schedule_type: str | None, alphas_cumprod=None):
        """The diffusers scheduler for DDIM, PLMS or UniPC, made once per (sampler, schedule, noise
        schedule): set_timesteps resets its state at the start of every draw. alphas_cumprod: the
        family route's schedule (make_scheduler's); None: SD's own config (the SD1.x pipeline route)."""
        from .samplers import make_scheduler, split_name

        route = None if alphas_cumprod is None else self.zero_terminal_snr
        key = (*split_name(sampler, schedule_type), self.prediction_type, route)
        if key not in self._schedulers:
            self._schedulers[key] = make_scheduler(
                sampler, schedule_type, self.prediction_type, alphas_cumprod
            )
        return self._schedulers[key]

    def _pipeline(self, scheduler):
        """The SD1.x route's StableDiffusionPipeline over this generator's models, built on first use;
        another sampler only swaps its scheduler (the models are never rebuilt or copied)."""
        if self._pipe is None:
            StableDiffusionPipeline = import_sd_pipeline()

            self._pipe = StableDiffusionPipeline(
                vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer, unet=self.unet,
                scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
            )  # fmt: skip
            self._pipe.set_progress_bar_config(disable=True)
        elif self._pipe.scheduler is not scheduler:
            self._pipe.scheduler = scheduler
        return self._pipe


def import_sd_pipeline():
    """diffusers' StableDiffusionPipeline, imported without transformers' warnings about torchvision
    image processors (the pipeline's safety-checker parts, which lorakit never uses)."""
    import transformers

    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        from diffusers import StableDiffusionPipeline
    finally:
        transformers.logging.set_verbosity(level)
    return StableDiffusionPipeline


def decode_latents(vae, latents: torch.Tensor, seeds: list[int] | None = None) -> list:
    """Latents -> PIL images. SD's VAE overflows in fp16, so an fp16 VAE decodes upcast to fp32 (as
    diffusers' force_upcast does); an image that still comes out NaN or infinite is an error."""
    from PIL import Image

    upcast = vae.dtype == torch.float16
    if upcast:
        vae.float()  # .float()/.half(): diffusers' .to(dtype) warns on every call
    try:
        x = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample.float()
    finally:
        if upcast:
            vae.half()
    bad = [i for i in range(x.shape[0]) if not torch.isfinite(x[i]).all()]
    if bad:
        which = f"seed {', '.join(str(seeds[i]) for i in bad)}" if seeds else "the batch"
        raise GenerationError(
            f"the image for {which} came out NaN/infinite, so nothing was saved for it. The model or "
            "a LoRA overflowed: try a lower CFG scale or LoRA weight, or run in float32 (--device cpu)"
        )
    x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in x]


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)
