import pytest
import torch

from optimum_superweight.tensor.packing import pack_codes, packed_size, unpack_codes


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("n", [1, 7, 8, 13, 64, 576])
def test_round_trip(bits, n):
    codes = torch.randint(0, 2**bits, (3, 5, n), dtype=torch.uint8, generator=torch.Generator().manual_seed(n))
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape[-1] == packed_size(n, bits)
    assert torch.equal(unpack_codes(packed, bits, n), codes)


def test_int4_is_two_codes_per_byte_low_nibble_first():
    packed = pack_codes(torch.tensor([1, 2, 3, 4, 5, 6, 7, 8], dtype=torch.uint8), 4)
    assert packed.tolist() == [0x21, 0x43, 0x65, 0x87]


def test_wrong_size_is_rejected():
    with pytest.raises(ValueError, match="need 4"):
        unpack_codes(torch.zeros(3, dtype=torch.uint8), 4, 8)
