"""The remembered base-model sha256: right, read once per (file, size, mtime), never stale."""

import hashlib
import os

import pytest

from lorakit import hashing


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "hashes.json"


def test_cached_sha256_is_the_file_sha256_and_is_remembered(tmp_path, cache, monkeypatch):
    f = tmp_path / "base.safetensors"
    f.write_bytes(os.urandom(3 << 20))
    want = hashlib.sha256(f.read_bytes()).hexdigest()
    assert hashing.cached_file_sha256(f) == want
    assert cache.is_file()

    reads = []
    monkeypatch.setattr(hashing, "file_sha256", lambda p: reads.append(p) or "x")
    assert hashing.cached_file_sha256(f) == want  # from the cache: the file is not read again
    assert reads == []

    f.write_bytes(os.urandom(3 << 20))  # a changed file (size/mtime) is hashed again
    os.utime(f, ns=(1, 1))
    assert hashing.cached_file_sha256(f) == "x"
    assert len(reads) == 1


def test_a_broken_cache_is_ignored(tmp_path, cache):
    cache.parent.mkdir(parents=True)
    cache.write_text("{not json")
    f = tmp_path / "a.bin"
    f.write_bytes(b"abc")
    assert hashing.cached_file_sha256(f) == hashlib.sha256(b"abc").hexdigest()


def test_cache_folder_defaults(monkeypatch, tmp_path):
    monkeypatch.delenv("LORAKIT_CACHE_DIR", raising=False)
    monkeypatch.setattr(hashing.sys, "platform", "win32")
    monkeypatch.setenv("LOCALAPPDATA", str(tmp_path / "Local"))
    assert hashing.cache_dir() == tmp_path / "Local" / "lorakit"
    monkeypatch.setattr(hashing.sys, "platform", "linux")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hashing.cache_dir() == tmp_path / "xdg" / "lorakit"


def test_background_hands_back_result_and_error():
    assert hashing.in_background(lambda a, b: a + b, 2, 3).result(timeout=10) == 5
    with pytest.raises(ZeroDivisionError):
        hashing.in_background(lambda: 1 / 0).result(timeout=10)
