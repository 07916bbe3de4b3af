"""cuda_graph (issue 12, part 2): the whole step recorded per batch shape and replayed. On the CPU the
recorder is the eager stand-in (train/graph_step.py: EagerRecorder), which runs the recorded step
function on the graph's fixed tensors: it checks the inputs copied in, the learning rate read from
its tensor, the warm-up undone, one graph per shape, resume. The CUDA-only test records for real."""

import logging

import pytest
import torch
from safetensors.torch import load_file

from lorakit.errors import ConfigError
from lorakit.train import graph_step
from lorakit.train.trainer import build_trainer

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# an eager run with the optimizer a recorded step uses (fused, capturable AdamW): only the lr's
# rounding differs (an fp32 tensor in the graph, a Python float in the eager step), and not at all
# for a constant lr that fp32 holds exactly
SAME_OPTIMIZER = ["fused=True", "capturable=True"]
EXACT_LR = 2**-10
SCHEDULE = dict(lr_scheduler="cosine_with_restarts", lr_warmup_steps=2, max_grad_norm=1.0)


@pytest.fixture
def eager_recorder(monkeypatch):
    if not torch.cuda.is_available():
        monkeypatch.setattr(graph_step, "recorder_for", lambda device: graph_step.EagerRecorder())


def run(cfg, stop_at: int | None = None):
    """(each step's loss, the trainer); stop_at: Ctrl-C once that step is reported."""
    cfg.output.progress_every_n_steps = 1
    tr = build_trainer(cfg)
    losses = []

    def progress(p):
        losses.append(p.loss)
        if p.step == stop_at:
            raise KeyboardInterrupt

    try:
        tr.run(progress)
    except KeyboardInterrupt:
        pass
    return losses, tr


def assert_run_long_zeroed_gradients(graphs) -> None:
    """The gradients are the run's own tensors, one per LoRA tensor the loss reaches, zeroed by the
    last update."""
    grads = [p.grad for p in graphs.params if p.grad is not None]
    assert len(grads) == len(graphs.grads) and all(a is b for a, b in zip(grads, graphs.grads))
    assert not any(g.any() for g in grads)


def assert_same_lora(a, b, rtol=1e-4, atol=1e-6):
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys()
    for k in ta:
        torch.testing.assert_close(tb[k], ta[k], rtol=rtol, atol=atol, msg=k)


@pytest.mark.parametrize(
    "opts",
    [
        {},  # pixels through the VAE before each replay, text encoder trained from token ids
        {
            "cache_latents": True,
            "cache_text_encoder_outputs": True,
            "network_train_unet_only": True,
            "min_snr_gamma": 5.0,
            "v_parameterization": True,
            "noise_offset": 0.05,
        },
    ],
)
def test_recorded_step_learns_what_the_eager_step_learns(
    train_config, tmp_path, eager_recorder, caplog, opts
):
    """The same losses and LoRA as eager steps with the same optimizer, under a changing learning
    rate: the noise drawn eagerly reaches the graph, the lr tensor follows the schedule, and the
    three warm-up steps leave nothing behind (left in, they move the LoRA by ~1e-3 here)."""
    common = dict(max_train_steps=4, save_precision="float", reg_data_dir=None, **SCHEDULE, **opts)
    eager, _ = run(train_config(output_dir=str(tmp_path / "e"), optimizer_args=SAME_OPTIMIZER, **common))
    with caplog.at_level(logging.INFO, logger="lorakit"):
        graphed, tr = run(train_config(output_dir=str(tmp_path / "g"), cuda_graph=True, **common))
    assert graphed == pytest.approx(eager, rel=1e-6)
    assert_same_lora(tmp_path / "e" / "tiny.safetensors", tmp_path / "g" / "tiny.safetensors")
    assert len(tr._graphs.passes) == 1 and tr._graphs.recorded == 2  # the pass and the update
    assert caplog.text.count("cuda_graph: recorded the pass for 8x8 latents, batch 2") == 1
    assert caplog.text.count("cuda_graph: recorded the update") == 1
    # the gradients are the run's own tensors, zeroed by the last update
    assert_run_long_zeroed_gradients(tr._graphs)
    groups = tr.optimizer.optimizer.param_groups
    assert all(isinstance(g["lr"], float) for g in groups)  # what the scheduler and states see


