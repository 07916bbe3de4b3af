"""The training loop: dataset -> base model -> LoRA network -> optimizer steps -> LoRA file.

Everything that can be wrong with the input is checked before the models load. The step has
no host sync except on logging and saving steps (a nan/inf loss is flagged on the device and
read there), the shapes are static within a bucket and the frozen base runs in the
mixed-precision dtype, so the step can later run under CUDA graphs.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..config import TrainConfig
from ..errors import ConfigError, ModelError, TrainingError
from ..models.families.base import Conditioning
from . import noise as N
from .interrupts import interrupts_deferred
from .optim import (
    build_lr_scheduler,
    build_optimizer,
    lora_param_groups,
    part_learning_rates,
    restore_speed_flags,
    speed_flags,
    steps_and_epochs,
)
from .output_lock import OutputLock, claim_output_name, is_main_launch_process, run_session_id
from .preflight import check_output_folder
from .samples import draw_training_samples, read_training_sample_prompts
from .state import Position, clean_output_folder, load_state, read_position, save_state
from .summary import log_dataset_summary, training_lines

log = logging.getLogger("lorakit")


@dataclass
class Progress:
    step: int
    total_steps: int
    epoch: int
    total_epochs: int
    loss: float | None  # mean loss since the last report
    lr: float
    its: float  # optimizer steps per second
    eta_s: float
    validation_loss: float | None = None  # the latest validation loss (validation_split / _data_dir)


# The validation loss's timesteps: a spread over the schedule, each image noised at every one
VALIDATION_TIMESTEPS = (50, 250, 500, 750, 950)


def _seed(cfg: TrainConfig) -> int:
    if cfg.training.seed is None:
        cfg.training.seed = random.randint(0, 2**31 - 1)
        log.info("seed not set: using %d (stored in the LoRA's metadata)", cfg.training.seed)
    return cfg.training.seed


def check_family_options(cfg: TrainConfig, family) -> None:
    """Options that depend on the base model's family, checked once it is known."""
    d = cfg.dataset
    if d.bucket_reso_steps % family.bucket_step:
        raise ConfigError(
            f"bucket_reso_steps = {d.bucket_reso_steps}: {family.name} needs a multiple of {family.bucket_step}"
        )
    if family.key != "sd1" and cfg.model.clip_skip is not None:
        log.warning(
            "clip_skip is not used for %s (kohya ignores it too): both encoders give their penultimate layer",
            family.name,
        )


def _family_from_header(model_path: Path):
    """The base's family module without loading weights (never a pickle: that is read once, when the
    model loads); None when the header does not say."""
    from ..models.defaults import detect_base_family
    from ..models.families.base import family_spec

    family = detect_base_family(model_path, read_pickles=False)
    if family is None:
        return None
    try:
        return family_spec(family.key)
    except KeyError:  # a family lorakit does not train: refused by name when the model loads
        return None


def _log_memory_estimate(cfg: TrainConfig, family, model_path: Path) -> None:
    """The run's estimated peak GPU memory (train/memory_estimate.py), against this GPU's size."""
    from .memory_estimate import preflight_line

    gpu = None
    if torch.cuda.is_available():
        gpu = torch.cuda.get_device_properties(0).total_memory / 2**30
    line = preflight_line(cfg, getattr(family, "key", None), model_path, gpu)
    if line is not None:
        (log.warning if line[1] else log.info)(line[0])


def build_trainer(cfg: TrainConfig) -> Trainer:
    """Check the config, the base model path and the dataset (fast), then load the models."""
    from .graph_step import check_graph_options
    from .speed import apply_deterministic, check_compile_options

    cfg.validate()
    check_compile_options(cfg.training)
    check_graph_options(cfg)
    apply_deterministic(cfg.training.deterministic)  # before anything starts CUDA (the memory estimate)
    if cfg.dataset.cache_text_encoder_outputs and cfg.dataset.shuffle_caption:
        raise ConfigError(
            f"{cfg.dataset.te_cache_option} cannot be used with shuffle_caption (captions change per step)"
        )
    model_path = Path(cfg.model.pretrained_model_name_or_path)
    if not model_path.exists():
        raise ModelError(
            f"pretrained_model_name_or_path: {model_path} does not exist. Give an SD1.x .safetensors/.ckpt "
            "file or a diffusers folder."
        )
    family = _family_from_header(model_path)
    if family is not None:  # bucket step, sample prompts: refused in seconds, not after the model loads
        check_family_options(cfg, family)
    if cfg.output.resume:  # the run goes on with its own seed: data order and noise depend on it
        cfg.training.seed = read_position(cfg.output.resume).seed
    seed = _seed(cfg)
    sample_prompts = read_training_sample_prompts(cfg)
    from ..dataset.loader import build_dataset

    # scans the folders and checks every image: fails in seconds, before any model is loaded
    dataset = build_dataset(cfg.dataset, seed, warn=log.warning)
    check_output_folder(cfg, dataset.num_batches_per_rank(1))  # not writable or full: say so now
    if is_main_launch_process():
        log_dataset_summary(cfg, dataset, log)
        _log_memory_estimate(cfg, family, model_path)
    session_id = run_session_id(cfg)
    lock = claim_output_name(cfg, session_id)  # one run per output name, no other run's files replaced
    try:
        return Trainer(cfg, dataset, seed, sample_prompts, session_id=session_id, output_lock=lock)
    except BaseException:
        if lock is not None:
            lock.release()
        raise


def collective_backend() -> str | None:
    """torch.distributed backend for a multi-process run, or None for accelerate's choice (NCCL on
    CUDA, gloo on CPU). accelerate asks for NCCL on any CUDA machine, but Windows' torch has no NCCL:
    there, gloo. Only for a launched process (LOCAL_RANK set): a backend given to a single process
    makes accelerate ask for a process group that does not exist."""
    import os

    import torch.distributed as dist

    launched = int(os.environ.get("LOCAL_RANK", -1)) != -1
    if launched and torch.cuda.is_available() and dist.is_available() and not dist.is_nccl_available():
        return "gloo"
    return None


