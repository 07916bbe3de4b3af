"""The fast step's guarantees (issue 12, parts 2 and 3), on the CPU: its inputs are on the device
before it starts, one noise generator serves the run, DataLoader workers and cached latents change
no loss, the compiled step learns what the eager one does, AdamW updates all LoRA tensors at once,
and `deterministic` sets what it says. CUDA-only tests skip without a GPU."""

import os
import pickle
import sys

import pytest
import torch
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode

from lorakit.config import TrainingConfig
from lorakit.dataset.loader import BatchMaker, data_loader_workers
from lorakit.errors import ConfigError
from lorakit.train import speed
from lorakit.train.optim import adamw_speed_flags, build_optimizer
from lorakit.train.trainer import Trainer, build_trainer, train

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
LORAKIT_SOURCE = os.sep + "lorakit" + os.sep


def step_losses(cfg) -> tuple[list[float], Trainer]:
    """Each optimizer step's loss (progress every step, no accumulation) and the trainer."""
    cfg.output.progress_every_n_steps = 1
    tr = build_trainer(cfg)
    losses = []
    tr.run(lambda p: losses.append(p.loss))
    return losses, tr


# --- a step with no host work ---------------------------------------------------------------------
def _names_device(args, kwargs) -> bool:
    return kwargs.get("device") is not None or any(
        isinstance(a, str | torch.device | torch.Tensor) for a in args
    )


