"""`cuda_graph = true`: the whole training step — U-Net (and trained text-encoder) forward, loss,
backward, gradient clipping and AdamW — recorded once per batch shape as a CUDA graph and replayed,
so a step is one launch instead of thousands of small kernel launches (at SD1.5 512² batch 1 the
eager step waits on the host, not on the GPU's arithmetic).

What stays eager, before each replay: the step's random numbers (noise and timesteps from the run's
generator, exactly as an eager step draws them; an uncached batch's VAE encode), copied into the
graph's fixed input tensors, and the learning rate, copied into the tensor the recorded AdamW reads.
So a graph run draws the same noise as an eager one, and its LoRA differs only by kernel rounding.

Recording a shape runs WARMUP eager steps first (cuBLAS, autograd and the optimizer's state must
exist before a capture); the LoRA and the optimizer's state are put back afterwards, so the warm-up
steps leave no trace in the result. Every graph shares one memory pool, although bucket shapes
come in any order (PyTorch's notes ask for replays in recording order): that is safe only because
nothing a replay leaves in the pool is read after the next replay — the loss is copied out at once,
the gradients are used inside the same graph and dropped (set to None) after recording, and the
LoRA and AdamW's state live outside the pool. Keep it so: a reader of `p.grad` between steps would
read another graph's scratch memory. The pool keeps each shape's activations reserved for the run,
on top of what eager work (validation, samples, a new shape's warm-up) needs: more memory than an
eager run.

The recorder is the seam for tests: on a CPU an EagerRecorder runs the same step function on the
same fixed tensors, which checks everything here but the capture itself (CUDA-only tests do that).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import warnings
from dataclasses import dataclass, replace

import torch

from ..config import TrainConfig
from ..errors import ConfigError

log = logging.getLogger("lorakit")

WARMUP = 3  # eager steps before a capture (PyTorch's whole-network capture example uses 3)


def check_graph_options(cfg: TrainConfig) -> None:
    """What a recorded step cannot do, refused before anything loads."""
    t, n = cfg.training, cfg.network
    if not t.cuda_graph:
        return
    why = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        why = "it runs on one GPU (several processes average their gradients outside the step)"
    elif t.mixed_precision == "fp16":
        why = "fp16's loss scaler checks every step for inf on the host: use mixed_precision = 'bf16'"
    elif t.optimizer_type.lower() != "adamw":
        why = f"it records torch's AdamW, not {t.optimizer_type}: use optimizer_type = 'AdamW'"
    elif t.gradient_accumulation_steps != 1:
        why = "it records one optimizer step per batch: use gradient_accumulation_steps = 1"
    elif t.gradient_checkpointing:
        why = "checkpointing saves the random state on the host while recording: use gradient_checkpointing = false"
    elif t.torch_compile:
        why = "torch_compile is another way to the same end: use torch_compile_mode = 'reduce-overhead' alone"
    elif n.module_dropout:
        why = "module_dropout decides on the host which modules skip a step: a graph would freeze one choice"
    if why:
        raise ConfigError(f"cuda_graph = true: {why}, or turn cuda_graph off")


def recorder_for(device: torch.device):
    """The recorder for the run's device (tests replace this function with an EagerRecorder)."""
    if device.type != "cuda":
        raise ConfigError(
            f"cuda_graph = true needs a CUDA GPU, and this run is on the {device.type.upper()}: turn cuda_graph off"
        )
    return CudaRecorder(device)


