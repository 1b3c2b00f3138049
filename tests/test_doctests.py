"""Every ``>>>`` example in the package runs in the suite, and every one is found.

Run per module with the standard library's doctest runner (ELLIPSIS and NORMALIZE_WHITESPACE on, torch seeded
before each docstring), so outputs must not depend on the CPU: examples whose result depends on the kernels a
CPU supports state what every x86 CPU gives (e.g. ``... in ({'cpu-tiled': 1}, {'cpu-dense': 1})``). Examples
that need the Hub, a network or a user's folder carry ``# doctest: +SKIP``.
"""

from __future__ import annotations

import doctest
import importlib
import io
import re
from pathlib import Path

import pytest
import torch

import optimum_superweight

PACKAGE = Path(optimum_superweight.__file__).parent
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
_PROMPT = re.compile(r"^\s*>>> ", re.MULTILINE)


def _modules_with_examples() -> list[str]:
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if _PROMPT.search(path.read_text(encoding="utf-8")):
            parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
            names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


MODULES = _modules_with_examples()


def _global_settings() -> dict:
    """Process-wide switches an example may flip; it must put them back (later tests rely on conftest's)."""
    from optimum_superweight.kernels import float32_policy
    from optimum_superweight.kernels.build import native_kernels_enabled
    from optimum_superweight.kernels.fused import fused_quantization_enabled
    from optimum_superweight.kernels.guard import speed_check_enabled

    return {"float32_policy": float32_policy(), "native": native_kernels_enabled(), "fused": fused_quantization_enabled(),
            "speed_check": speed_check_enabled(), "threads": torch.get_num_threads(), "grad": torch.is_grad_enabled()}


def test_the_package_has_examples_to_run():
    # A guard against the finder above silently returning nothing (a moved package, a changed layout).
    assert len(MODULES) >= 40


@pytest.mark.parametrize("name", MODULES)
def test_module_examples(name, one_thread):
    module = importlib.import_module(name)
    source = Path(module.__file__).read_text(encoding="utf-8")
    tests = doctest.DocTestFinder(exclude_empty=True).find(module, name)
    found = sum(len(test.examples) for test in tests)
    # Examples the finder cannot see (a docstring of a nested function, a comment) would never run.
    assert found == len(_PROMPT.findall(source)), f"{name}: {len(_PROMPT.findall(source))} '>>>' lines, {found} examples collected"
    before = _global_settings()
    out = io.StringIO()
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    for test in sorted(tests, key=lambda t: t.lineno or 0):
        torch.manual_seed(0)
        runner.run(test, out=out.write)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, out.getvalue()
    assert _global_settings() == before, f"{name}'s examples changed process-wide settings"
