"""The probe that tells whether the process keeps freed memory, in fresh processes whose
allocator settings are known, and the chunk policy that reads it."""

import os
import platform
import subprocess
import sys

import pytest
import torch

from simexplain.engine import chunking, default_chunk_size

glibc_only = pytest.mark.skipif(
    sys.platform != "linux" or platform.libc_ver()[0] != "glibc",
    reason="the settings these tests set are glibc's",
)

PROBE = "from simexplain.engine._allocator import freed_memory_is_retained as f; print(f())"
RETAIN = (  # what benchmarks/_measure.retain_freed_memory does
    "import ctypes; libc = ctypes.CDLL('libc.so.6'); "
    "assert libc.mallopt(-4, 0) and libc.mallopt(-1, -1); "
)


def probe(code: str, **env: str) -> str:
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith("MALLOC_") and k != "LD_PRELOAD"}
    out = subprocess.run([sys.executable, "-c", code + PROBE], env={**clean, **env},
                         capture_output=True, text=True, timeout=120, check=True)
    return out.stdout.strip()


@glibc_only
def test_glibc_defaults_give_freed_blocks_back():
    assert probe("") == "False"


@glibc_only
def test_mallopt_keeps_freed_blocks():
    assert probe(RETAIN) == "True"


@glibc_only
def test_malloc_environment_settings_keep_freed_blocks():
    gib = str(1 << 30)
    assert probe("", MALLOC_MMAP_THRESHOLD_=gib, MALLOC_TRIM_THRESHOLD_=gib) == "True"


LIBS = "/usr/lib/x86_64-linux-gnu/"


@glibc_only
@pytest.mark.parametrize("library, conf, expected", [
    ("libtcmalloc_minimal.so.4", None, "True"),
    ("libjemalloc.so.2", None, "False"),  # its defaults purge blocks above 8 MiB at once
    ("libjemalloc.so.2", "dirty_decay_ms:-1,muzzy_decay_ms:-1", "True"),
])
def test_preloaded_allocators(library, conf, expected):
    if not os.path.exists(LIBS + library):
        pytest.skip(f"{library} is not installed (Debian: libtcmalloc-minimal4, libjemalloc2)")
    env = {"LD_PRELOAD": LIBS + library, **({"MALLOC_CONF": conf} if conf else {})}
    assert probe("", **env) == expected


def _slots(batch: int, size: int = 224) -> list:
    return [torch.empty(1, 3, size, size).expand(batch, -1, -1, -1)] * 3


def test_pixels_per_pass_follow_the_probe(monkeypatch):
    monkeypatch.setattr(chunking, "freed_memory_is_retained", lambda: True)
    assert chunking.cpu_pixels_per_pass() == chunking.CPU_PIXELS_PER_PASS_RETAINED
    assert default_chunk_size(_slots(8), 8) == 8
    monkeypatch.setattr(chunking, "freed_memory_is_retained", lambda: False)
    assert chunking.cpu_pixels_per_pass() == chunking.CPU_PIXELS_PER_PASS
    assert default_chunk_size(_slots(8), 8) == 2


def test_one_pass_calls_do_not_probe(monkeypatch):
    def fail():
        raise AssertionError("probed for a call that fits one pass either way")

    monkeypatch.setattr(chunking, "freed_memory_is_retained", fail)
    assert default_chunk_size(_slots(2), 2) == 2
    assert default_chunk_size(_slots(32, 32), 32) == 32
    assert default_chunk_size(_slots(8), 8, retained=False) == 2


@pytest.mark.parametrize("retained, size, expected", [
    (False, 224, 6), (True, 224, 24), (False, 64, 64), (True, 64, 64), (True, 1024, 1),
])
def test_black_box_batches_follow_the_probe(monkeypatch, retained, size, expected):
    from simexplain.methods.blackbox.runner import default_batch_size

    monkeypatch.setattr(chunking, "freed_memory_is_retained", lambda: retained)
    assert default_batch_size(torch.empty(1, 3, size, size)) == expected
