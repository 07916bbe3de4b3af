"""Out-of-memory errors of every kind are explained, with what to change; other errors are not."""

import pytest

from lorakit.errors import explain_memory_error


def paging_file_error() -> OSError:
    e = OSError(22, "The paging file is too small for this operation to complete")
    e.winerror = 1455  # what Windows sets on the OSError (Linux has no such attribute)
    return e


def test_windows_paging_file_error_is_recognised():
    advice = explain_memory_error(paging_file_error(), doing="loading the model")
    assert "paging file" in advice and "loading the model" in advice and "Virtual memory" in advice


def test_ram_and_gpu_out_of_memory_get_their_own_advice():
    assert "RAM" in explain_memory_error(MemoryError())
    gpu = explain_memory_error(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert "gradient_checkpointing" in gpu and "Sysmem Fallback" in gpu
    import torch

    assert "GPU" in explain_memory_error(torch.OutOfMemoryError("CUDA out of memory"))


@pytest.mark.parametrize(
    "error", [OSError(2, "No such file"), RuntimeError("shape mismatch"), ValueError("x")]
)
def test_other_errors_are_left_alone(error):
    assert explain_memory_error(error) is None


def test_cli_prints_the_advice_instead_of_a_traceback(monkeypatch, capsys, tmp_path):
    from lorakit import cli
    from lorakit.cli import draw

    def boom(args):
        raise paging_file_error()

    monkeypatch.setattr(draw, "cmd_inspect", boom)
    assert cli.main(["inspect", str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "paging file is too small" in err and "lorakit inspect" in err and "Traceback" not in err
