"""The CLI's glibc settings (:func:`dorafit.cli.return_large_blocks`): mallopt with a 64 KiB mapping threshold and
a 4 MiB trim threshold, unless the user set glibc's own variables; nothing on another C library."""

from __future__ import annotations

import ctypes

from dorafit import cli


class FakeLibc:
    def __init__(self, glibc: bool = True):
        self.calls = []
        self.mallopt = lambda param, value: self.calls.append((param, value)) or 1
        if glibc:
            self.gnu_get_libc_version = lambda: b"2.36"


def test_sets_both_thresholds_on_glibc(monkeypatch):
    libc = FakeLibc()
    monkeypatch.setattr(ctypes, "CDLL", lambda name: libc)
    for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES"):
        monkeypatch.delenv(name, raising=False)
    cli.return_large_blocks()
    assert libc.calls == [(cli.M_MMAP_THRESHOLD, 64 << 10), (cli.M_TRIM_THRESHOLD, 4 << 20)]


def test_leaves_the_users_settings_and_other_c_libraries_alone(monkeypatch):
    libc = FakeLibc()
    monkeypatch.setattr(ctypes, "CDLL", lambda name: libc)
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    cli.return_large_blocks()
    assert libc.calls == []
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    other = FakeLibc(glibc=False)
    monkeypatch.setattr(ctypes, "CDLL", lambda name: other)
    cli.return_large_blocks()
    assert other.calls == []
