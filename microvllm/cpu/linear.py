"""bfloat16 linear layers on CPUs with native bfloat16: weights packed once, at load.

torch's bfloat16 `F.linear` on the CPU hands oneDNN the weight in its plain layout, and
oneDNN reorders it into the blocked layout its AMX / AVX-512 BF16 kernels read on every
call: at decode, with a few dozen rows, that reorder is most of the matmul. Packing each
weight into that layout once removes it (measured in docs/performance.md, "The CPU
kernels"). The arithmetic is the same, so are the outputs.

Only where the CPU has bfloat16 instructions (avx512_bf16 or amx_bf16): elsewhere
oneDNN has no bfloat16 kernels to pack for.

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


class PackedLinear(nn.Module):
    """y = x @ weight.T with the weight in oneDNN's blocked layout (no bias: nanochat has none)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), ROWS_HINT)

    def load_weight(self, weight: torch.Tensor) -> None:
        """Pack a new [out, in] weight into the existing packed buffer, in place."""
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.to("cpu", torch.bfloat16), ROWS_HINT)
        self.packed_weight.copy_(packed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        padding = padded_rows(rows) - rows
        if padding:
            return torch.ops.mkldnn._linear_pointwise(F.pad(x, (0, 0, 0, padding)), self.packed_weight,
                                                      None, "none", [], "")[:rows]
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, None, "none", [], "")


def pack_linears(model: nn.Module) -> int:
    """Swap every bias-free bfloat16 nn.Linear of `model` for a PackedLinear; returns how many."""
    swapped = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and child.bias is None and child.weight.dtype == torch.bfloat16:
                setattr(module, name, PackedLinear(child))
                swapped += 1
    return swapped
