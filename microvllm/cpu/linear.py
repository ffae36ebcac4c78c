"""Linear layers on the CPU with their weights packed once, at load, for oneDNN.

bfloat16: torch's `F.linear` hands oneDNN the weight in its plain layout, and oneDNN
reorders it into the blocked layout its AMX / AVX-512 BF16 kernels read on every call:
at decode, with a few dozen rows, that reorder is most of the matmul. Packing each
weight into that layout once removes it; the arithmetic is the same, so are the outputs.
Only where the CPU has bfloat16 instructions (avx512_bf16 or amx_bf16): elsewhere oneDNN
has no bfloat16 kernels to pack for.

float32: `F.linear` calls MKL's sgemm, whose result for a row changes with the number of
rows beside it (a one-row product takes another kernel, and larger ones block the rows
differently), so a request's greedy tokens could depend on its batch. oneDNN's packed
float32 kernel gives a row the same bits at every padded row count, and from 384 wide up
it is faster where an engine spends its time: decode batches of 8 rows and more, the LM
head, prefill chunks (measured in docs/performance.md, "Packed float32 linears"). Its
sums are ordered differently from sgemm's: outputs differ from `F.linear`'s by float32
rounding (~1e-6). Fewer than 8 rows, and narrow layers, run slower packed than through
sgemm: the price of the invariance.

oneDNN builds and keeps a kernel per distinct row count, and every step's token count
is a new row count: a long-running process would grow without bound. So the rows are
padded to one of a few sizes (`padded_rows`), and the kernels, with the memory they
hold, reach a plateau. (Splitting a large batch into a multiple of a few hundred rows
and a padded rest computes fewer rows, but joining the two outputs costs as much.)
"""

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..arithmetic import cdiv
from .kernels import cpu_flags

# the row count oneDNN tunes the packed layout for: decode batches (any count works)
ROWS_HINT = 64


def padded_rows(rows: int) -> int:
    """`rows` rounded up to a multiple of 8, and above 64 to one of 8 sizes per octave:
    at most 64 sizes up to 8,192 rows, at most 12.5% of padding above 64 rows (below,
    the matmul reads weights more than rows, so the padding is nearly free)."""
    granule = max(8, 1 << max(0, (rows - 1).bit_length() - 4))
    return cdiv(rows, granule) * granule


@functools.cache
def native_bfloat16() -> bool:
    """Whether this CPU computes in bfloat16 natively (AVX-512 BF16 or AMX)."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags()) and torch.backends.mkldnn.is_available()


def packs_linears(dtype: torch.dtype) -> bool:
    """Whether this CPU's linear layers of `dtype` run packed: float32 wherever oneDNN is
    built in, bfloat16 where the CPU computes in it natively."""
    if dtype is torch.bfloat16:
        return native_bfloat16()
    return dtype is torch.float32 and torch.backends.mkldnn.is_available()


class PackedLinear(nn.Module):
    """y = x @ weight.T with the weight in oneDNN's blocked layout (no bias: nanochat has none)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), ROWS_HINT)

    def load_weight(self, weight: torch.Tensor) -> None:
        """Pack a new [out, in] weight into the existing packed buffer, in place."""
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.to("cpu", self.packed_weight.dtype), ROWS_HINT)
        self.packed_weight.copy_(packed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        padding = padded_rows(rows) - rows
        if padding:
            return torch.ops.mkldnn._linear_pointwise(F.pad(x, (0, 0, 0, padding)), self.packed_weight,
                                                      None, "none", [], "")[:rows]
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, None, "none", [], "")


def pack_linears(model: nn.Module) -> int:
    """Swap every bias-free nn.Linear of `model` whose dtype `packs_linears` for a PackedLinear;
    returns how many."""
    swapped = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and child.bias is None and packs_linears(child.weight.dtype):
                setattr(module, name, PackedLinear(child))
                swapped += 1
    return swapped
