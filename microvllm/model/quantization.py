"""Weight quantization at load time: every nn.Linear becomes an int8 or fp8 twin.

The loader calls `quantize_linears(model, quantization)` once the checkpoint's weights
sit on their device in the engine dtype; the forward code stays the same, since the
twins are drop-in modules with the Linear's call signature. Walking the modules (rather
than naming layers) keeps this working whatever linears the model has, fused or not.

Both schemes are symmetric with one scale per output channel (a row of the weight), so
`w[n, :] ~= q[n, :] * scale[n]` and the scale comes out of the matmul as a column
multiply. Embeddings stay in the engine dtype: they are row lookups, not matmuls, and a
lookup reads one row per token, so shrinking them saves memory but no time.

- int8: weight-only; activations stay in the engine dtype. With 16-bit activations on
  CPU, torch's `_weight_int8pack_mm` fuses the widening into the matmul and beats a
  bfloat16 F.linear several times over. With float32 activations that op is 30-60x
  slower than a float32 F.linear on CPU, and on CUDA it is a naive one-thread-per-
  output kernel, so there each call widens the int8 weight to the activation dtype and
  runs the BLAS matmul: the memory saving holds, the time does not shrink.
  (`python -m benchmarks.quantization --only kernels` measures these.)
- fp8: e4m3 weights, and each step's activations quantized per row to e4m3 on the fly,
  multiplied by `torch._scaled_mm` with row-wise scales. Needs a CUDA GPU of compute
  capability 8.9 or newer (Ada, Hopper). `_scaled_mm` wants both dims divisible by 16;
  the few linears that are not (nanochat's tiny gates) keep their 16/32-bit weights.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..validation import check_choice

QUANTIZATIONS = ("int8", "fp8")
INT8_MAX = 127
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448
FP8_MIN_CAPABILITY = (8, 9)
SCALED_MM_DIM_MULTIPLE = 16


def _row_scales(weight: torch.Tensor, qmax: float) -> torch.Tensor:
    # an all-zero row would get scale 0 and divide by it; any positive scale keeps it zero
    amax = weight.abs().amax(dim=-1).float()
    return torch.where(amax > 0, amax / qmax, torch.ones_like(amax))


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight [N, K], float32 scales [N]); each element is off by at most scale/2."""
    scales = _row_scales(weight, INT8_MAX)
    q = torch.round(weight.float() / scales[:, None]).clamp_(-INT8_MAX, INT8_MAX)
    return q.to(torch.int8), scales


def quantize_fp8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 weight [N, K], float32 scales [N]); the row's largest magnitude maps to 448."""
    scales = _row_scales(weight, FP8_MAX)
    # e4m3fn has no infinity: a quotient a rounding error above 448 must not become NaN
    return (weight.float() / scales[:, None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scales


def dequantize(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return q.float() * scales.float()[:, None]


class _QuantizedLinear(nn.Module):
    """What both quantized twins share: a bias-free nn.Linear's shape, and its repr."""
    kind = ""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        if linear.bias is not None:
            raise ValueError(f"{self.kind} quantization covers bias-free linears only (nanochat has no biases)")
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.kind} per-channel"


class Int8Linear(_QuantizedLinear):
    """y = x @ (q * scale).T with q int8, for activations in the engine dtype."""
    kind = "int8"

    def __init__(self, linear: nn.Linear):
        super().__init__(linear)
        q, scales = quantize_int8(linear.weight.detach())
        self.register_buffer("weight", q)
        # _weight_int8pack_mm wants the scales in the activations' dtype
        self.register_buffer("scales", scales.to(linear.weight.dtype))

    def load_weight(self, weight: torch.Tensor) -> None:
        """Quantize a new [out, in] weight into the existing buffers, in place (CUDA graphs
        replay these addresses); quantized from the engine dtype, as at load."""
        q, scales = quantize_int8(weight.to(self.weight.device, self.scales.dtype))
        self.weight.copy_(q)
        self.scales.copy_(scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        # torch's CPU int8 kernel reads rows 16 values at a time: other widths crash it
        # (a segfault in torch 2.13 with bfloat16 on AVX-512, e.g. a 12-channel ve_gate)
        if rows.device.type == "cpu" and rows.dtype != torch.float32 and self.in_features % 16 == 0:
            y = torch.ops.aten._weight_int8pack_mm(rows.contiguous(), self.weight, self.scales)
        else:
            y = F.linear(rows, self.weight.to(rows.dtype)) * self.scales
        return y.view(*x.shape[:-1], self.out_features)


class Fp8Linear(_QuantizedLinear):
    """y = (x_fp8 * x_scale) @ (w_fp8 * w_scale).T through torch._scaled_mm."""
    kind = "fp8"

    def __init__(self, linear: nn.Linear):
        super().__init__(linear)
        q, scales = quantize_fp8(linear.weight.detach())
        self.register_buffer("weight", q)
        self.register_buffer("scales", scales[None, :])  # [1, N] float32: row-wise scaling
        self.out_dtype = linear.weight.dtype

    def load_weight(self, weight: torch.Tensor) -> None:
        """Quantize a new [out, in] weight into the existing buffers, in place (CUDA graphs
        replay these addresses); quantized from the engine dtype, as at load."""
        q, scales = quantize_fp8(weight.to(self.weight.device, self.out_dtype))
        self.weight.copy_(q)
        self.scales.copy_(scales[None, :])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        x_fp8, x_scales = quantize_fp8(rows)  # one scale per token
        # mat2 must be column-major: the transpose of the row-major [N, K] weight is
        y = torch._scaled_mm(x_fp8, self.weight.t(), scale_a=x_scales[:, None], scale_b=self.scales,
                             out_dtype=self.out_dtype)
        return y.view(*x.shape[:-1], self.out_features)


def check_fp8_supported(device: torch.device) -> None:
    if device.type != "cuda":
        found = f"the engine runs on {device.type}"
    else:
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) >= FP8_MIN_CAPABILITY:
            return
        found = f"{torch.cuda.get_device_name(device)} is {major}.{minor}"
    raise ValueError("quantization='fp8' needs a CUDA GPU of compute capability 8.9 or newer "
                     f"(Ada, Hopper) for torch._scaled_mm; {found}. quantization='int8' runs anywhere.")


def _fp8_fits(linear: nn.Linear) -> bool:
    return (linear.in_features % SCALED_MM_DIM_MULTIPLE == 0
            and linear.out_features % SCALED_MM_DIM_MULTIPLE == 0)


def quantize_linears(model: nn.Module, quantization: str) -> nn.Module:
    """Replaces the model's nn.Linear modules in place by their `quantization` twins."""
    check_choice("quantization", quantization, QUANTIZATIONS)
    linears = [(parent, name, child) for parent in model.modules()
               for name, child in parent.named_children() if isinstance(child, nn.Linear)]
    if quantization == "fp8" and linears:
        check_fp8_supported(linears[0][2].weight.device)
    for parent, name, linear in linears:
        if quantization == "int8":
            setattr(parent, name, Int8Linear(linear))
        elif _fp8_fits(linear):
            setattr(parent, name, Fp8Linear(linear))
    return model