class CudaRecorder:
    """Records a function as a CUDA graph (torch.cuda.graph) in one memory pool shared by all graphs."""

    def __init__(self, device: torch.device):
        self.device = device
        self.pool = torch.cuda.graph_pool_handle()

    @contextlib.contextmanager
    def warmup_stream(self):
        """Eager steps before a capture run on a side stream, as torch.cuda.graph's docs require."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            yield
        torch.cuda.current_stream(self.device).wait_stream(side)

    def record(self, fn):
        """fn() -> tensor, recorded; returns replay() -> that (fixed) tensor, refilled."""
        graph = torch.cuda.CUDAGraph()
        # thread_local: the DataLoader's pin-memory thread may allocate pinned memory meanwhile
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            out = fn()

        def replay() -> torch.Tensor:
            graph.replay()
            return out

        return replay

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)


class EagerRecorder:
    """ "Replaying" runs the function again, eagerly, on the same fixed tensors: the tests' CPU stand-in
    for a CUDA graph, and what a run falls back to when CUDA cannot record its step."""

    def warmup_stream(self):
        return contextlib.nullcontext()

    def record(self, fn):
        return fn

    def synchronize(self) -> None:
        pass


@dataclass
class _Graph:
    inputs: dict[str, torch.Tensor]  # the fixed tensors the recorded step reads
    replay: object  # () -> the loss (a fixed tensor on CUDA)


class StepGraphs:
    """One recorded step per batch shape, for one trainer.

    The trainer provides `_draw(batch, step)` (the eager part: latents, noisy latents, noise, t) and
    `_loss_from(batch, latents, noisy, noise, t)` (the part that is recorded)."""

    def __init__(self, trainer, recorder=None):
        self.trainer = trainer
        self.recorder = recorder or CudaRecorder(trainer.device)
        self.optimizer = trainer.optimizer.optimizer  # torch's AdamW, not accelerate's wrapper
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        # what the recorded AdamW reads as its learning rate (fused AdamW takes it as an fp32 tensor)
        self.lrs = [
            torch.zeros((), dtype=torch.float32, device=trainer.device) for _ in self.optimizer.param_groups
        ]
        self.max_grad_norm = trainer.cfg.training.max_grad_norm
        self.graphs: dict[tuple, _Graph] = {}

    def step(self, batch, step: int) -> torch.Tensor:
        """One optimizer step on `batch` (already on the device); returns its loss (a new tensor)."""
        latents, noisy, noise, t = self.trainer._draw(batch, step)
        inputs = _inputs(batch, latents, noisy, noise, t)
        key = tuple((name, tuple(x.shape), x.dtype) for name, x in inputs.items())
        graph = self.graphs.get(key)
        if graph is None:
            graph = self.graphs[key] = self._record(batch, inputs)
        for name, x in inputs.items():
            graph.inputs[name].copy_(x, non_blocking=True)
        for lr, group in zip(self.lrs, self.optimizer.param_groups):
            lr.fill_(float(group["lr"]))  # a launch, not a sync: the value is the host's own
        with self._lr_tensors():  # only the eager recorder reads them here; a CUDA graph has them
            loss = graph.replay()
        return loss.detach().clone()  # the next replay overwrites the graph's own

    def _record(self, batch, inputs: dict[str, torch.Tensor]) -> _Graph:
        """Warm up, undo the warm-up, record. A step CUDA cannot record (an op that waits for the GPU,
        say) is named in a warning and this run goes on eagerly, through the same step function."""
        started = time.perf_counter()
        fixed = {name: x.clone() for name, x in inputs.items()}
        one_step = self._step_function(_batch_of(batch, fixed), fixed)
        kept = self._snapshot()
        try:
            self._warm_up(one_step)
            self._restore(kept)
            self.optimizer.zero_grad(set_to_none=True)  # recorded gradients are the graph's own
            with self._lr_tensors():
                replay = self.recorder.record(one_step)
            self.recorder.synchronize()
        except Exception as e:
            self._restore(kept)
            if isinstance(self.recorder, EagerRecorder):
                raise
            reason = (str(e).strip().splitlines() or [""])[0][:300]
            log.warning(
                "cuda_graph: the step could not be recorded (%s: %s); this run goes on with eager steps "
                "(turn cuda_graph off to skip the attempt)", type(e).__name__, reason,
            )  # fmt: skip
            self.recorder = EagerRecorder()
            return self._record(batch, inputs)
        # nothing outside a replay reads the gradients: the memory is the graphs' to share (below)
        self.optimizer.zero_grad(set_to_none=True)
        b, _, h, w = inputs["latents"].shape
        log.info(
            "cuda_graph: recorded the step for %dx%d latents, batch %d, in %.1f s (%d warm-up steps, "
            "undone); %d shape(s) recorded",
            w, h, b, time.perf_counter() - started, WARMUP, len(self.graphs) + 1,
        )  # fmt: skip
        return _Graph(fixed, replay)

    def _step_function(self, fixed_batch, fixed: dict[str, torch.Tensor]):
        """The step that is recorded: it reads only `fixed` (and the LoRA, AdamW's state, the lrs)."""

        def one_step() -> torch.Tensor:
            # no kernel: while recording the gradients are None already, and the graph's backward
            # writes fresh ones on every replay; an eager replay must not add to the last step's
            self.optimizer.zero_grad(set_to_none=True)
            loss = self.trainer._loss_from(
                fixed_batch, fixed["latents"], fixed["noisy"], fixed["noise"], fixed["t"]
            )
            loss.backward()
            if self.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm, foreach=True)
            self.optimizer.step()
            return loss.detach()

        return one_step

    def _warm_up(self, one_step) -> None:
        with self.recorder.warmup_stream(), warnings.catch_warnings():
            # capturable AdamW warns when it runs outside a graph: these steps are meant to
            warnings.filterwarnings("ignore", message=".*capturable=True.*")
            for _ in range(WARMUP):
                with self._lr_tensors():
                    one_step()

    @contextlib.contextmanager
    def _lr_tensors(self):
        """The optimizer's groups read the lr tensors (what a recorded step reads on replay)."""
        groups = self.optimizer.param_groups
        floats = [g["lr"] for g in groups]
        for g, lr in zip(groups, self.lrs):
            g["lr"] = lr
        try:
            yield
        finally:  # the LR scheduler and saved states see floats, as in an eager run
            for g, value in zip(groups, floats):
                g["lr"] = value

    def _snapshot(self) -> tuple[list[torch.Tensor], dict]:
        with torch.no_grad():
            params = [p.detach().clone() for p in self.params]
            state = {
                p: {k: v.clone() for k, v in self.optimizer.state[p].items() if torch.is_tensor(v)}
                for p in self.params
                if self.optimizer.state.get(p)
            }
        return params, state

    def _restore(self, kept) -> None:
        """In place (a graph records addresses): the LoRA and AdamW's state as before the warm-up. A
        state the warm-up created is zeroed: AdamW's fresh state is zeros (step 0, no moments)."""
        params, state = kept
        with torch.no_grad():
            for p, saved in zip(self.params, params):
                p.copy_(saved)
            for p in self.params:
                before = state.get(p, {})
                for k, v in self.optimizer.state.get(p, {}).items():
                    if torch.is_tensor(v):
                        v.copy_(before[k]) if k in before else v.zero_()