def train(
    cfg: TrainConfig,
    on_progress: Callable[[Progress], None] | None = None,
    stop_file: str | Path | None = None,
) -> Path:
    """Train a LoRA as `cfg` says; returns the path of the final `.safetensors`.

    stop_file: when this file appears, training stops after the optimizer step under way, as on
    Ctrl-C (the state is saved and KeyboardInterrupt raised). The background job's Stop uses it: it
    works on Windows, where another process cannot send Ctrl-C.
    """
    return build_trainer(cfg).run(on_progress, stop_file)


class Trainer:
    def __init__(
        self,
        cfg: TrainConfig,
        dataset,
        seed: int,
        sample_prompts: list | None = None,
        session_id: str | None = None,
        output_lock: OutputLock | None = None,
    ):
        from accelerate import Accelerator
        from accelerate.utils import InitProcessGroupKwargs, set_seed

        from ..models.loader import LoraFileAsBaseModel, load_base_model
        from ..network.lycoris import build_network
        from .speed import apply_deterministic

        apply_deterministic(cfg.training.deterministic)  # before the Accelerator starts CUDA

        self.cfg, self.dataset, self.seed = cfg, dataset, seed
        self.session_id = session_id  # kohya's ss_session_id; a new run gets a new one in _metadata
        self.output_lock = output_lock  # released when run() ends; by the finalizer if it never runs
        if output_lock is not None:
            weakref.finalize(self, output_lock.release)
        self.sample_prompts = sample_prompts or []
        t, o = cfg.training, cfg.output
        # accelerate keeps one global state per process; a second train() call in the same
        # process (Python API, tests) may ask for another precision.
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state()
        self.acc = Accelerator(
            cpu=not torch.cuda.is_available(),  # lets torchrun/accelerate launch run several CPU processes (gloo)
            mixed_precision=t.mixed_precision,
            log_with="tensorboard" if o.logging_dir else None,
            project_dir=o.logging_dir,
            kwargs_handlers=[InitProcessGroupKwargs(backend=b)] if (b := collective_backend()) else None,
        )
        self.device = self.acc.device
        # the run's one noise generator, on the device, reseeded before each step (never one per step)
        self._noise = torch.Generator(device=self.device)
        self._posterior = torch.Generator(device=self.device)  # uncached runs' VAE samples
        self._validation_noise = torch.Generator(device=self.device)
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
            t.mixed_precision, torch.float32
        )
        self.started_at = time.time()
        # The base's full sha256 (kohya's ss_new_sd_model_hash) is read while the models load and the
        # caches fill, not before the first step: a first read of an SDXL file takes many seconds.
        from ..hashing import in_background
        from .metadata import file_hashes, new_session_id

        m = cfg.model
        self._file_hashes = {
            p: in_background(file_hashes, p) for p in (m.pretrained_model_name_or_path, m.vae) if p
        }

        set_seed(seed)  # the LoRA's random init comes from the global generators
        try:
            # straight into the compute dtype on the device (the .to() calls below are then no-ops)
            base = load_base_model(
                cfg.model.pretrained_model_name_or_path, self.weight_dtype, self.device, self._vae_dtype()
            )
        except LoraFileAsBaseModel as e:
            raise ModelError(
                f"pretrained_model_name_or_path: {e.path} is a LoRA file, not a base model. To start "
                "training from this LoRA, pass it as --network_weights (network_weights in the TOML) and "
                "give the SD1.x/SDXL checkpoint it was trained on as --pretrained_model_name_or_path."
            ) from None
        self.base, self.family = base, base.spec
        model_path = Path(cfg.model.pretrained_model_name_or_path)
        if is_main_launch_process() and _family_from_header(model_path) is None:  # a .ckpt: known only now
            _log_memory_estimate(cfg, self.family, model_path)
        check_family_options(cfg, self.family)
        log.info("base model: %s (%s)", base.family.label, base.kind.replace("_", " "))
        if base.family.v_pred and not cfg.model.v_parameterization:
            log.warning(
                "the base model is marked v-prediction (its 'v_pred' key) but v_parameterization is off: the "
                "LoRA will learn the wrong target and draw noise or blank images. Add v_parameterization = true."
            )
        if cfg.model.vae:
            from ..models.vae import load_vae

            base.vae = load_vae(cfg.model.vae, base.arch["vae"])
            log.info("VAE: %s (instead of the base model's)", cfg.model.vae)
        self.text_encoders = self.family.text_encoders(base)  # part -> module
        self.train_unet = cfg.trains_unet
        te_lrs = part_learning_rates(t, self.family)
        self.train_te_parts = (
            {p for p in self.text_encoders if te_lrs[p] > 0} if cfg.trains_text_encoder else set()
        )
        self.train_te = bool(self.train_te_parts)
        for m in (base.unet, base.vae, *self.text_encoders.values()):
            m.requires_grad_(False)
            m.eval()
        n = cfg.network
        parts = self.train_te_parts | ({"unet"} if self.train_unet else set())
        roots = {"unet": base.unet, **self.text_encoders}
        self.network = build_network(n, self.family, base, roots, parts)
        te_count, unet_count = self.network.counts
        kind = "LoRA" if n.network_module == "networks.lora" else f"LyCORIS {n.algo}{' DoRA' * n.dora_wd}"
        log.info("create %s for Text Encoder: %d modules. U-Net: %d modules.", kind, te_count, unet_count)

        # Frozen base in the compute dtype; LoRA weights stay fp32 (autocast does the rest).
        # nn.Module.to: diffusers' own .to() warns about fp32-only modules that SD1 does not have
        torch.nn.Module.to(base.unet, self.device, self.weight_dtype)
        for te in self.text_encoders.values():
            te.to(self.device, self.weight_dtype)
        torch.nn.Module.to(base.vae, self.device, self._vae_dtype())
        self.network.to(self.device, torch.float32)
        if n.network_weights:  # after the cast: the file's values reach the fp32 LoRA unrounded
            from ..network.file import read_lora_file

            self.network.load_kohya_state_dict(read_lora_file(n.network_weights)[0], source=n.network_weights)
        if t.gradient_checkpointing:
            base.unet.enable_gradient_checkpointing()
            base.unet.train()  # diffusers checkpoints only in training mode
            for part in self.train_te_parts:
                te = self.text_encoders[part]  # transformers >= 5.24 renames it (the old name goes in v6)
                enable = (
                    getattr(te, "activation_checkpointing_enable", None) or te.gradient_checkpointing_enable
                )
                enable()
                te.train()

        self.scheduler = N.noise_scheduler(cfg.model.v_parameterization, cfg.model.zero_terminal_snr)
        self.snr = N.snr_table(self.scheduler).to(self.device)
        self.batches_per_epoch = dataset.num_batches_per_rank(self.acc.num_processes)
        if self.batches_per_epoch == 0:
            raise ConfigError(
                f"the dataset has fewer batches than processes ({self.acc.num_processes}): add images"
            )
        _, self.total_steps, self.epochs = steps_and_epochs(t, self.batches_per_epoch)

        groups = lora_param_groups(self.network, {"unet": t.unet_learning_rate, **te_lrs})
        optimizer, self.optimizer_repr = build_optimizer(t, groups)
        self.lr_scheduler = build_lr_scheduler(t, optimizer, self.total_steps)
        self.optimizer = self.acc.prepare(optimizer)  # gradient scaling for fp16
        self.pos = Position(epoch=0, step=0, batch_in_epoch=0, seed=seed)
        if self.acc.is_main_process:  # temp files and set-aside states of a killed earlier run
            clean_output_folder(o.output_dir, o.output_name)
        if o.resume:
            flags = speed_flags(self.optimizer.optimizer)
            self.pos = load_state(
                o.resume, self.network, self.optimizer.optimizer, self.lr_scheduler, self.acc.scaler
            )
            restore_speed_flags(self.optimizer.optimizer, flags)
            log.info("resumed at epoch %d, step %d", self.pos.epoch, self.pos.step)

        self._first_bad_step = torch.full((), -1, dtype=torch.long, device=self.device)
        self.last_good: Path | None = None  # the last LoRA this run saved (all its weights finite)
        self.last_validation_loss: float | None = None
        self._validated_at = -1  # the step of the last validation

        self._prepare_caches()
        self._keep_caches_on_device()
        self._loader = self._batch_loader()
        self._unet_compiled = self._compile()
        self._compiled_shapes: set = set()
        self._graphs = self._step_graphs()
        self._metadata_cache: dict[str, str] | None = None
        self.session_id = self.session_id or new_session_id()
        self.pos.session_id = self.session_id  # the states it saves keep it for the resumed run

    def sample(self, epoch: int | None = None, step: int | None = None) -> list[Path]:
        if not self.sample_prompts or not self.acc.is_main_process:
            return []
        return draw_training_samples(self.base, self.cfg, self.sample_prompts, epoch=epoch, step=step)

    # --- caches -----------------------------------------------------------------
    def _vae_dtype(self) -> torch.dtype:
        """float32 under fp16 (SD's and SDXL's VAEs overflow in fp16) or with no_half_vae; a VAE the user
        gave (the SDXL fp16-fix one) runs in fp16 unless no_half_vae says otherwise."""
        m, precision = self.cfg.model, self.cfg.training.mixed_precision
        if m.no_half_vae or (precision == "fp16" and not m.vae):
            return torch.float32
        return self.weight_dtype

    def _prepare_caches(self) -> None:
        """Latents and text-encoder outputs, encoded once. On a GPU only the model that is encoding stays
        there meanwhile (kohya does the same): SDXL's UNet is 5 GB in bf16, and with it beside the
        encoders and the VAE's 1024-px activations the setup would need more memory than training."""
        d = self.cfg.dataset
        self._park(self.base.unet, d.cache_latents or d.cache_text_encoder_outputs)
        if d.cache_latents:
            self._park(list(self.text_encoders.values()), True)
            for dataset in self._datasets():
                dataset.cache_latents(
                    self._encode_pixels, self._vae_fingerprint(), d.cache_latents_to_disk, d.vae_batch_size
                )
            self._unpark(list(self.text_encoders.values()))
            if not self.sample_prompts:
                self._park(self.base.vae, True)  # for good: the steps use the cached latents
        self.te_cache: dict[str, Conditioning] = {}
        if d.cache_text_encoder_outputs:
            from ..dataset.te_cache import cache_text_encoder_outputs, te_cache_key, text_encoders_fingerprint

            key_of = None
            if d.cache_text_encoder_outputs_to_disk:
                m = self.cfg.model
                fingerprint = text_encoders_fingerprint(self.text_encoders.values())
                key_of = lambda caption: te_cache_key(caption, m.max_token_length, m.clip_skip, fingerprint)  # noqa: E731
            with torch.no_grad():
                image_captions = [pair for ds in self._datasets() for pair in ds.image_captions()]
                self.te_cache = cache_text_encoder_outputs(
                    list(dict.fromkeys(image_captions)),
                    lambda c: self._encode_captions([c]).rows()[0],
                    key_of,
                )
        if self.te_cache and not self.train_te and not self.sample_prompts:
            self._park(list(self.text_encoders.values()), True)  # for good: SDXL's are 1.6 GB in bf16
        self._unpark([self.base.unet])

    def _keep_caches_on_device(self) -> None:
        """Cached latents and text-encoder outputs on the GPU when together they fit in
        speed.DEVICE_CACHE_SHARE of its memory (a batch is then stacked there: no copy in the step);
        otherwise in pinned memory, copied to it without blocking. Nothing to do on a CPU run."""
        if self.device.type != "cuda":
            return
        from .speed import device_cache_budget

        te_rows = [(c, row) for c, row in self.te_cache.items()]
        te_tensors = [t for _, row in te_rows for t in (row.context, row.pooled) if t is not None]
        latents = [t for ds in self._datasets() for t in ds.cached_tensors()]
        size = sum(t.numel() * t.element_size() for t in latents)
        size += sum(t.numel() * self.weight_dtype.itemsize for t in te_tensors)
        fits = size <= device_cache_budget(self.device)
        log.info(
            "cached latents / text-encoder outputs (%.1f MiB) kept %s", size / 2**20,
            "on the GPU" if fits else "in pinned CPU memory (too large for the GPU's share)",
        )  # fmt: skip

        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(self.device, non_blocking=True) if fits else t.cpu().pin_memory()

        for ds in self._datasets():
            ds.move_cached_latents(move)
        self.te_cache = {
            c: Conditioning(
                *(None if t is None else move(t.to(self.weight_dtype)) for t in (row.context, row.pooled))
            )
            for c, row in te_rows
        }

    def _batch_loader(self):
        """A DataLoader with worker processes for runs that decode images each step (latents not cached);
        None: batches are made in this process (cached latents are only stacked)."""
        from ..dataset.loader import BatchLoader, data_loader_workers

        t = self.cfg.training
        workers = data_loader_workers(t.max_data_loader_n_workers)
        if workers == 0 or self.cfg.dataset.cache_latents:
            return None
        log.info("images are read in %d DataLoader worker process(es) (max_data_loader_n_workers)", workers)
        return BatchLoader(
            self.dataset, workers, t.persistent_data_loader_workers, pin_memory=self.device.type == "cuda"
        )

    def _compile(self):
        """The compiled U-Net for the step (torch_compile), or None."""
        t = self.cfg.training
        if not t.torch_compile:
            return None
        from .speed import compile_unet

        buckets = sum(len(ds.bucket_resos) for ds in self._datasets())
        log.info(
            "torch_compile: U-Net compiled with %s (mode %s) for static shapes: each bucket shape compiles "
            "once, on its first step", t.dynamo_backend, t.torch_compile_mode,
        )  # fmt: skip
        return compile_unet(self.base.unet, t, shapes=max(64, 4 * buckets + 8))

    def _step_graphs(self):
        """The recorded steps (cuda_graph), or None."""
        if not self.cfg.training.cuda_graph:
            return None
        from .graph_step import StepGraphs, recorder_for

        return StepGraphs(self, recorder_for(self.device))

    def _autocast(self):
        """accelerate's autocast; under cuda_graph without its cast cache (a cast cached while
        recording would outlive the graph's memory: torch.cuda.graph's docs ask for this)."""
        if not self.cfg.training.cuda_graph:
            return self.acc.autocast()
        from accelerate.utils import AutocastKwargs

        return self.acc.autocast(AutocastKwargs(cache_enabled=False))

    @contextlib.contextmanager
    def _compiled_unet(self):
        """The step's U-Net call goes through the compiled module; everything else (sampling, saving,
        state dicts) sees the plain one."""
        if self._unet_compiled is None:
            yield
            return
        eager = self.base.unet
        self.base.unet = self._unet_compiled
        try:
            yield
        finally:
            self.base.unet = eager

    def _batches(self, epoch: int, skip: int):
        source = self._loader or self.dataset
        return source.batches(epoch, self.acc.process_index, self.acc.num_processes, skip=skip)

    def _datasets(self) -> list:
        """The train dataset and, with validation_split / validation_data_dir, the validation one."""
        val = getattr(self.dataset, "validation", None)
        return [self.dataset] if val is None else [self.dataset, val]

    def _park(self, models, when: bool) -> None:
        """Move `models` off the GPU (to the CPU, dtype kept); nothing on a CPU run."""
        if not when or self.device.type != "cuda":
            return
        for m in models if isinstance(models, list) else [models]:
            torch.nn.Module.to(m, "cpu")  # parameters keep their identity: the optimizer's stay valid
        torch.cuda.empty_cache()

    def _unpark(self, models: list) -> None:
        if self.device.type != "cuda":
            return
        for m in models:
            torch.nn.Module.to(m, self.device)

    def _vae_fingerprint(self) -> str:
        import hashlib

        h = hashlib.sha256()
        for k, v in sorted(self.base.vae.encoder.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().float().cpu().numpy().tobytes())
        return h.hexdigest()[:16]

    @torch.no_grad()
    def _encode_pixels(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        vae = self.base.vae
        if pixels.device != self.device:  # the step's pixels are on the device already
            pixels = pixels.to(self.device)
        dist = vae.encode(pixels.to(dtype=vae.dtype)).latent_dist
        if generator is None:  # caching: one draw per image, so vae_batch_size leaves the latents alone
            one = (1, *dist.mean.shape[1:])  # as diffusers draws it: contiguous, in the VAE's dtype
            noise = torch.cat(
                [torch.randn(one, device=dist.mean.device, dtype=dist.mean.dtype) for _ in dist.mean]
            )
            sampled = dist.mean + dist.std * noise
        else:
            sampled = dist.sample(generator=generator)
        latents = sampled.to(torch.float32) * vae.config.scaling_factor
        if vae.dtype == torch.float16 and not torch.isfinite(latents).all():
            raise TrainingError(
                "the VAE made nan/inf latents in fp16 (SDXL's VAE overflows there): add no_half_vae = true, "
                "or give the SDXL fp16-fix VAE as vae"
            )
        return latents

    def _encode_captions(self, captions: list[str]) -> Conditioning:
        m = self.cfg.model
        with torch.set_grad_enabled(self.train_te and torch.is_grad_enabled()), self._autocast():
            return self.family.encode(self.base, captions, m.clip_skip, m.max_token_length)

    def _conditioning(self, batch) -> Conditioning:
        if batch.conditioning is not None:  # the text-encoder cache's rows, stacked before the step
            return batch.conditioning
        if batch.token_ids is not None:
            m = self.cfg.model
            with torch.set_grad_enabled(self.train_te and torch.is_grad_enabled()), self._autocast():
                return self.family.encode_ids(self.base, batch.token_ids, m.clip_skip)
        return self._encode_captions(batch.captions)

    # --- the step -----------------------------------------------------------------
    def device_batch(self, batch):
        """Everything the step reads, on the device before it starts: the text-encoder cache's rows
        stacked (or the captions' token ids made here), then pinned and copied without blocking the
        host. Already on the device: returned as it is."""
        if self.te_cache and batch.conditioning is None:
            cond = Conditioning.stack([self.te_cache[c] for c in batch.captions])
            batch = replace(batch, conditioning=cond)
        elif not self.te_cache and batch.token_ids is None:
            ids = self.family.tokenize(self.base, batch.captions, self.cfg.model.max_token_length)
            batch = replace(batch, token_ids=ids)
        if self.device.type == "cuda":
            batch = batch.pin_memory()
            if batch.conditioning is not None and batch.conditioning.context.device != self.device:
                # a text-encoder cache too large for the GPU is pinned: its rows come over without blocking
                moved = (None if t is None else t.pin_memory().to(self.device, non_blocking=True)
                         for t in (batch.conditioning.context, batch.conditioning.pooled))  # fmt: skip
                batch = replace(batch, conditioning=Conditioning(*moved))
        return batch.to(self.device)

    def loss_of(
        self,
        batch,
        step: int,
        generator: torch.Generator | None = None,
        timestep: int | None = None,
        posterior: torch.Generator | None = None,
    ) -> torch.Tensor:
        """The batch's mean loss; noise (and timesteps) from the run's generator reseeded for `step`, or
        from `generator` at one fixed `timestep` (the validation loss). An uncached batch's VAE sample
        comes from `posterior`, or the step's own posterior stream: the noise and timesteps are those a
        run with cached latents draws."""
        batch = self.device_batch(batch)
        return self._loss(batch, step, generator=generator, timestep=timestep, posterior=posterior)

    def _loss(self, batch, step: int, **draw_args) -> torch.Tensor:
        """loss_of for a batch already on the device (device_batch): no host work, no host->device copy."""
        if self._unet_compiled is not None and self.cfg.training.torch_compile_mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()  # the last step's graph outputs are done with
        return self._loss_from(batch, *self._draw(batch, step, **draw_args))

    def _draw(
        self,
        batch,
        step: int,
        generator: torch.Generator | None = None,
        timestep: int | None = None,
        posterior: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The step's random part: (latents, noisy latents, noise, timesteps). A recorded step
        (cuda_graph) draws it eagerly before each replay."""
        rank = self.acc.process_index
        g = generator or N.reseed(self._noise, self.seed, step, rank)
        if batch.latents is not None:
            latents = batch.latents
        else:
            posterior = posterior or N.reseed(self._posterior, self.seed, step, rank, N.POSTERIOR)
            latents = self._encode_pixels(batch.pixels, posterior)
        noise_offset = self.cfg.training.noise_offset
        return (latents, *N.noisy_latents(self.scheduler, latents, g, noise_offset, timestep))

    def _loss_from(self, batch, latents, noisy, noise, t) -> torch.Tensor:
        """The batch's mean loss from _draw's tensors: what cuda_graph records."""
        cfg = self.cfg
        cond = self._conditioning(batch).to(dtype=self.weight_dtype)
        with self._autocast(), self._compiled_unet():
            pred = self.family.predict(self.base, noisy.to(self.weight_dtype), t, cond, batch.size_ids)
        v_pred = cfg.model.v_parameterization
        target = N.target_of(self.scheduler, latents, noise, t, v_pred)
        if cfg.training.masked_loss and batch.masks is not None:
            per_sample = N.per_sample_loss(pred, target, batch.masks)
        else:
            per_sample = N.per_sample_loss(pred, target)
        loss = per_sample * batch.loss_weights
        if cfg.training.min_snr_gamma:
            loss = loss * N.min_snr_weights(self.snr, t, cfg.training.min_snr_gamma, v_pred)
        if v_pred and cfg.training.scale_v_pred_loss_like_noise_pred:
            loss = loss * N.v_pred_like_noise_pred_weights(self.snr, t)
        return loss.mean()

    @torch.no_grad()
    def mean_loss(self, epoch: int = 0) -> float:
        """Mean loss over one epoch's batches with fixed noise: a before/after measure of learning."""
        losses = [self.loss_of(b, 10**9 + i) for i, b in enumerate(self.dataset.batches(epoch))]
        return torch.stack(losses).mean().item()

    @property
    def validation_seed(self) -> int:
        seed = self.cfg.dataset.validation_seed
        return self.seed if seed is None else seed

    @torch.no_grad()
    def validation_loss(self) -> float | None:
        """Mean loss of the validation images over VALIDATION_TIMESTEPS, with noise fixed by
        validation_seed and the LoRA as it is now: the same weights always give the same number.
        None without a validation set."""
        from ..dataset.loader import stable_seed

        val = getattr(self.dataset, "validation", None)
        if val is None:
            return None
        cap = self.cfg.training.max_validation_steps
        total, count = torch.zeros((), dtype=torch.float64, device=self.device), 0
        for i, batch in enumerate(val.fixed_batches()):
            if cap is not None and i >= cap:
                break
            n = len(batch.paths)
            batch = self.device_batch(batch)
            for t in VALIDATION_TIMESTEPS:
                g = self._validation_noise.manual_seed(stable_seed(self.validation_seed, i, t) % (2**63))
                vae = self._posterior.manual_seed(stable_seed(self.validation_seed, i, t, 1) % (2**63))
                total += self._loss(batch, 0, generator=g, timestep=t, posterior=vae).double() * n
                count += n
        return (total / max(count, 1)).item()

    def _validation_due(self, every_steps: int | None, every_epochs: int | None) -> bool:
        """After an optimizer step: every N steps, at the end of every N-th epoch, and at the last step
        (the final LoRA's own validation loss)."""
        pos = self.pos
        ends_epoch = pos.batch_in_epoch >= self.batches_per_epoch
        return (
            pos.step == self.total_steps
            or bool(every_steps and pos.step % every_steps == 0)
            or bool(every_epochs and ends_epoch and (pos.epoch + 1) % every_epochs == 0)
        )

    def _validate(self, bar) -> None:
        """Measure, show and log the validation loss (every rank measures; the main one reports). The next
        Progress carries it."""
        value = self.validation_loss()
        if value is None:
            return
        self.last_validation_loss, self._validated_at = value, self.pos.step
        pos = self.pos
        if not self.acc.is_main_process:
            return
        log.info("validation loss at step %d (epoch %d): %.4f", pos.step, pos.epoch, value)
        self._postfix["val_loss"] = f"{value:.4f}"
        bar.set_postfix(**self._postfix)
        self.acc.log({"loss/validation": value}, step=pos.step)

    def _sync_grads(self) -> None:
        """Average LoRA gradients over processes: one all-reduce of one flat buffer."""
        if self.acc.num_processes == 1:
            return
        params = [p for p in self.network.parameters() if p.grad is not None]
        flat = torch.cat([p.grad.flatten() for p in params])
        flat = self.acc.reduce(flat, reduction="mean")
        offset = 0
        for p in params:
            n = p.grad.numel()
            p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
            offset += n

    def _check_ranks_agree(self) -> None:
        """With several processes every rank must hold the same LoRA; a cheap fingerprint proves it."""
        if self.acc.num_processes == 1:
            return
        flat = torch.cat([p.detach().flatten().double() for p in self.network.parameters()])
        mine = torch.stack([flat.sum(), flat.square().sum()])
        everyone = self.acc.gather(mine).view(self.acc.num_processes, 2)
        if not torch.allclose(everyone, everyone[0].expand_as(everyone), rtol=1e-9, atol=0):
            raise TrainingError(
                f"the processes' LoRA weights diverged ({everyone.tolist()}): gradients were not synced"
            )

    def run(
        self, on_progress: Callable[[Progress], None] | None = None, stop_file: str | Path | None = None
    ) -> Path:
        held = self.output_lock.training() if self.output_lock else contextlib.nullcontext()
        try:
            with held:
                return self._run(on_progress, Path(stop_file) if stop_file else None)
        except torch.OutOfMemoryError:
            raise TrainingError(
                "out of GPU memory. Try train_batch_size = 1, gradient_checkpointing = true, cache_latents = true, "
                "mixed_precision = 'bf16' or 'fp16', or a smaller resolution. Saved files were kept."
            ) from None

    def _run(self, on_progress, stop_file: Path | None) -> Path:
        from tqdm.auto import tqdm

        cfg, acc, pos = self.cfg, self.acc, self.pos
        accum = cfg.training.gradient_accumulation_steps
        params = self.network.parameters()
        if cfg.output.logging_dir:
            acc.init_trackers("network_train", config={k: str(v) for k, v in cfg.flat().items()})
        if acc.is_main_process:
            lines = training_lines(
                cfg, self.dataset.plan, self.batches_per_epoch, self.epochs, self.total_steps,
                acc.num_processes, pos.step,
            )  # fmt: skip
            log.info("%s", "\n".join(lines))
        bar = tqdm(total=self.total_steps, initial=pos.step, disable=not acc.is_main_process, desc="steps")
        self._postfix: dict[str, str] = {}
        validating = self._datasets()[1:] != []
        every_steps, every_epochs = cfg.training.validate_every_n_steps, cfg.training.validate_every_n_epochs
        every_epochs = every_epochs or (None if every_steps else 1)  # kohya: every epoch unless told
        loss_sum, loss_n = torch.zeros((), device=self.device), 0
        self._clock = (time.time(), pos.step)
        # where a resume can start: an optimizer-step boundary, with no accumulated gradients pending
        boundary = replace(pos)
        sc = cfg.sample
        if sc.sample_at_first and pos.step == 0:
            self.sample(epoch=0) if sc.sample_every_n_epochs else self.sample(step=0)
        try:
            while pos.step < self.total_steps:
                epoch = pos.epoch
                for batch in self._batches(epoch, skip=pos.batch_in_epoch):
                    micro = epoch * self.batches_per_epoch + pos.batch_in_epoch  # seeds this batch's noise
                    batch = self.device_batch(batch)  # before the step (loss_of's own call is then free)
                    loss = self._forward_backward(batch, micro)
                    self._note_finite(loss)
                    loss_sum += loss.detach()
                    loss_n += 1
                    pos.batch_in_epoch += 1
                    if pos.batch_in_epoch % accum and pos.batch_in_epoch < self.batches_per_epoch:
                        continue
                    with interrupts_deferred():
                        self._optimizer_step(params)
                        boundary = replace(pos)
                    if stop_file is not None and stop_file.exists():  # one stat per step: cheap
                        log.warning("stop requested (%s) at step %d", stop_file.name, pos.step)
                        raise KeyboardInterrupt
                    bar.update(1)
                    if (
                        sc.sample_every_n_steps
                        and not sc.sample_every_n_epochs
                        and pos.step % sc.sample_every_n_steps == 0
                    ):
                        self.sample(step=pos.step)
                    validated = validating and self._validation_due(every_steps, every_epochs)
                    if validated:  # before the report, which carries the new value
                        self._validate(bar)
                    if (
                        validated
                        or pos.step % cfg.output.progress_every_n_steps == 0
                        or pos.step == self.total_steps
                    ):
                        self._report(loss_sum / max(loss_n, 1), bar, on_progress)
                        loss_sum.zero_()
                        loss_n = 0
                    if pos.step >= self.total_steps:
                        break
                if pos.batch_in_epoch >= self.batches_per_epoch:  # the epoch ran to its end
                    pos.epoch += 1
                    pos.batch_in_epoch = 0
                    boundary = replace(pos)
                    every = cfg.output.save_every_n_epochs
                    if every and pos.epoch % every == 0 and pos.step < self.total_steps:
                        self.save(f"{cfg.output.output_name}-{pos.epoch:06d}")
                    if sc.sample_every_n_epochs and pos.epoch % sc.sample_every_n_epochs == 0:
                        self.sample(epoch=pos.epoch)
        except KeyboardInterrupt:
            if acc.is_main_process:
                self._save_interrupted(boundary)
            raise
        finally:
            bar.close()
        self._check_ranks_agree()
        final = self.save(cfg.output.output_name)
        acc.end_training()
        return final

    def _compiles_now(self, batch) -> bool:
        """Whether this step meets a shape the compiled U-Net has not seen (its first step compiles)."""
        if self._unet_compiled is None:
            return False
        x = batch.latents if batch.latents is not None else batch.pixels
        shape = tuple(x.shape)
        if shape in self._compiled_shapes:
            return False
        self._compiled_shapes.add(shape)
        return True

    def _log_compile_time(self, batch, started: float) -> None:
        """Log how long the first step of a new shape took, compile included (one sync, once per shape)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        w, h = batch.bucket
        log.info(
            "torch_compile: the first step at %dx%d (batch %d) took %.1f s, compiling included; later steps "
            "of this shape reuse it", w, h, len(batch.paths), time.perf_counter() - started,
        )  # fmt: skip

    def _save_interrupted(self, boundary: Position) -> None:
        """Ctrl-C: keep what was trained, and say how to go on. The weights are those of the last
        optimizer step (`boundary`); the micro-batches since then are run again on resume."""
        o = self.cfg.output
        self._check_finite(collective=False)
        where = f"interrupted at step {boundary.step} of {self.total_steps}"
        if o.save_state:
            folder = self._save_state(self._state_dir("-state"), boundary)
            log.warning(
                "%s: state saved to %s. To go on, run the same command with --resume %s "
                "(resume = '%s' in the TOML).", where, folder, folder, folder.as_posix(),
            )  # fmt: skip
        elif boundary.step == 0:
            log.warning("%s: nothing was trained yet, nothing was saved", where)
        else:
            path = self._lora_path(f"{o.output_name}-interrupted")
            self._write_lora(path, boundary, {"lorakit_interrupted_at_step": str(boundary.step)})
            log.warning(
                "%s: the LoRA trained so far was saved to %s. This run cannot be resumed (save_state is "
                "off): next time add --save_state (save_state = true), then Ctrl-C keeps a state that "
                "--resume continues from. To train further from this file, start a new run with "
                "--network_weights %s.", where, path, path,
            )  # fmt: skip

    def _forward_backward(self, batch, micro: int) -> torch.Tensor:
        """Forward and backward of one batch (its gradients added to the accumulated ones), recorded
        and replayed under cuda_graph; returns its loss."""
        if self._graphs is not None:
            return self._graphs.forward_backward(batch, micro)
        compiling = self._compiles_now(batch)
        started = time.perf_counter()
        loss = self.loss_of(batch, micro)
        self.acc.backward(loss / self.cfg.training.gradient_accumulation_steps)
        if compiling:
            self._log_compile_time(batch, started)
        return loss

    def _optimizer_step(self, params) -> None:
        if self._graphs is not None:  # clip, AdamW and zeroed gradients: replayed
            self._graphs.update()
            self._advance()
            return
        self._sync_grads()
        if self.cfg.training.max_grad_norm:
            self.acc.clip_grad_norm_(params, self.cfg.training.max_grad_norm)
        self.optimizer.step()
        skipped = self.acc.optimizer_step_was_skipped  # fp16: the loss scaler skips inf/nan gradients
        self.optimizer.zero_grad(set_to_none=True)
        self._advance(schedule=not skipped)

    def _advance(self, schedule: bool = True) -> None:
        """An optimizer step is done: the LR schedule and the step count move on."""
        if schedule:
            self.lr_scheduler.step()
        self.pos.step += 1

    # --- non-finite loss or weights -------------------------------------------------
    def _note_finite(self, loss: torch.Tensor) -> None:
        """Remember (on the device, no host sync) the first step whose loss was nan or inf."""
        step = torch.full_like(self._first_bad_step, self.pos.step + 1)
        first = (self._first_bad_step < 0) & ~torch.isfinite(loss.detach())
        self._first_bad_step = torch.where(first, step, self._first_bad_step)

    def _check_finite(self, collective: bool = True, fetch: torch.Tensor | None = None) -> float | None:
        """Raise before anything non-finite is written: a nan/inf loss seen so far, or nan/inf weights.
        Returns `fetch` (a scalar) read in the same host sync."""
        params = [p.detach() for p in self.network.parameters()]
        # one fused kernel over all LoRA tensors (not three per tensor): a norm is nan/inf iff one is
        weights_bad = ~torch.stack(torch._foreach_norm(params)).isfinite().all()
        flags = torch.stack([self._first_bad_step, weights_bad.long()])
        if collective and self.acc.num_processes > 1:  # every rank raises, or none does
            flags = self.acc.gather(flags[None]).view(-1, 2)
            flags = torch.stack([flags[:, 0].max(), flags[:, 1].max()])
        extra = [] if fetch is None else [fetch.detach().double().reshape(())]
        values = torch.cat([flags.double(), *[e[None] for e in extra]]).tolist()  # the one host sync
        first_bad, weights_bad = int(values[0]), values[1]
        if first_bad >= 0 or weights_bad:
            raise self._nonfinite_error(first_bad)
        return values[2] if extra else None

    def _nonfinite_error(self, first_bad: int) -> TrainingError:
        what = (
            f"the loss became nan or inf at step {first_bad}"
            if first_bad >= 0
            else f"the LoRA weights became nan or inf by step {self.pos.step}"
        )
        if self.last_good:
            kept = f"the last good save, {self.last_good}, was kept"
        elif self.cfg.output.resume:
            kept = f"nothing was saved in this run; the state it resumed from, {self.cfg.output.resume}, is unchanged"
        else:
            kept = "nothing was saved"
        return TrainingError(
            f"{what} (found at step {self.pos.step}): training stopped; {kept}. "
            "Lower the learning rate or use bf16."
        )

    def _report(self, mean_loss: torch.Tensor, bar, on_progress) -> None:
        mean = self._check_finite(fetch=mean_loss)  # finite now: every loss in it was
        pos = self.pos
        now, (t_last, step_last) = time.time(), self._clock
        its = (pos.step - step_last) / max(now - t_last, 1e-9)
        self._clock = (now, pos.step)
        lr = self.lr_scheduler.get_last_lr()[0]
        self._postfix.update(epoch=f"{pos.epoch + 1}/{self.epochs}", loss=f"{mean:.4f}", lr=f"{lr:.2e}")
        bar.set_postfix(**self._postfix)
        self.acc.log({"loss/average": mean, "lr/unet": lr}, step=pos.step)
        if on_progress:
            eta = (self.total_steps - pos.step) / max(its, 1e-9)
            on_progress(
                Progress(
                    pos.step, self.total_steps, pos.epoch + 1, self.epochs, mean, lr, its, eta,
                    self.last_validation_loss,
                )
            )  # fmt: skip

    # --- saving -------------------------------------------------------------------
    def _state_dir(self, suffix: str) -> Path:
        return Path(self.cfg.output.output_dir) / f"{self.cfg.output.output_name}{suffix}"

    def save(self, name: str) -> Path:
        o = self.cfg.output
        path = self._lora_path(name)
        self.acc.wait_for_everyone()
        self._check_finite()  # never a nan LoRA or state
        if self.acc.is_main_process:
            self._write_lora(path, self.pos)
            if o.save_state:
                suffix = name[len(o.output_name) :] + "-state"
                self._save_state(self._state_dir(suffix), self.pos)
            if name != o.output_name:  # the final file is reported once, by the caller
                log.info("saved %s", path)
        self.last_good = path
        return path

    def _lora_path(self, name: str) -> Path:
        return Path(self.cfg.output.output_dir) / f"{name}.{self.cfg.output.save_model_as}"

    def _write_lora(self, path: Path, pos: Position, extra: dict[str, str] | None = None) -> None:
        from ..network.file import save_lora_file
        from .metadata import finish_metadata, kohya_epoch

        o = self.cfg.output
        meta = finish_metadata(
            self.metadata,
            steps=pos.step,
            epoch=kohya_epoch(pos.epoch, pos.batch_in_epoch),
            no_metadata=o.no_metadata,
        )
        if self.last_validation_loss is not None and not o.no_metadata:
            meta["lorakit_validation_loss"] = f"{self.last_validation_loss:.6g}"
            meta["lorakit_validation_loss_step"] = str(self._validated_at)
        if extra and not o.no_metadata:
            meta.update(extra)
        save_lora_file(path, self.network.kohya_state_dict(), meta, o.save_precision)

    def _save_state(self, folder: Path, pos: Position) -> Path:
        return save_state(
            folder, self.network, self.optimizer.optimizer, self.lr_scheduler, pos, self.acc.scaler
        )

    @property
    def metadata(self) -> dict[str, str]:
        """kohya's training metadata, made at the first save (when the base's hash is ready)."""
        if self._metadata_cache is None:
            self._metadata_cache = self._metadata()
        return self._metadata_cache

    def _metadata(self) -> dict[str, str]:
        from .metadata import training_metadata

        p = self.dataset.plan
        hashes = {path: future.result() for path, future in self._file_hashes.items()}
        return training_metadata(
            self.cfg,
            session_id=self.session_id,
            started_at=self.started_at,
            num_train_images=p.num_train_images,
            num_reg_images=p.num_reg_images,
            num_batches_per_epoch=self.batches_per_epoch,
            num_epochs=self.epochs,
            max_train_steps=self.total_steps,
            dataset_dirs=p.dataset_dirs,
            reg_dataset_dirs=p.reg_dataset_dirs,
            tag_frequency=p.tag_frequency,
            bucket_info=self.dataset.bucket_info(),
            optimizer_repr=self.optimizer_repr,
            model_hashes=hashes[self.cfg.model.pretrained_model_name_or_path],
            vae_hashes=hashes[self.cfg.model.vae] if self.cfg.model.vae else None,
            world_size=self.acc.num_processes,
            family=self.family,
            num_validation_images=(p.validation.num_train_images if p.validation is not None else 0),
            validation_seed=self.validation_seed,
        )
