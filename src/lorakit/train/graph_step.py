"""`cuda_graph = true`: the training step — U-Net (and trained text-encoder) forward, loss, backward,
gradient clipping and AdamW — recorded as CUDA graphs and replayed, so a step is two launches instead
of thousands of small kernel launches (at SD1.5 512² batch 1 the eager step waits on the host, not
on the GPU's arithmetic). Two graphs: per batch shape the forward-backward pass, which adds the
batch's gradients into the LoRA's, and once the update (clip, AdamW, zero the gradients), replayed
every gradient_accumulation_steps passes.

What stays eager, before each replay: the step's random numbers (noise and timesteps from the run's
generator, exactly as an eager step draws them; an uncached batch's VAE encode), copied into the
pass's fixed input tensors, and the learning rate, copied into the tensor the recorded AdamW reads.
So a graph run draws the same noise as an eager one, and its LoRA differs only by kernel rounding.

Recording runs WARMUP eager runs first (cuBLAS, autograd and the optimizer's state must exist before
a capture); the LoRA, its gradients and the optimizer's state are put back afterwards, so the
warm-up leaves no trace in the result. Every graph shares one memory pool, although bucket shapes
come in any order (PyTorch's notes ask for replays in recording order): that is safe only because
nothing a replay leaves in the pool is read after the next replay — the loss is copied out at once,
and the LoRA, its gradients and AdamW's state live outside the pool, for the run. Keep it so. The
pool keeps each shape's activations reserved for the run, on top of what eager work (validation,
samples, a new shape's warm-up) needs: more memory than an eager run.

The recorder is the seam for tests: on a CPU an EagerRecorder runs the same functions on the same
fixed tensors, which checks everything here but the capture itself (CUDA-only tests do that).
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
        try:
            with torch.cuda.stream(side):
                yield
        finally:  # also after an error: what the warm-up queued finishes before anything else
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
    inputs: dict[str, torch.Tensor]  # the fixed tensors the recorded pass reads
    replay: object  # () -> the loss (a fixed tensor on CUDA)


class StepGraphs:
    """The recorded step for one trainer, in two parts: per batch shape a forward-backward pass that
    adds the batch's gradients (/ gradient_accumulation_steps) into the LoRA's, and once the update
    (clipping, AdamW, zeroing the gradients), replayed every gradient_accumulation_steps passes.

    The trainer provides `_draw(batch, step)` (the eager part: latents, noisy latents, noise, t) and
    `_loss_from(batch, latents, noisy, noise, t)` (the part that is recorded)."""

    def __init__(self, trainer, recorder):
        self.trainer = trainer
        self.recorder = recorder  # recorder_for(device): CUDA graphs, or the eager stand-in
        self.optimizer = trainer.optimizer.optimizer  # torch's AdamW, not accelerate's wrapper
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        # what the recorded AdamW reads as its learning rate (fused AdamW takes it as an fp32 tensor)
        self.lrs = [
            torch.zeros((), dtype=torch.float32, device=trainer.device) for _ in self.optimizer.param_groups
        ]
        t = trainer.cfg.training
        self.max_grad_norm, self.accumulation = t.max_grad_norm, t.gradient_accumulation_steps
        self.grads: list[torch.Tensor] | None = None  # made by the first pass (_give_gradients)
        self.passes: dict[tuple, _Graph] = {}
        self._update = None

    @property
    def recorded(self) -> int:
        """How many graphs: forward-backward passes (one per batch shape) and the update."""
        return len(self.passes) + (self._update is not None)

    def forward_backward(self, batch, step: int) -> torch.Tensor:
        """`batch`'s gradients (on the device already) added to the LoRA's; returns its loss (a new
        tensor: the next replay overwrites the graph's own)."""
        latents, noisy, noise, t = self.trainer._draw(batch, step)
        inputs = _inputs(batch, latents, noisy, noise, t)
        key = tuple((name, tuple(x.shape), x.dtype) for name, x in inputs.items())
        graph = self.passes.get(key)
        if graph is None:
            graph = self.passes[key] = self._record_pass(batch, inputs)
        for name, x in inputs.items():
            graph.inputs[name].copy_(x, non_blocking=True)
        return graph.replay().detach().clone()

    def update(self) -> None:
        """Clip, step AdamW at the optimizer's current lr, zero the gradients."""
        if self._update is None:
            self._update = self._record("the update", self._update_function())
        for lr, group in zip(self.lrs, self.optimizer.param_groups):
            lr.fill_(float(group["lr"]))  # a launch, not a sync: the value is the host's own
        with self._lr_tensors():  # only an eager replay reads them here; a CUDA graph has them
            self._update()

    def _record_pass(self, batch, inputs: dict[str, torch.Tensor]) -> _Graph:
        fixed = {name: x.clone() for name, x in inputs.items()}
        fixed_batch = _batch_of(batch, fixed)

        def forward_backward() -> torch.Tensor:
            loss = self.trainer._loss_from(
                fixed_batch, fixed["latents"], fixed["noisy"], fixed["noise"], fixed["t"]
            )
            (loss / self.accumulation).backward()  # adds into the LoRA's gradients, in place
            return loss.detach()

        if self.grads is None:
            self._give_gradients(forward_backward)
        b, _, h, w = inputs["latents"].shape
        return _Graph(fixed, self._record(f"the pass for {w}x{h} latents, batch {b},", forward_backward))

    def _give_gradients(self, forward_backward) -> None:
        """Run-long gradient tensors, outside the graphs' pool (a recorded backward adds into them in
        place, the recorded update reads and zeroes them), for the LoRA tensors the loss reaches. One
        eager pass finds those; the others (a text-encoder layer past clip_skip, say) keep no
        gradient, so AdamW leaves them alone as in an eager run (a zero gradient would still decay
        them)."""
        self.optimizer.zero_grad(set_to_none=True)
        with self.recorder.warmup_stream():
            forward_backward()
        with torch.no_grad():
            for p in self.params:
                p.grad = None if p.grad is None else torch.zeros_like(p)
        self.grads = [p.grad for p in self.params if p.grad is not None]

    def _update_function(self):
        def update() -> None:
            if self.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm, foreach=True)
            self.optimizer.step()
            torch._foreach_zero_(self.grads)

        return update

    def _record(self, what: str, fn):
        """Warm up, undo the warm-up, record `fn`; returns its replay. A function CUDA cannot record
        (an op that waits for the GPU, say) is named in a warning and this run goes on eagerly, through
        the same functions."""
        started = time.perf_counter()
        kept = self._snapshot()
        try:
            with self.recorder.warmup_stream(), warnings.catch_warnings():
                # capturable AdamW warns when it runs outside a graph: these steps are meant to
                warnings.filterwarnings("ignore", message=".*capturable=True.*")
                for _ in range(WARMUP):
                    with self._lr_tensors():
                        fn()
            self._restore(kept)
            with self._lr_tensors():
                replay = self.recorder.record(fn)
            self.recorder.synchronize()
        except Exception as e:
            with contextlib.suppress(Exception):  # nothing the warm-up queued runs on while restoring
                self.recorder.synchronize()
            self._restore(kept)
            if isinstance(self.recorder, EagerRecorder):
                raise
            reason = (str(e).strip().splitlines() or [""])[0][:300]
            log.warning(
                "cuda_graph: the step could not be recorded (%s: %s); this run goes on with eager steps "
                "(turn cuda_graph off to skip the attempt)", type(e).__name__, reason,
            )  # fmt: skip
            self.recorder = EagerRecorder()
            return self._record(what, fn)
        log.info(
            "cuda_graph: recorded %s in %.1f s (%d warm-up runs, undone); %d graph(s) recorded",
            what, time.perf_counter() - started, WARMUP, self.recorded + 1,
        )  # fmt: skip
        return replay

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

    def _snapshot(self) -> tuple[list[torch.Tensor], list[torch.Tensor], dict]:
        with torch.no_grad():
            params = [p.detach().clone() for p in self.params]
            grads = [g.clone() for g in self.grads]
            state = {
                p: {k: v.clone() for k, v in self.optimizer.state[p].items() if torch.is_tensor(v)}
                for p in self.params
                if self.optimizer.state.get(p)
            }
        return params, grads, state

    def _restore(self, kept) -> None:
        """In place (a graph records addresses): the LoRA, its gradients and AdamW's state as before
        the warm-up. A state the warm-up created is zeroed: AdamW's fresh state is zeros (step 0, no
        moments)."""
        params, grads, state = kept
        with torch.no_grad():
            for p, saved in zip(self.params, params):
                p.copy_(saved)
            for g, saved in zip(self.grads, grads):
                g.copy_(saved)
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