def test_each_batch_shape_gets_its_graph(train_config, tmp_path, eager_recorder, caplog):
    """8 images in batches of 3: shapes 3 and 2, each recorded once, replayed as often as it comes;
    bit for bit the eager run's LoRA (an lr that fp32 holds exactly)."""
    common = dict(
        max_train_steps=6,
        train_batch_size=3,
        save_precision="float",
        reg_data_dir=None,
        learning_rate=EXACT_LR,
    )
    eager, _ = run(train_config(output_dir=str(tmp_path / "e"), optimizer_args=SAME_OPTIMIZER, **common))
    with caplog.at_level(logging.INFO, logger="lorakit"):
        graphed, tr = run(train_config(output_dir=str(tmp_path / "g"), cuda_graph=True, **common))
    shapes = sorted(key[0][1][0] for key in tr._graphs.passes)  # ("latents", shape, dtype) first
    assert shapes == [2, 3]
    # AdamW counted 6 steps, not 6 + 2 x 3 warm-up steps
    assert {float(s["step"]) for s in tr.optimizer.optimizer.state.values()} == {6.0}
    assert "batch 3" in caplog.text and "batch 2" in caplog.text and "3 graph(s) recorded" in caplog.text
    assert graphed == eager
    assert_same_lora(tmp_path / "e" / "tiny.safetensors", tmp_path / "g" / "tiny.safetensors", rtol=0, atol=0)


def test_gradient_accumulation_replays_the_update_every_n_passes(train_config, tmp_path, eager_recorder):
    """gradient_accumulation_steps = 2, 8 images in batches of 3 (shapes 3, 3, 2 per epoch): passes add
    into the gradients, the update replays every second pass and at an epoch's end, bit for bit the
    eager run."""
    common = dict(
        max_train_steps=4, train_batch_size=3, gradient_accumulation_steps=2, save_precision="float",
        reg_data_dir=None, learning_rate=EXACT_LR,
    )  # fmt: skip
    eager, _ = run(train_config(output_dir=str(tmp_path / "e"), optimizer_args=SAME_OPTIMIZER, **common))
    graphed, tr = run(train_config(output_dir=str(tmp_path / "g"), cuda_graph=True, **common))
    assert graphed == eager and len(tr._graphs.passes) == 2
    assert {float(s["step"]) for s in tr.optimizer.optimizer.state.values()} == {4.0}
    assert_same_lora(tmp_path / "e" / "tiny.safetensors", tmp_path / "g" / "tiny.safetensors", rtol=0, atol=0)


def test_lora_tensors_the_loss_does_not_reach_are_left_alone(train_config, tmp_path, eager_recorder):
    """clip_skip = 2 with the text encoder trained: its last layer's LoRA gets no gradient. As in an
    eager run AdamW skips it (with a zero gradient it would still decay it): bit for bit the eager
    run, and that layer's LoRA unchanged from its start."""
    common = dict(
        max_train_steps=3, save_precision="float", reg_data_dir=None, learning_rate=EXACT_LR, clip_skip=2
    )
    eager, _ = run(train_config(output_dir=str(tmp_path / "e"), optimizer_args=SAME_OPTIMIZER, **common))
    graphed, tr = run(train_config(output_dir=str(tmp_path / "g"), cuda_graph=True, **common))
    unreached = [p for p in tr._graphs.params if p.grad is None]
    assert unreached and len(tr._graphs.grads) == len(tr._graphs.params) - len(unreached)
    assert graphed == eager
    assert_same_lora(tmp_path / "e" / "tiny.safetensors", tmp_path / "g" / "tiny.safetensors", rtol=0, atol=0)


def test_recorded_run_resumes_to_the_uninterrupted_one(train_config, tmp_path, eager_recorder):
    """Stopped at step 2 and resumed (recording again): the uninterrupted run's LoRA. The same state
    resumed without cuda_graph takes the eager optimizer's settings back (step count on the CPU)."""
    common = dict(max_train_steps=4, save_precision="float", reg_data_dir=None, save_state=True, **SCHEDULE)
    whole = train_config(output_dir=str(tmp_path / "w"), cuda_graph=True, **common)
    run(whole)
    run(train_config(output_dir=str(tmp_path / "r"), cuda_graph=True, **common), stop_at=2)
    state = tmp_path / "r" / "tiny-state"
    _, tr = run(train_config(output_dir=str(tmp_path / "r"), cuda_graph=True, resume=str(state), **common))
    assert tr.pos.step == 4
    assert_same_lora(tmp_path / "w" / "tiny.safetensors", tmp_path / "r" / "tiny.safetensors", rtol=0, atol=0)

    _, eager = run(train_config(output_dir=str(tmp_path / "x"), resume=str(state), **common))
    opt = eager.optimizer.optimizer
    assert not any(g.get("capturable") or g.get("fused") for g in opt.param_groups)
    assert all(s["step"].device.type == "cpu" and s["step"].item() == 4 for s in opt.state.values())
    assert_same_lora(
        tmp_path / "w" / "tiny.safetensors", tmp_path / "x" / "tiny.safetensors", rtol=1e-4, atol=1e-6
    )


