"""herd.worker.cpu_malloc: glibc's malloc thresholds set for CPU decode, nothing done elsewhere."""

from __future__ import annotations

import ctypes
import platform

import pytest

from herd.worker import cpu_malloc


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_thresholds_are_set_on_glibc() -> None:
    assert cpu_malloc.keep_freed_memory()


def test_a_c_library_without_mallopt_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    class NoMallopt:
        def __init__(self, name: str | None) -> None:
            pass

    monkeypatch.setattr(ctypes, "CDLL", NoMallopt)
    assert not cpu_malloc.keep_freed_memory()