@pytest.mark.parametrize(
    "opts",
    [
        {},  # pixels through the VAE each step, captions tokenized before the step
        {"cache_latents": True, "cache_text_encoder_outputs": True, "network_train_unet_only": True},
        {"cache_latents": True, "min_snr_gamma": 5.0},
    ],
)
def test_the_step_moves_nothing_to_the_device_and_makes_no_generator(train_config, monkeypatch, opts):
    """Inside the step (Trainer._loss) lorakit's code names no device: every input was moved by
    device_batch, before it. A reseed, not a new torch.Generator, gives each step its noise."""
    tr = build_trainer(train_config(max_data_loader_n_workers=0, max_train_steps=3, **opts))
    inside, moves, generators = [False], [], []
    real_loss = Trainer._loss

    def loss(self, batch, *a, **k):
        for name in ("latents", "pixels", "loss_weights", "size_ids"):
            t = getattr(batch, name)
            assert t is None or t.device == self.device, name
        assert (batch.conditioning is not None) == bool(opts.get("cache_text_encoder_outputs"))
        assert (batch.token_ids is not None) == (batch.conditioning is None)
        inside[0] = True
        try:
            return real_loss(self, batch, *a, **k)
        finally:
            inside[0] = False

    def spy(name):
        real = getattr(torch.Tensor, name)

        def call(self, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if inside[0] and LORAKIT_SOURCE in caller and _names_device(args, kwargs):
                moves.append(f"{name} at {caller}:{sys._getframe(1).f_lineno}")
            return real(self, *args, **kwargs)

        return call

    class CountedGenerator(torch.Generator):
        def __init__(self, *args, **kwargs):
            generators.append(args or kwargs)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(Trainer, "_loss", loss)
    for name in ("to", "copy_", "cuda", "pin_memory"):
        monkeypatch.setattr(torch.Tensor, name, spy(name))
    monkeypatch.setattr(torch, "Generator", CountedGenerator)
    tr.run()
    assert tr.pos.step == 3
    assert moves == []
    assert generators == []


def test_pinned_batch_keeps_its_values(train_config):
    """Batch.pin_memory (the DataLoader's pin hook) and Batch.to keep every value."""
    tr = build_trainer(train_config(max_data_loader_n_workers=0))
    batch = next(iter(tr.dataset.batches(0)))
    if torch.cuda.is_available():
        pinned = batch.pin_memory()
        assert pinned.pixels.is_pinned() and pinned.loss_weights.is_pinned()
        assert torch.equal(pinned.pixels, batch.pixels)
    moved = tr.device_batch(batch)
    assert torch.equal(moved.pixels.cpu(), batch.pixels)
    assert moved.token_ids is not None and moved.token_ids[0].shape == (len(batch.paths), 1, 77)
    assert tr.device_batch(moved).pixels is moved.pixels  # already there: not copied again


@CUDA
def test_cuda_copies_to_the_gpu_are_pinned_and_non_blocking(train_config, monkeypatch):
    """On CUDA every copy lorakit makes to the GPU during the run (device_batch's) is from pinned memory
    and non-blocking; cached latents and text-encoder outputs live on the GPU (they fit its share)."""
    cached = build_trainer(
        train_config(cache_latents=True, cache_text_encoder_outputs=True, network_train_unet_only=True)
    )
    assert {t.device.type for t in cached.dataset.cached_tensors()} == {"cuda"}
    assert {row.context.device.type for row in cached.te_cache.values()} == {"cuda"}
    tr = build_trainer(train_config(max_train_steps=3))
    blocking = []
    real_to = torch.Tensor.to

    def to(self, *args, **kwargs):
        caller = sys._getframe(1).f_code.co_filename
        moved = real_to(self, *args, **kwargs)
        if LORAKIT_SOURCE in caller and self.device.type == "cpu" and moved.device.type == "cuda":
            if not (kwargs.get("non_blocking") and self.is_pinned()):
                blocking.append(f"{caller}:{sys._getframe(1).f_lineno}")
        return moved

    monkeypatch.setattr(torch.Tensor, "to", to)
    tr.run()
    assert blocking == []


# --- DataLoader workers ---------------------------------------------------------------------------
def test_data_loader_workers_give_the_losses_of_the_main_process(train_config, tmp_path):
    """Two worker processes (persistent over two epochs) decode the images of exactly the batches the
    training process would: the same loss at every step."""
    common = dict(max_train_epochs=2, flip_aug=True, shuffle_caption=True)
    main, tr0 = step_losses(
        train_config(output_dir=str(tmp_path / "a"), max_data_loader_n_workers=0, **common)
    )
    workers, tr2 = step_losses(
        train_config(
            output_dir=str(tmp_path / "b"),
            max_data_loader_n_workers=2,
            persistent_data_loader_workers=True,
            **common,
        )
    )
    assert tr0._loader is None
    assert tr2._loader is not None and tr2._loader.loader.num_workers == data_loader_workers(2)
    assert len(main) == tr0.total_steps > 4
    assert workers == main
    a, b = (
        load_file(str(tmp_path / "a" / "tiny.safetensors")),
        load_file(str(tmp_path / "b" / "tiny.safetensors")),
    )
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_batches_survive_pickling_for_spawned_workers(train_config):
    """Windows' workers are spawned: they get a pickled copy of the batch maker, which must make the
    same batches."""
    tr = build_trainer(train_config(max_data_loader_n_workers=0, flip_aug=True, shuffle_caption=True))
    maker = BatchMaker(tr.dataset)
    copy = pickle.loads(pickle.dumps(maker))
    for key in tr.dataset.batch_keys(1):
        mine, theirs = maker[key], copy[key]
        assert torch.equal(mine.pixels, theirs.pixels)
        assert mine.captions == theirs.captions and mine.flipped == theirs.flipped


def test_spawned_workers_make_the_same_batches(train_config):
    """Windows (and macOS) start workers by spawning: a fresh interpreter unpickles the batch maker."""
    from lorakit.dataset.loader import BatchLoader

    tr = build_trainer(train_config(max_data_loader_n_workers=0, flip_aug=True, shuffle_caption=True))
    spawned = list(BatchLoader(tr.dataset, 1, context="spawn").batches(1))
    here = list(tr.dataset.batches(1))
    assert [b.index for b in spawned] == [b.index for b in here] and len(here) > 1
    for a, b in zip(spawned, here):
        assert torch.equal(a.pixels, b.pixels) and a.captions == b.captions and a.flipped == b.flipped


def test_worker_count_is_kohyas_rule():
    assert data_loader_workers(8, cpu_count=2) == 2
    assert data_loader_workers(8, cpu_count=16) == 8
    assert data_loader_workers(0, cpu_count=16) == 0
    assert TrainingConfig().max_data_loader_n_workers == 8
    assert TrainingConfig().persistent_data_loader_workers is False


def test_negative_worker_count_is_refused(train_config):
    with pytest.raises(ConfigError, match="max_data_loader_n_workers"):
        train_config(max_data_loader_n_workers=-1).validate()


# --- cached and uncached latents ------------------------------------------------------------------
def test_cached_and_uncached_latents_give_the_same_losses(train_config, tmp_path, monkeypatch):
    """With the VAE's posterior made (nearly) a point, a run that encodes every step and one that
    cached its latents draw the same timesteps and noise: the same loss at every step. (The VAE's
    sample has its own stream, so the noise does not depend on whether latents are cached.)"""
    from lorakit.models import loader

    real_load = loader.load_base_model

    def narrow_posterior(path, *args, **kwargs):
        base = real_load(path, *args, **kwargs)
        q = base.vae.quant_conv  # its second half of channels is the posterior's log-variance
        with torch.no_grad():
            half = q.out_channels // 2
            q.weight[half:] = 0
            q.bias[half:] = -30.0  # std = exp(-15)
        return base

    monkeypatch.setattr(loader, "load_base_model", narrow_posterior)
    common = dict(max_train_steps=4, max_data_loader_n_workers=0, reg_data_dir=None)
    uncached, _ = step_losses(train_config(output_dir=str(tmp_path / "u"), **common))
    cached, _ = step_losses(train_config(output_dir=str(tmp_path / "c"), cache_latents=True, **common))
    assert len(uncached) == 4
    assert cached == pytest.approx(uncached, rel=1e-4, abs=1e-6)


# --- the optimizer ----------------------------------------------------------------------------------
class OpCount(TorchDispatchMode):
    """Top-level tensor ops dispatched. Not counted: a CPU foreach op's per-tensor fallback inside
    it, and `.item()` of AdamW's CPU step counters (host reads, no kernel)."""

    def __init__(self):
        super().__init__()
        self.n = self.depth = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += self.depth == 0 and "_local_scalar_dense" not in str(func)
        self.depth += 1
        try:
            return func(*args, **(kwargs or {}))
        finally:
            self.depth -= 1


def ops_per_adamw_step(n_tensors: int, args: tuple = ()) -> tuple[int, torch.optim.Optimizer]:
    params = [torch.nn.Parameter(torch.randn(8, 4)) for _ in range(n_tensors)]
    opt, _ = build_optimizer(TrainingConfig(optimizer_args=list(args)), [{"params": params, "lr": 1e-3}])
    for _ in range(2):  # the first step makes the state
        for p in params:
            p.grad = torch.ones_like(p)
        with OpCount() as count:
            opt.step()
    return count.n, opt


def test_adamw_updates_all_lora_tensors_at_once():
    """foreach on the CPU (fused on CUDA): an AdamW step dispatches as many ops for 40 LoRA tensors as
    for 4, where the per-tensor loop dispatches ten times as many."""
    few, opt = ops_per_adamw_step(4)
    many, _ = ops_per_adamw_step(40)
    assert opt.defaults["foreach"] is True
    assert many < 2 * few, (few, many)
    loop_few, _ = ops_per_adamw_step(4, ("foreach=False",))
    loop_many, _ = ops_per_adamw_step(40, ("foreach=False",))
    assert loop_many > 5 * loop_few  # what the test tells apart
    cuda_params = [type("P", (), {"device": torch.device("cuda")})()]
    assert adamw_speed_flags([{"params": cuda_params}]) == {"fused": True}
    # fp16: the grad scaler's skipped steps must stay visible to accelerate (no fused AdamW)
    assert adamw_speed_flags([{"params": cuda_params}], fp16=True) == {"foreach": True}


def test_user_optimizer_args_win_and_metadata_names_only_them():
    params = [torch.nn.Parameter(torch.randn(2, 2))]
    cfg = TrainingConfig(optimizer_args=["foreach=False", "weight_decay=0.1"])
    opt, text = build_optimizer(cfg, [{"params": params, "lr": 1e-3}])
    assert opt.defaults["foreach"] is False
    assert text == "torch.optim.adamw.AdamW(foreach=False,weight_decay=0.1)"
    _, plain = build_optimizer(TrainingConfig(), [{"params": params, "lr": 1e-3}])
    assert plain == "torch.optim.adamw.AdamW()"  # the speed flag lorakit picks is not the user's


def test_one_optimizer_step_per_training_step(train_config):
    """Every LoRA tensor's AdamW step count is the run's step count, with accumulation too."""
    tr = build_trainer(train_config(max_train_steps=3, gradient_accumulation_steps=2))
    tr.run()
    steps = {float(s["step"]) for s in tr.optimizer.optimizer.state.values()}
    assert steps == {3.0}
    assert len(tr.optimizer.optimizer.state) == len(tr.network.parameters())


# --- saving -----------------------------------------------------------------------------------------
def test_batched_copy_to_the_cpu_keeps_every_tensor():
    from lorakit.transfer import nested_to_cpu, tensors_to_cpu

    g = torch.Generator().manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    src = {
        "a": torch.randn(3, 4, generator=g).to(device),
        "b": torch.tensor(2.0).to(device),
        "c": torch.randn(5, generator=g).half().to(device),
        "d": torch.randn(2, 2, generator=g).t(),  # not contiguous
    }
    out = tensors_to_cpu(src)
    assert list(out) == list(src)
    for k, t in src.items():
        assert out[k].device.type == "cpu" and out[k].is_contiguous() and torch.equal(out[k], t.cpu())
    state = nested_to_cpu(
        {"state": {0: {"step": src["b"], "m": src["a"]}}, "groups": [{"betas": (0.9, 0.99)}]}
    )
    assert torch.equal(state["state"][0]["m"], src["a"].cpu()) and state["groups"][0]["betas"] == (0.9, 0.99)


# --- compile ----------------------------------------------------------------------------------------
def test_compiled_step_learns_what_the_eager_step_learns(train_config, tmp_path, caplog):
    """torch_compile: the same losses and LoRA as eager within tolerance. Backend aot_eager (dynamo's
    graph capture and AOT autograd, no code generation): inductor's C++ build takes minutes on a
    2-core CI machine; a CUDA test below runs inductor."""
    import logging

    common = dict(max_train_steps=3, cache_latents=True, save_precision="float", reg_data_dir=None)
    eager, _ = step_losses(train_config(output_dir=str(tmp_path / "e"), **common))
    from torch._dynamo.utils import counters

    graphs = counters["stats"]["unique_graphs"]
    with caplog.at_level(logging.INFO, logger="lorakit"):
        compiled, tr = step_losses(
            train_config(
                output_dir=str(tmp_path / "c"), torch_compile=True, dynamo_backend="aot_eager", **common
            )
        )
    assert tr._unet_compiled is not None and tr.base.unet is not tr._unet_compiled  # swapped in only per step
    assert compiled == pytest.approx(eager, rel=1e-4)
    a, b = (
        load_file(str(tmp_path / "e" / "tiny.safetensors")),
        load_file(str(tmp_path / "c" / "tiny.safetensors")),
    )
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6, msg=k)
    assert caplog.text.count("torch_compile: the first step at 64x64 (batch 2)") == 1
    assert counters["stats"]["unique_graphs"] - graphs == 1  # one bucket shape: compiled once, 3 steps


