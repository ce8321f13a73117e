"""The compile-on-first-use path (``zenith_fused/_ext.py``) says "compiling" only when it compiles.

A library of one C++ function and one header stands in for the kernels (it builds in about a
second; the kernels take minutes): it goes through the same loader, ``_ext._load_library``, in fresh
processes that share one ``TORCH_EXTENSIONS_DIR``, as separate Python processes share torch's cache.
A reinstall writes the same sources again as new files; that must not compile either.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

_CHILD = r"""
import sys
from zenith_fused import _ext
_ext._load_library("zenith_fused_probe", sys.argv[1], ["probe.cpp"], cflags=["-O1"], cuda_cflags=[], ldflags=[],
                   what="the probe library")
"""
_MESSAGE = "zenith_fused: compiling the probe library (once, 1-3 minutes; torch caches the build in "


def _load_in_new_process(source, cache):
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(cache)}
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(source.parent)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stderr


@pytest.fixture
def probe(tmp_path):
    (tmp_path / "src").mkdir()
    source = tmp_path / "src" / "probe.cpp"
    source.write_text('#include "probe.h"\nextern "C" int zenith_fused_probe() { return PROBE_VALUE; }\n')
    (tmp_path / "src" / "probe.h").write_text("#define PROBE_VALUE 1\n")
    return source, tmp_path / "cache"


def test_the_first_load_says_it_compiles_and_a_cached_load_prints_nothing(probe):
    source, cache = probe
    first = _load_in_new_process(source, cache)
    assert first.startswith(_MESSAGE) and first.count("\n") == 1, first
    assert str(cache / "zenith_fused_probe") in first
    assert _load_in_new_process(source, cache) == ""


def test_a_changed_header_is_compiled_and_said_again(probe):
    source, cache = probe
    _load_in_new_process(source, cache)
    (source.parent / "probe.h").write_text("#define PROBE_VALUE 2\n")
    assert _load_in_new_process(source, cache).startswith(_MESSAGE)
    assert _load_in_new_process(source, cache) == ""


def test_sources_written_again_unchanged_are_not_compiled_again(probe):
    # What a reinstall does: the same bytes in new files, with new modification times.
    source, cache = probe
    _load_in_new_process(source, cache)
    for path in source.parent.iterdir():
        data = path.read_bytes()
        path.unlink()
        path.write_bytes(data)
        os.utime(path, (path.stat().st_atime + 60, path.stat().st_mtime + 60))
    assert _load_in_new_process(source, cache) == ""
