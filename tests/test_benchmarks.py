"""benchmarks/train_speed.py: the training benchmark runs the real trainer on the tiny models on the CPU
(what CI can prove), prints its table and writes parseable JSON; its configuration grammar, MFU
arithmetic and GPU peak table."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def ts():
    return load("train_speed")


def table_rows(out: str) -> dict[str, list[str]]:
    rows = {}
    for line in out.splitlines():
        if line.startswith("| ") and not line.startswith("| config"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells
    return rows


def test_tiny_run_prints_the_columns_and_writes_json(ts, tmp_path, capsys):
    out_json = tmp_path / "speed.json"
    argv = ["--tiny", "--in_process", "--steps", "3", "--warmup", "1", "--configs", "sd15:b1,sd15:b2:te:gc"]
    results = ts.main([*argv, "--json", str(out_json)])
    out = capsys.readouterr().out

    header = next(line for line in out.splitlines() if line.startswith("| config"))
    for column in ("img/s", "ms/step", "start → step 1", "TFLOP/img", "MFU"):
        assert column in header
    rows = table_rows(out)
    assert set(rows) == {"sd15:b1", "sd15:b2:te:gc"}
    for name, cells in rows.items():
        assert float(cells[2]) > 0, name  # img/s
        mean, median = (float(v) for v in cells[3].split(" / "))
        assert mean > 0 and median > 0, name
        assert cells[-1] == "n/a", name  # no GPU: no MFU
        assert float(cells[-2]) > 0, name  # the FLOPs were counted
    assert "$ python benchmarks/train_speed.py --tiny" in out  # the command, to paste beside the table

    report = json.loads(out_json.read_text())
    assert report["command"].startswith("python benchmarks/train_speed.py")
    assert report["machine"]["gpu"] == "CPU" and report["machine"]["torch"]
    assert report["machine"]["lorakit_commit"]
    assert [r["config"] for r in report["results"]] == ["sd15:b1", "sd15:b2:te:gc"]
    for r, batch in zip(report["results"], (1, 2)):
        assert r["status"] == "ok" and r["batch"] == batch
        assert r["img_per_s"] > 0 and r["ms_per_step"] > 0
        assert r["mfu"] is None and r["flops_per_image"] > 0
        assert r["start_to_first_step_s"] >= r["first_step_s"] > 0
        assert r["options"]["train_batch_size"] == batch
    b1, b2 = report["results"]
    assert b1["options"]["network_train_unet_only"] and not b2["options"]["network_train_unet_only"]
    assert b2["options"]["gradient_checkpointing"]
    # a trained text encoder adds its backward: more FLOPs per image than the UNet alone
    assert b2["flops_per_image"] > b1["flops_per_image"]
    assert results == report["results"]


def test_profile_summarises_the_steps_after_the_timed_ones(ts, capsys):
    (r,) = ts.main(
        ["--tiny", "--in_process", "--steps", "2", "--warmup", "1", "--configs", "sd15:b1", "--profile", "1"]
    )
    assert r["status"] == "ok" and r["options"]["max_train_steps"] == 2 + 1 + 1
    assert "aten::" in r["profile"] and "syncs and copies:" in r["profile"]
    assert "syncs and copies:" in capsys.readouterr().out


@pytest.mark.slow
def test_script_runs_each_configuration_in_a_child_process(tmp_path):
    out_json = tmp_path / "speed.json"
    cmd = [sys.executable, str(BENCH / "train_speed.py"), "--tiny", "--steps", "2", "--warmup", "1"]
    cmd += ["--configs", "sdxl:b1", "--json", str(out_json)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    (r,) = json.loads(out_json.read_text())["results"]
    assert r["status"] == "ok" and r["img_per_s"] > 0
    assert r["imports_s"] > 0 and r["start_to_first_step_s"] > r["imports_s"]


def test_configuration_grammar(ts):
    s = ts.parse_spec("sdxl:b4:gc:cte:8bit:network_dim=16")
    assert (s.family, s.batch, s.gc, s.cte, s.adam8bit, s.te, s.compile) == (
        "sdxl",
        4,
        True,
        True,
        True,
        False,
        False,
    )
    assert s.extra == {"network_dim": "16"}
    for bad in ("sd2:b1", "sd15:b0", "sd15:fast"):
        with pytest.raises(ValueError, match="configuration"):
            ts.parse_spec(bad)
    specs = ts.matrix_specs("sd15,sdxl", "1,8", "off,on", "off", "on")
    assert len(specs) == 8 and "sdxl:b8:te:compile" in specs and "sd15:b1:compile" in specs


def test_options_not_in_this_lorakit_are_reported_not_run(ts):
    from lorakit.config import field_index

    flat, why = ts.config_options(ts.parse_spec("sd15:b2:te"), "bf16", 32)
    assert why is None and flat["train_batch_size"] == 2 and not flat["network_train_unet_only"]
    _, why = ts.config_options(ts.parse_spec("sd15:b1:no_such_option=1"), "bf16", 32)
    assert why.startswith("not available") and "no_such_option" in why
    _, why = ts.config_options(ts.parse_spec("sd15:b1:compile"), "bf16", 32)
    if "torch_compile" in field_index():
        assert why is None
    else:
        assert why.startswith("not available") and "torch_compile" in why


def test_peak_table_and_mfu(ts):
    assert ts.peak_tflops("NVIDIA H100 80GB HBM3")[0] == 989.0
    assert ts.peak_tflops("NVIDIA H100 PCIe")[0] == 756.0
    assert ts.peak_tflops("NVIDIA H200")[0] == 989.0
    assert ts.peak_tflops("NVIDIA L40S")[0] == 362.0 and ts.peak_tflops("NVIDIA L4")[0] == 121.0
    assert ts.peak_tflops("CPU")[0] is None
    specs = {
        t: ts.parse_spec(t)
        for t in ("sd15:b1", "sd15:b8:compile:torch_compile_mode=max-autotune", "sdxl:b1:compile")
    }
    results = [
        {"config": "sd15:b1", "status": "ok", "img_per_s": 10.0, "flops_per_image": 2e12},
        {"config": "sd15:b8:compile:torch_compile_mode=max-autotune", "status": "ok", "img_per_s": 100.0},
        {"config": "sdxl:b1:compile", "status": "ok", "img_per_s": 1.0, "flops_per_image": None},
    ]
    ts.fill_mfu(results, specs, 1000.0)
    assert results[0]["mfu"] == pytest.approx(0.02)
    assert results[1]["flops_per_image"] == 2e12 and results[1]["mfu"] == pytest.approx(
        0.2
    )  # the eager twin's
    assert results[2]["mfu"] is None  # no eager SDXL run to count from
