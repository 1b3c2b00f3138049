"""Both kernel registries (weight-only and W8A8) hold kernels of one protocol."""

import pytest

from optimum_superweight import kernels
from optimum_superweight.kernels import Kernel, w8a8


@pytest.mark.parametrize("registry", [kernels._KERNELS, w8a8._W8A8_KERNELS], ids=["weight-only", "w8a8"])
def test_every_registered_kernel_implements_the_one_protocol(registry):
    assert registry, "empty registry"
    for kernel in registry:
        assert isinstance(kernel, Kernel), kernel


def test_a_kernel_missing_part_of_the_protocol_is_refused_by_both_registries():
    class NoRun:
        name = "broken"

        def unsupported(self, module, dtype, device, tokens):
            return None

        def prepare(self, module, device, dtype):
            return None

    assert not isinstance(NoRun(), Kernel)
    with pytest.raises(TypeError, match="lacks 'run'"):
        kernels.register_kernel(NoRun())
    with pytest.raises(TypeError, match="lacks 'run'"):
        w8a8.register_w8a8_kernel(NoRun())
