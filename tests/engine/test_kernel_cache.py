"""The kernel cache loads only files nobody else could have written: planted libraries are rebuilt or
passed over, never returned. A stand-in compiler (a shell script writing a marker) keeps these fast."""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

import pytest

from gpt2serve.engine import kernel_cache

FLAGS = ("-O2",)
NOBODY = 65534
ROOT_ONLY = "needs root, to give a file to another user (runs where the suite runs as root, as in CI)"


@pytest.fixture
def cc(tmp_path: Path) -> str:
    script = tmp_path / "fake-cc"
    script.write_text('#!/bin/sh\nwhile [ "$1" != "-o" ]; do shift; done\necho built > "$2"\n')
    script.chmod(0o755)
    return str(script)


@pytest.fixture
def sources(tmp_path: Path) -> tuple[Path, ...]:
    source = tmp_path / "k.c"
    source.write_text("int f(void) { return 1; }\n")
    return (source,)


def _cache(tmp_path: Path, mode: int, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "cache"
    folder.mkdir()
    folder.chmod(mode)
    monkeypatch.setenv("GPT2SERVE_CACHE_DIR", str(folder))
    return folder


def _plant(folder: Path, cc: str, sources: tuple[Path, ...], mode: int = 0o755) -> Path:
    planted = folder / f"kernels-{kernel_cache._key(cc, FLAGS, sources)}.so"
    planted.write_text("planted")
    planted.chmod(mode)
    return planted


def test_builds_into_the_cache_and_reuses_its_own_build(tmp_path, monkeypatch, cc, sources) -> None:
    folder = _cache(tmp_path, 0o700, monkeypatch)
    built = kernel_cache.build(cc, FLAGS, sources)
    assert built.parent == folder and built.read_text() == "built\n"
    assert stat.S_IMODE(built.stat().st_mode) & 0o022 == 0
    built.write_text("built\nkept")  # a trusted cached file is loaded as it is, not rebuilt
    assert kernel_cache.build(cc, FLAGS, sources).read_text() == "built\nkept"


def test_a_world_writable_cached_file_is_rebuilt(tmp_path, monkeypatch, cc, sources) -> None:
    folder = _cache(tmp_path, 0o755, monkeypatch)
    planted = _plant(folder, cc, sources, mode=0o666)
    built = kernel_cache.build(cc, FLAGS, sources)
    assert built == planted and built.read_text() == "built\n"


def test_a_symlink_is_not_followed(tmp_path, monkeypatch, cc, sources) -> None:
    folder = _cache(tmp_path, 0o755, monkeypatch)
    elsewhere = tmp_path / "evil.so"
    elsewhere.write_text("planted")
    (folder / f"kernels-{kernel_cache._key(cc, FLAGS, sources)}.so").symlink_to(elsewhere)
    assert kernel_cache.build(cc, FLAGS, sources).read_text() == "built\n"
    assert elsewhere.read_text() == "planted"


@pytest.mark.parametrize("mode", [0o777, 0o1777, 0o775])
def test_a_shared_cache_dir_is_passed_over_for_a_private_one(tmp_path, monkeypatch, cc, sources, mode):
    folder = _cache(tmp_path, mode, monkeypatch)
    planted = _plant(folder, cc, sources)
    built = kernel_cache.build(cc, FLAGS, sources)
    assert built.parent != folder and built.read_text() == "built\n"
    assert planted.read_text() == "planted"
    assert stat.S_IMODE(built.parent.stat().st_mode) == 0o700
    assert built.parent.name.startswith("gpt2serve-kernels-") and built.parent.name != "gpt2serve-kernels-"


@pytest.mark.skipif(os.getuid() != 0, reason=ROOT_ONLY)
def test_a_file_of_another_user_is_rebuilt(tmp_path, monkeypatch, cc, sources) -> None:
    folder = _cache(tmp_path, 0o755, monkeypatch)
    planted = _plant(folder, cc, sources, mode=0o644)
    os.chown(planted, NOBODY, NOBODY)
    built = kernel_cache.build(cc, FLAGS, sources)
    assert built.read_text() == "built\n" and built.stat().st_uid == os.getuid()


@pytest.mark.skipif(os.getuid() != 0, reason=ROOT_ONLY)
def test_a_dir_of_another_user_is_passed_over(tmp_path, monkeypatch, cc, sources) -> None:
    folder = _cache(tmp_path, 0o755, monkeypatch)
    planted = _plant(folder, cc, sources)
    os.chown(folder, NOBODY, NOBODY)
    os.chown(planted, NOBODY, NOBODY)
    built = kernel_cache.build(cc, FLAGS, sources)
    assert built.parent != folder and built.read_text() == "built\n"


def test_no_predictable_path_in_the_temporary_directory(monkeypatch) -> None:
    monkeypatch.delenv("GPT2SERVE_CACHE_DIR", raising=False)
    assert all(not str(d).startswith(tempfile.gettempdir()) for d in kernel_cache._cache_dirs())