def test_inductor_modes_need_inductor(train_config):
    cfg = train_config(torch_compile=True, dynamo_backend="aot_eager", torch_compile_mode="reduce-overhead")
    with pytest.raises(ConfigError, match="torch_compile_mode"):
        build_trainer(cfg)


@CUDA
def test_cuda_compiled_step_matches_eager_with_inductor_and_cuda_graphs(train_config, tmp_path):
    common = dict(max_train_steps=4, cache_latents=True, save_precision="float", reg_data_dir=None)
    eager, _ = step_losses(train_config(output_dir=str(tmp_path / "e"), **common))
    for mode in ("default", "reduce-overhead"):
        out = tmp_path / mode
        compiled, _ = step_losses(
            train_config(output_dir=str(out), torch_compile=True, torch_compile_mode=mode, **common)
        )
        assert compiled == pytest.approx(eager, rel=2e-3), mode


# --- deterministic ----------------------------------------------------------------------------------
@pytest.fixture
def restore_determinism(monkeypatch):
    before = (
        torch.are_deterministic_algorithms_enabled(),
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.deterministic,
    )
    workspace = os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    yield
    os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    if workspace is not None:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = workspace
    torch.use_deterministic_algorithms(before[0])
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = before[1:]


def test_deterministic_sets_the_flags(restore_determinism, monkeypatch):
    torch.backends.cudnn.benchmark = True
    speed.apply_deterministic(False)
    assert not torch.are_deterministic_algorithms_enabled() and "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    speed.apply_deterministic(True)
    assert torch.are_deterministic_algorithms_enabled()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert torch.backends.cudnn.benchmark is False and torch.backends.cudnn.deterministic is True


