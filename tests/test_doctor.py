"""`lorakit doctor` finds planted problems (small page file, torch without kernels for the GPU,
a CPU-only torch beside an NVIDIA card, an unwritable output folder) and says how to fix each."""

import ctypes
import tempfile
import types

import pytest

from lorakit import doctor

GIB = 1024**3


def test_small_windows_page_file_is_a_problem_with_the_fix():
    mem = {"ram_total": 16 * GIB, "ram_free": 10 * GIB, "commit_limit": 18 * GIB, "commit_free": 9 * GIB}
    ram, commit = doctor.memory_checks(mem, windows=True)
    assert ram.ok and not commit.ok
    assert "2.0 GiB page file" in commit.detail and "Virtual memory" in commit.fix
    roomy = dict(mem, commit_limit=48 * GIB)
    assert doctor.memory_checks(roomy, windows=True)[1].ok
    assert doctor.memory_checks(mem, windows=False)[1].ok  # Linux overcommits: shown, not a problem


def test_windows_memory_is_read_with_global_memory_status():
    class Kernel32:
        def GlobalMemoryStatusEx(self, ref):  # noqa: N802 - the Win32 name
            status = ctypes.cast(ref, ctypes.POINTER(doctor._MemoryStatusEx)).contents
            assert status.dwLength == ctypes.sizeof(doctor._MemoryStatusEx)
            status.ullTotalPhys, status.ullAvailPhys = 16 * GIB, 8 * GIB
            status.ullTotalPageFile, status.ullAvailPageFile = 20 * GIB, 9 * GIB
            return 1

    mem = doctor._windows_memory(Kernel32())
    assert mem == {
        "ram_total": 16 * GIB,
        "ram_free": 8 * GIB,
        "commit_limit": 20 * GIB,
        "commit_free": 9 * GIB,
    }


def fake_torch(archs, capability, cuda="12.4", available=True):
    cuda_mod = types.SimpleNamespace(
        is_available=lambda: available,
        get_arch_list=lambda: archs,
        device_count=lambda: 1,
        get_device_capability=lambda i: capability,
        get_device_name=lambda i: "NVIDIA GeForce RTX 5090",
        mem_get_info=lambda i: (30 * GIB, 32 * GIB),
    )
    return types.SimpleNamespace(
        __version__="2.6.0+cu124", version=types.SimpleNamespace(cuda=cuda), cuda=cuda_mod
    )


def test_rtx_50_on_a_torch_without_sm_120_kernels():
    gpu, memory = doctor.gpu_checks(fake_torch(["sm_80", "sm_86", "sm_90"], (12, 0)))
    assert not gpu.ok and "sm_120" in gpu.fix and "cu128" in gpu.fix and memory.ok
    good, _ = doctor.gpu_checks(fake_torch(["sm_80", "sm_90", "sm_120"], (12, 0), cuda="12.8"))
    assert good.ok and "compute 12.0" in good.detail


def test_cpu_torch_beside_an_nvidia_card(monkeypatch):
    monkeypatch.setattr(doctor.shutil, "which", lambda name: "/usr/bin/nvidia-smi")
    (row,) = doctor.gpu_checks(fake_torch([], (0, 0), cuda=None, available=False))
    assert not row.ok and "CPU-only" in row.detail and "CUDA build" in row.fix
    monkeypatch.setattr(doctor.shutil, "which", lambda name: None)
    assert doctor.gpu_checks(fake_torch([], (0, 0), cuda=None, available=False))[0].ok


def test_unwritable_output_folder(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):  # as a read-only folder answers (root, who runs CI, may write anywhere)
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "TemporaryFile", refuse)  # the write probe of train.preflight.probe_folder
    row = doctor.folder_check(tmp_path / "out")
    assert not row.ok and "cannot write in" in row.detail and "Permission denied" in row.detail


def test_output_folder_room_and_missing_parents(tmp_path, monkeypatch):
    row = doctor.folder_check(tmp_path / "not" / "yet")  # checked where it will be created
    assert row.ok and "writable" in row.detail and not (tmp_path / "not").exists()
    monkeypatch.setattr(doctor.shutil, "disk_usage", lambda p: types.SimpleNamespace(free=GIB // 2))
    full = doctor.folder_check(tmp_path)
    assert not full.ok and "0.5 GiB free" in full.detail


def test_report_and_exit_code(capsys, monkeypatch, tmp_path):
    from lorakit.cli import main

    monkeypatch.setattr(doctor, "system_memory", lambda: {"ram_total": 4 * GIB, "ram_free": GIB,
                                                          "commit_limit": 4 * GIB, "commit_free": GIB})  # fmt: skip
    assert main(["doctor", "--output_dir", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "FIX  RAM" in out and "-> an SD1.5 run wants 12 GB" in out and "1 problem(s)" in out
    missing = doctor.package_checks(find_spec=lambda name: None)
    assert all(r.ok and r.optional for r in missing)


def test_a_missing_onnxruntime_is_reported_with_the_pip_command(monkeypatch):
    real = doctor.importlib.util.find_spec
    monkeypatch.setattr(
        doctor.importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a)
    )
    rows = {r.name: r for r in doctor.package_checks()}
    row = rows["package onnxruntime"]
    assert row.ok and row.optional  # only captioning needs it: shown, not a problem
    assert "not installed: WD14 captioning" in row.detail and 'pip install "lorakit[caption]"' in row.detail
    assert "-    package onnxruntime  not installed" in doctor.format_report([row])
    monkeypatch.setattr(doctor.importlib.util, "find_spec", real)
    pytest.importorskip("onnxruntime")
    found = doctor.onnxruntime_check()
    assert found.ok and not found.optional and found.detail.startswith("installed ") and "CPU" in found.detail