def _inputs(batch, latents, noisy, noise, t) -> dict[str, torch.Tensor]:
    """Every tensor the recorded step reads, by name; its shapes are the graph's key."""
    out = {"latents": latents, "noisy": noisy, "noise": noise, "t": t, "loss_weights": batch.loss_weights}
    if batch.conditioning is not None:
        out["context"] = batch.conditioning.context
        if batch.conditioning.pooled is not None:
            out["pooled"] = batch.conditioning.pooled
    elif batch.token_ids is not None:
        out.update({f"ids{i}": ids for i, ids in enumerate(batch.token_ids)})
    else:  # device_batch always gives one of the two
        raise ValueError("a recorded step needs the batch's token ids or cached text-encoder outputs")
    for name in ("size_ids", "masks"):
        if getattr(batch, name) is not None:
            out[name] = getattr(batch, name)
    return out


def _batch_of(batch, fixed: dict[str, torch.Tensor]):
    """The batch the recorded step reads: its tensors are the graph's fixed ones."""
    from ..models.families.base import Conditioning

    cond = None
    if "context" in fixed:
        cond = Conditioning(fixed["context"], fixed.get("pooled"))
    ids = None if cond is not None else tuple(fixed[k] for k in sorted(fixed) if k.startswith("ids"))
    return replace(
        batch,
        pixels=None,
        latents=fixed["latents"],
        loss_weights=fixed["loss_weights"],
        conditioning=cond,
        token_ids=ids,
        size_ids=fixed.get("size_ids"),
        masks=fixed.get("masks"),
    )
