"""One bit per element, in numpy.packbits layout (big-endian bits, zero-padded last byte).

Pure torch so that packing and counting run where the mask lives (CPU or GPU). The padding
bits of the last byte are always 0, so popcounts never see elements that do not exist.
"""
import torch

_SHIFTS = torch.arange(7, -1, -1, dtype=torch.uint8)  # bit 0 of a byte is its MSB
_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.uint8)
_ON_DEVICE: dict = {}


def _shifts(device) -> torch.Tensor:
    """The shift table on `device`, copied there once (not a host-to-device copy per call)."""
    key = str(device)
    if key not in _ON_DEVICE:
        _ON_DEVICE[key] = _SHIFTS.to(device)
    return _ON_DEVICE[key]


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """1-D bool -> uint8[ceil(n/8)], equal to np.packbits(mask)."""
    if mask.dim() != 1 or mask.dtype != torch.bool:
        raise ValueError(f"pack_bits expects a 1-D bool tensor, got {mask.dtype} {tuple(mask.shape)}")
    n = mask.numel()
    bits = torch.zeros((n + 7) // 8 * 8, dtype=torch.uint8, device=mask.device)
    bits[:n] = mask
    bits = bits.view(-1, 8) << _shifts(mask.device)
    return bits.sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """uint8[ceil(n/8)] -> 1-D bool of length n (inverse of pack_bits)."""
    if packed.dim() != 1 or packed.dtype != torch.uint8 or packed.numel() != (n + 7) // 8:
        raise ValueError(f"unpack_bits expects uint8[{(n + 7) // 8}] for {n} bits, "
                         f"got {packed.dtype} {tuple(packed.shape)}")
    bits = (packed.unsqueeze(1) >> _shifts(packed.device)) & 1
    return bits.view(-1)[:n].bool()


def popcount_tensor(packed: torch.Tensor) -> torch.Tensor:
    """Number of set bits as a 0-dim int64 tensor on packed's device (no host sync)."""
    return _POPCOUNT.to(packed.device)[packed.int()].sum(dtype=torch.int64)


def popcount(packed: torch.Tensor) -> int:
    """Number of set bits in a packed mask."""
    return int(popcount_tensor(packed))