def test_deterministic_after_cuda_started_says_how_to_set_the_workspace(restore_determinism, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    with pytest.raises(ConfigError, match=r"CUBLAS_WORKSPACE_CONFIG=:4096:8.*before starting Python"):
        speed.apply_deterministic(True)
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # set by the user: fine
    speed.apply_deterministic(True)


def test_deterministic_cpu_run_is_the_plain_run(train_config, tmp_path, restore_determinism):
    """On the CPU lorakit is bit-exact anyway: deterministic changes nothing but the flags."""
    a = train(train_config(output_dir=str(tmp_path / "a"), max_train_steps=2))
    b = train(train_config(output_dir=str(tmp_path / "b"), max_train_steps=2, deterministic=True))
    ta, tb = load_file(str(a)), load_file(str(b))
    assert all(torch.equal(ta[k], tb[k]) for k in ta)


DETERMINISTIC_RUNS = """
import json, sys
import torch
from safetensors.torch import load_file
from lorakit.config import TrainConfig
from lorakit.train.trainer import build_trainer, train

flat, out = json.loads(sys.argv[1]), sys.argv[2]
def cfg(name, **extra):
    return TrainConfig.from_dict({**flat, "output_dir": f"{out}/{name}", **extra})
a = load_file(str(train(cfg("a"))))
b = load_file(str(train(cfg("b"))))
def stop_at_3(p):
    if p.step == 3:
        raise KeyboardInterrupt
try:
    build_trainer(cfg("r", progress_every_n_steps=1)).run(stop_at_3)
except KeyboardInterrupt:
    pass
r = load_file(str(train(cfg("r", resume=f"{out}/r/tiny-state"))))
print(json.dumps({"same_seed": all(torch.equal(a[k], b[k]) for k in a),
                  "resumed": all(torch.equal(a[k], r[k]) for k in a)}))
"""


@CUDA
def test_cuda_deterministic_runs_and_resume_are_bit_identical(train_config, tmp_path):
    """On CUDA with deterministic = true: two runs with one seed, and a run stopped at step 3 and
    resumed, give the same LoRA to the bit. In a fresh process: cuBLAS reads its workspace setting when
    CUDA starts, and this test process may have started it already."""
    import json
    import subprocess

    cfg = train_config(
        max_train_steps=6, deterministic=True, save_state=True, save_precision="float", flip_aug=True,
        mixed_precision="bf16", reg_data_dir=None,
    )  # fmt: skip
    flat = {k: v for k, v in cfg.flat().items() if v is not None}
    src = os.path.dirname(os.path.dirname(speed.__file__.rsplit(os.sep, 1)[0]))
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("CUBLAS_WORKSPACE_CONFIG", None)  # lorakit sets it before CUDA starts
    done = subprocess.run(
        [sys.executable, "-c", DETERMINISTIC_RUNS, json.dumps(flat), str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"same_seed": True, "resumed": True}