@pytest.mark.parametrize(
    "opts, says",
    [
        ({"mixed_precision": "fp16"}, "bf16"),
        ({"optimizer_type": "Lion"}, "AdamW"),
        ({"gradient_checkpointing": True}, "gradient_checkpointing = false"),
        ({"torch_compile": True}, "reduce-overhead"),
        ({"network_module": "lycoris.kohya", "network_args": ["module_dropout=0.1"]}, "module_dropout"),
    ],
)
def test_what_a_graph_cannot_record_is_refused_before_loading(train_config, opts, says):
    with pytest.raises(ConfigError, match=rf"cuda_graph = true: .*{says}.*or turn cuda_graph off"):
        build_trainer(train_config(cuda_graph=True, **opts))


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU-only check")
def test_cpu_run_is_told_it_needs_a_cuda_gpu(train_config):
    with pytest.raises(ConfigError, match="cuda_graph = true needs a CUDA GPU, and this run is on the CPU"):
        build_trainer(train_config(cuda_graph=True))


@CUDA
@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_cuda_recorded_step_matches_eager(train_config, tiny_sdxl_base, tmp_path, caplog, family):
    """Real CUDA graphs (bf16, two batch shapes, a changing lr, text encoders trained, images decoded
    by DataLoader workers, validation and sample drawing between replays): the eager run's losses and
    LoRA within kernel rounding, one graph per shape, no warning (no fallback to eager)."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("usu bear --w 64 --h 64 --s 4 --d 1\n", encoding="utf-8")
    common = dict(
        max_train_steps=6, train_batch_size=3, save_precision="float", reg_data_dir=None,
        mixed_precision="bf16", validation_split=0.25, validate_every_n_steps=2,
        sample_prompts=str(prompts), sample_every_n_steps=3, **SCHEDULE,
    )  # fmt: skip
    if family == "sdxl":
        common["pretrained_model_name_or_path"] = str(tiny_sdxl_base)
    eager, _ = run(train_config(output_dir=str(tmp_path / "e"), optimizer_args=SAME_OPTIMIZER, **common))
    with caplog.at_level(logging.INFO, logger="lorakit"):
        graphed, tr = run(train_config(output_dir=str(tmp_path / "g"), cuda_graph=True, **common))
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and "cuda_graph" in r.getMessage()]
    assert isinstance(tr._graphs.recorder, graph_step.CudaRecorder) and len(tr._graphs.passes) >= 1
    assert_run_long_zeroed_gradients(tr._graphs)
    assert graphed == pytest.approx(eager, rel=2e-3)
    assert_same_lora(
        tmp_path / "e" / "tiny.safetensors", tmp_path / "g" / "tiny.safetensors", rtol=2e-2, atol=1e-4
    )


# ops that read a tensor's value on the host (item, bool, int, ...) or make an output whose size
# depends on values: on CUDA each waits for the GPU, which a graph capture refuses
HOST_READS = {
    "_local_scalar_dense",
    "nonzero",
    "masked_select",
    "unique",
    "_unique2",
    "repeat_interleave",
    "equal",
}


class HostReadSpy(graph_step.EagerRecorder):
    """Records like EagerRecorder, and lists every host-reading op the recorded step calls."""

    def __init__(self):
        self.seen: list[str] = []

    def record(self, fn):
        from torch.utils._python_dispatch import TorchDispatchMode

        seen = self.seen

        class Spy(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = func.overloadpacket.__name__
                if name in HOST_READS:
                    seen.append(name)
                return func(*args, **(kwargs or {}))

        def spied():
            with Spy():
                return fn()

        return spied


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_recorded_step_never_reads_a_value_on_the_host(
    train_config, tiny_sdxl_base, tmp_path, monkeypatch, family
):
    """Everything the recorded step runs — text encoders from token ids, the U-Net with LoRA, the loss
    with min-SNR, gradient clipping, fused AdamW — calls no op that reads a value on the
    host, so a capture on CUDA meets no sync (checked on the CPU with a dispatch-mode spy)."""
    spy = HostReadSpy()
    monkeypatch.setattr(graph_step, "recorder_for", lambda device: spy)
    opts = dict(max_train_steps=2, min_snr_gamma=5.0, max_grad_norm=1.0, reg_data_dir=None, cuda_graph=True)
    if family == "sdxl":
        opts["pretrained_model_name_or_path"] = str(tiny_sdxl_base)
    run(train_config(output_dir=str(tmp_path / family), **opts))
    assert spy.seen == []
