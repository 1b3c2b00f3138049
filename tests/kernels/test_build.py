"""The native build recovers: killed builds, damaged libraries, concurrent builds, CPUs without the features,
read-only caches and missing compilers never hang a load nor fail the user's call.

The real-process tests build a tiny pybind11 source (``probe.cpp``, a few seconds) into a temporary kernel
cache (``OPTIMUM_SUPERWEIGHT_KERNEL_CACHE``), not the package's kernel.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from optimum_superweight.kernels import build, tiled

ROOT = Path(__file__).resolve().parents[2]
PROBE = """#include <pybind11/pybind11.h>
int answer() { return 42; }
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("answer", &answer); }
"""
# Loads csrc/probe.cpp from the folder argv[1] through build.load, prints the result and the failure reason.
RUNNER = """import logging, sys
from pathlib import Path
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
from optimum_superweight.kernels import build
build.CSRC = Path(sys.argv[1])
module = build.load("probe")
print("RESULT", None if module is None else module.answer(), build.native_failure("probe"), flush=True)
"""
LOAD_TIMEOUT = 600  # a probe build on a loaded 2-core machine takes up to a minute; a hang takes forever


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("csrc")
    (folder / "probe.cpp").write_text(PROBE)
    return folder


def _env(cache: Path) -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OPTIMUM_SUPERWEIGHT_KERNEL_CACHE": str(cache),
            "TORCH_EXTENSIONS_DIR": str(cache), "OMP_NUM_THREADS": "1"}


def _start(source: Path, cache: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", RUNNER, str(source)], env=_env(cache), cwd=ROOT, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )


def _finish(process: subprocess.Popen) -> str:
    try:
        output, _ = process.communicate(timeout=LOAD_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"the load hung for {LOAD_TIMEOUT} s:\n{output}")
    return output


def _load(source: Path, cache: Path) -> str:
    output = _finish(_start(source, cache))
    assert "RESULT 42 None" in output, output
    return output


def _lines(output: str, text: str) -> list[str]:
    return [line for line in output.splitlines() if text in line]


@pytest.fixture(scope="module")
def built_cache(source, tmp_path_factory) -> Path:
    """A kernel cache holding the probe, built once (copied by the tests that damage it)."""
    cache = tmp_path_factory.mktemp("built-cache")
    _load(source, cache)
    return cache


@pytest.mark.slow
def test_a_build_killed_with_sigkill_does_not_hang_the_next_load(source, tmp_path):
    cache = tmp_path / "cache"
    building = _start(source, cache)
    deadline = time.monotonic() + LOAD_TIMEOUT
    while not list(cache.glob("optimum_superweight_probe_*/lock")):  # torch's build lock: the compiler runs
        assert building.poll() is None and time.monotonic() < deadline, building.communicate()[0]
        time.sleep(0.02)
    os.killpg(building.pid, signal.SIGKILL)  # the process and its compiler, mid-build
    building.wait()
    assert list(cache.glob("optimum_superweight_probe_*/lock")), "the killed build must leave torch's lock behind"
    output = _load(source, cache)
    assert len(_lines(output, "removed a stale kernel build lock")) == 1, output
    assert len(_lines(output, "WARNING")) == 2, output  # the stale lock, then "building"


@pytest.mark.slow
def test_a_damaged_cached_library_is_rebuilt_once(source, built_cache, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(built_cache, cache)
    (library,) = cache.glob("optimum_superweight_probe_*/*.so")
    library.write_bytes(b"\x7fELF truncated by a killed link")
    output = _load(source, cache)
    assert len(_lines(output, "failed to import")) == 1 and len(_lines(output, "WARNING")) == 1, output
    assert "RESULT 42 None" in _load(source, cache)  # and it stays rebuilt (no warning at all)


@pytest.mark.slow
def test_two_processes_loading_at_once_get_one_build(source, tmp_path):
    cache = tmp_path / "cache"
    outputs = [_finish(process) for process in [_start(source, cache), _start(source, cache)]]
    assert all("RESULT 42 None" in output for output in outputs), outputs
    assert sum(len(_lines(output, "building the native CPU kernel")) for output in outputs) == 1, outputs
    (log,) = cache.glob("optimum_superweight_probe_*/.ninja_log")
    compiles = [line for line in log.read_text().splitlines() if line.split("\t")[3:4] == ["probe.o"]]
    assert len(compiles) == 1, log.read_text()  # ninja's log: start, end, mtime, output, hash


@pytest.fixture()
def fresh(monkeypatch, tmp_path, source):
    """build.load starting from nothing, the probe as source, the cache in tmp_path."""
    monkeypatch.setattr(build, "_loaded", {})
    monkeypatch.setattr(build, "_failures", {})
    monkeypatch.setattr(build, "CSRC", source)
    monkeypatch.setenv("OPTIMUM_SUPERWEIGHT_KERNEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _never_compile(*args, **kwargs):
    raise AssertionError("the compiler was started")


def test_a_cpu_without_the_needed_features_is_not_compiled_for(fresh, monkeypatch, caplog):
    from torch.utils import cpp_extension

    monkeypatch.setattr(cpp_extension, "load", _never_compile)
    monkeypatch.setattr(build, "cpu_features", lambda: frozenset({"sse2", "avx2", "fma"}))
    with caplog.at_level(logging.WARNING, logger=build.__name__):
        assert build.load("tiled_linear", requires=tiled.CPU_FEATURES) is None
        assert build.load("tiled_linear", requires=tiled.CPU_FEATURES) is None
    reason = build.native_failure("tiled_linear")
    assert reason.startswith("this CPU lacks avx512f, avx512bw"), reason
    assert [r.getMessage() for r in caplog.records] and len(caplog.records) == 1
    assert "lacks avx512f" in caplog.records[0].getMessage()
    assert "compiler" not in caplog.records[0].getMessage()  # nothing to install: the CPU decides


def test_no_compiler_gives_one_log_line_and_the_fallback(fresh, monkeypatch, caplog):
    from torch.utils import cpp_extension

    monkeypatch.setattr(cpp_extension, "load", _never_compile)
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    with caplog.at_level(logging.INFO, logger=build.__name__):
        assert build.load("probe") is None and build.load("probe") is None
    assert len(caplog.records) == 1 and "no C++ compiler ('/nonexistent/c++' not found" in caplog.records[0].getMessage()


def _unwritable(tmp_path: Path) -> Path:
    if os.geteuid() == 0:  # root writes through permission bits: take a folder of a filesystem nobody may write
        return Path("/sys/optimum-superweight-test-cache")
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    return folder / "cache"


def test_a_read_only_cache_gives_one_log_line_and_the_fallback(fresh, monkeypatch, tmp_path, caplog):
    from torch.utils import cpp_extension

    monkeypatch.setattr(cpp_extension, "load", _never_compile)
    cache = _unwritable(tmp_path)
    monkeypatch.setenv("OPTIMUM_SUPERWEIGHT_KERNEL_CACHE", str(cache))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(cache))
    with caplog.at_level(logging.INFO, logger=build.__name__):
        assert build.load("probe") is None
    assert len(caplog.records) == 1 and "is not writable" in caplog.records[0].getMessage(), caplog.text


def test_a_lock_older_than_the_limit_is_cleared_even_if_held(tmp_path, monkeypatch, caplog):
    """torch's lock held open by a live process (here this one) but older than STALE_LOCK_SECONDS: cleared."""
    lock = tmp_path / "lock"
    handle = os.open(lock, os.O_CREAT | os.O_EXCL)
    try:
        old = time.time() - 3600
        os.utime(lock, (old, old))
        monkeypatch.setattr(build, "STALE_LOCK_SECONDS", 60)
        with caplog.at_level(logging.WARNING, logger=build.__name__):
            build._clear_stale_torch_lock(tmp_path)
    finally:
        os.close(handle)
    assert not lock.exists()
    assert len(caplog.records) == 1 and "3600 s old" in caplog.records[0].getMessage()
