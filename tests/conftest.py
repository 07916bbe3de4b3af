"""Shared fixtures: a tiny SD1.x-family base model in LDM single-file layout, and tiny datasets."""

import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a test that tries to download fails instead
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the per-user cache (remembered base-model hashes) goes to a temp folder, not the tester's home
os.environ.setdefault("LORAKIT_CACHE_DIR", tempfile.mkdtemp(prefix="lorakit-test-cache-"))

# as `lorakit` itself does: fewer torch threads when the cores are busy (oversubscribed threads
# make the suite many times slower on a loaded CI machine)
from lorakit.threads import ENV as THREADS_ENV  # noqa: E402
from lorakit.threads import apply_threads, usable_cores  # noqa: E402

_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
_SET_HERE = "LORAKIT_TESTS_SET_THREADS"  # the count below is ours, not the tester's: a worker redoes it
if not os.environ.get(THREADS_ENV) or os.environ.get(_SET_HERE) == "1":
    # A fixed count, not each command's own look at the load (which other pytest-xdist workers, or
    # anything else on the machine, keep changing): the in-process `lorakit` commands and the child
    # processes get the same count, so a redraw or rerun in a test is bit-identical. MKL's count
    # too: workers inherit the main process's (auto: all cores), and two workers with spare MKL
    # threads spinning on the same cores run many times slower.
    # (pytest-xdist's controller runs this file too, and its workers inherit what it sets here)
    os.environ[THREADS_ENV] = os.environ["MKL_NUM_THREADS"] = str(max(1, usable_cores() // _workers))
    os.environ[_SET_HERE] = "1"
    import torch  # noqa: F401  (so that apply_threads sets torch's own count as well)
apply_threads()


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """A tiny random SD1.x-family model saved as an LDM-layout .safetensors."""
    from lorakit.testing import make_tiny_base

    return make_tiny_base(tmp_path_factory.mktemp("base") / "tiny-sd1.safetensors", seed=0)


@pytest.fixture
def tiny_data(tmp_path) -> tuple[Path, Path]:
    """train/5_usu bear (6 images) and reg/1_bear (6 images), 64x64."""
    from lorakit.testing import make_dataset

    return make_dataset(tmp_path / "data", n_train=4, n_reg=4, repeats=2)


def config_factory(base: Path, train_dir: Path, out: Path, name: str):
    """make(**overrides) -> a small, fast TrainConfig (64x64, batch 2, 4 steps) over `base`."""
    from lorakit.config import TrainConfig

    def make(**overrides):
        flat = {
            "pretrained_model_name_or_path": str(base),
            "train_data_dir": str(train_dir),
            "resolution": "64",
            "output_dir": str(out),
            "output_name": name,
            "network_dim": 4,
            "network_alpha": 2,
            "learning_rate": 1e-3,
            "max_train_steps": 4,
            "train_batch_size": 2,
            "seed": 1,
        }
        flat.update(overrides)
        return TrainConfig.from_dict(flat, source="test")

    return make


@pytest.fixture
def train_config(tiny_base, tiny_data, tmp_path):
    """A factory for a small, fast TrainConfig over the tiny model and data; overrides as kwargs."""
    return config_factory(tiny_base, tiny_data[0], tmp_path / "out", "tiny")


@pytest.fixture(scope="session")
def trained_lora(tmp_path_factory, tiny_base):
    """A LoRA with non-trivial weights on every module (UNet + text encoder, LoCon convs too)."""
    from lorakit.config import TrainConfig
    from lorakit.testing import make_dataset
    from lorakit.train.trainer import train

    root = tmp_path_factory.mktemp("compat")
    train_dir, _ = make_dataset(root / "data", n_train=4, n_reg=0, repeats=2)
    cfg = TrainConfig.from_dict(
        {
            "pretrained_model_name_or_path": str(tiny_base),
            "train_data_dir": str(train_dir),
            "resolution": "64",
            "output_dir": str(root / "out"),
            "output_name": "compat",
            "network_dim": 4,
            "network_alpha": 2,
            "conv_dim": 2,
            "conv_alpha": 1,
            "learning_rate": 2e-2,  # large, so the LoRA visibly changes the outputs
            "max_train_steps": 6,
            "save_precision": "float",
            "seed": 3,
        }
    )
    return train(cfg)


@pytest.fixture(scope="session")
def tiny_sdxl_bases(tmp_path_factory) -> dict[str, Path]:
    """A tiny random SDXL-shaped base as SGM-layout .safetensors: "eps" plain, and "vpred" the same
    weights with ComfyUI's v_pred/ztsnr marker keys (as NoobAI v-pred ships)."""
    from lorakit.models.families.sdxl import save_sgm_checkpoint
    from lorakit.models.tiny import build_sdxl_models, tiny_sdxl_arch

    folder = tmp_path_factory.mktemp("sdxl")
    arch = tiny_sdxl_arch()
    models = build_sdxl_models(arch, seed=0)
    return {
        "eps": save_sgm_checkpoint(folder / "tiny-sdxl.safetensors", *models, arch=arch),
        "vpred": save_sgm_checkpoint(
            folder / "tiny-sdxl-vpred.safetensors", *models, arch=arch, markers=("v_pred", "ztsnr")
        ),
    }


@pytest.fixture(scope="session")
def tiny_sdxl_base(tiny_sdxl_bases) -> Path:
    return tiny_sdxl_bases["eps"]


@pytest.fixture
def sdxl_config(tiny_sdxl_base, tiny_data, tmp_path):
    """train_config's twin over the tiny SDXL base (64x64, batch 2, 4 steps); overrides as kwargs."""
    return config_factory(tiny_sdxl_base, tiny_data[0], tmp_path / "out", "xl")
