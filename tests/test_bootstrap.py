"""The set-up script's choices, per OS and GPU (its Windows branches run here with the platform given)."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def bootstrap(monkeypatch):
    spec = importlib.util.spec_from_file_location("lorakit_bootstrap", ROOT / "scripts" / "bootstrap.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.delenv("LORAKIT_TORCH", raising=False)
    monkeypatch.delenv("LORAKIT_TORCH_INDEX", raising=False)
    return module


def test_venv_python_per_os(bootstrap):
    assert bootstrap.venv_python(Path("v"), windows=True) == Path("v") / "Scripts" / "python.exe"
    assert bootstrap.venv_python(Path("v"), windows=False) == Path("v") / "bin" / "python"


def test_torch_build_per_platform(bootstrap, monkeypatch):
    py = Path("py")
    win_gpu = bootstrap.torch_install_command(py, "win32", nvidia=True)
    assert win_gpu[5] == "torch==2.13.0" and win_gpu[-2:] == ["--extra-index-url", bootstrap.CUDA_INDEX]
    # Linux wheels on PyPI carry CUDA already; no GPU means PyPI's build
    for platform, gpu in (("linux", True), ("linux", False), ("win32", False), ("darwin", False)):
        assert "--extra-index-url" not in bootstrap.torch_install_command(py, platform, nvidia=gpu)
    monkeypatch.setenv("LORAKIT_TORCH", "torch>=2.6,<2.15")
    monkeypatch.setenv("LORAKIT_TORCH_INDEX", "https://example.invalid/whl")
    cmd = bootstrap.torch_install_command(py, "linux", nvidia=False)
    assert cmd[5] == "torch>=2.6,<2.15" and cmd[-1] == "https://example.invalid/whl"


def test_the_default_torch_is_inside_the_projects_range(bootstrap):
    import re

    pyproject = (ROOT / "pyproject.toml").read_text()
    lo, hi = re.search(r'"torch>=(\d+\.\d+),<(\d+\.\d+)"', pyproject).groups()
    as_tuple = lambda v: tuple(int(x) for x in v.split("."))  # noqa: E731
    assert bootstrap.TORCH_RANGE == (as_tuple(lo), as_tuple(hi))
    default = as_tuple(bootstrap.TORCH_DEFAULT.split("==")[1])[:2]
    assert as_tuple(lo) <= default < as_tuple(hi)
