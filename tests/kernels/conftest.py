"""Every kernel test starts from the kernel settings the environment gives (the float32 policy, the dense threshold,
the reference-only switch) and leaves the process's settings as it found them: they are process-wide, so one test's
change, or one leaked by a test elsewhere, would otherwise decide what a later test's layers run."""

from __future__ import annotations

import pytest

from optimum_superweight import kernels

_KEYS = ("float32", "threshold", "reference_only")


def _set(values: dict) -> None:
    if any(kernels._settings[key] != values[key] for key in _KEYS):
        kernels._settings.update({key: values[key] for key in _KEYS})
        kernels._settings["generation"] += 1  # cached selections were made under other settings


@pytest.fixture(autouse=True)
def _kernel_settings_from_the_environment():
    saved = {key: kernels._settings[key] for key in _KEYS}
    _set({"float32": kernels._env_policy(), "threshold": kernels._env_threshold(),
          "reference_only": kernels._env_reference_only()})
    yield
    _set(saved)
