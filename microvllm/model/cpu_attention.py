"""CPU attention: decodes read the paged cache in place through a small C kernel.

A decode's attention is bound by memory traffic: SDPA over the paged cache first
gathers every visible key and value into a padded copy, then reads that copy (twice,
where the gathered layout is not the one its kernel wants). `paged_decode.c` reads each
key and value once, where it lies, so a decode step's attention costs a fraction of
that. Prefill chunks do enough arithmetic per key that the gather does not matter;
they stay on SDPA.

The kernel is built on first use with the system C compiler (`CC`, else `cc`) for this
CPU, cached under `~/.cache/microvllm` (or `MICROVLLM_CACHE`) by a hash of the source,
flags and CPU, and called through ctypes, which releases the GIL, so a batch is split
across torch's thread count. Where no compiler is found or the build fails,
`load_kernel()` is None and the `auto` backend stays on SDPA.
"""

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path

import torch

from .attention import SdpaPagedAttention

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("paged_decode.c")
# -fopenmp-simd vectorises the kernel's loops without pulling in an OpenMP runtime
FLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-fPIC", "-shared")
_ARGTYPES = [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 8 + [ctypes.c_float, ctypes.c_int]
# the cache dtypes the kernel reads (it computes in float32)
KERNEL_DTYPES = (torch.float32, torch.bfloat16)


def _cache_dir() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "microvllm"
    return Path(os.environ.get("MICROVLLM_CACHE", default))


def _cpu_signature() -> str:
    # -march=native code may not run on another CPU: a cache shared between machines keys on it
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next((line for line in cpuinfo if line.startswith("flags")), "")
    except OSError:
        return platform.processor()


def _build(compiler: str, path: Path) -> bool:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        built = Path(tmp) / path.name
        done = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(built), "-lm"],
                              capture_output=True, text=True)
        if done.returncode:
            logger.warning(f"building the CPU decode attention kernel failed, using SDPA "
                           f"instead:\n{done.stderr[-2000:]}")
            return False
        os.replace(built, path)  # atomic: a process building beside us never sees half a file
    return True


@cache
def load_kernel():
    """The C decode kernel as a ctypes function, or None where it cannot be built."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        logger.info("no C compiler found: CPU decode attention uses SDPA")
        return None
    key = hashlib.sha256(b"\0".join([SOURCE.read_bytes(), " ".join((compiler, *FLAGS)).encode(),
                                     _cpu_signature().encode()])).hexdigest()[:16]
    path = _cache_dir() / f"paged_decode_{key}.so"
    try:
        if not path.exists() and not _build(compiler, path):
            return None
        kernel = ctypes.CDLL(str(path)).paged_decode_attention
    except (OSError, AttributeError) as error:  # no compiler there, an unwritable cache, a bad library
        logger.warning(f"the CPU decode attention kernel is unavailable ({error}), using SDPA instead")
        return None
    kernel.argtypes, kernel.restype = _ARGTYPES, ctypes.c_int
    return kernel


@cache
def _thread_pool(num_threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(num_threads, thread_name_prefix="microvllm-attention")


def _split(context_lens: list[int], parts: int) -> list[tuple[int, int]]:
    """Consecutive sequence ranges with about equal numbers of keys."""
    if parts == 1:
        return [(0, len(context_lens))]
    total, bounds, running = sum(context_lens), [0], 0
    for i, n in enumerate(context_lens):
        running += n
        if running * parts >= total * len(bounds) and len(bounds) < parts:
            bounds.append(i + 1)
    if bounds[-1] != len(context_lens):
        bounds.append(len(context_lens))
    return list(zip(bounds, bounds[1:]))


class CpuPagedAttention:
    """The step's leading single-token sequences (decodes, and prompts whose last chunk
    is one token) go through the kernel; the prefill chunks after them through SDPA."""

    # below this many keys in a step, one thread is quicker than handing work out
    MIN_KEYS_PER_THREAD = 4096

    def __init__(self, view):
        self.view = view
        query_lens = view.query_lens
        self.num_decodes = next((i for i, n in enumerate(query_lens) if n != 1), len(query_lens))
        self.prefill = SdpaPagedAttention(view, self.num_decodes) if self.num_decodes < len(query_lens) else None
        if self.num_decodes:
            decode_lens = view.context_lens[:self.num_decodes]
            self.context_lens = torch.tensor(decode_lens, dtype=torch.int64)
            self.block_tables = view.block_tables[:self.num_decodes].to(torch.int64).contiguous()
            parts = min(torch.get_num_threads(), max(1, sum(decode_lens) // self.MIN_KEYS_PER_THREAD))
            self.ranges = _split(decode_lens, parts)

    def __call__(self, layer_idx, q, k, v, window):
        if not self.num_decodes:
            return self.prefill(layer_idx, q, k, v, window)
        self.view.write(layer_idx, k, v)
        q = q.contiguous()
        out = torch.empty_like(q)
        self._decode(layer_idx, q, out, window)
        if self.prefill:
            self.prefill.attend(layer_idx, q, window, out)
        return out

    def _decode(self, layer_idx, q, out, window):
        cache, (_, n_head, head_dim) = self.view.cache, q.shape
        kernel = load_kernel()
        args = (q.data_ptr(), cache.k[layer_idx].data_ptr(), cache.v[layer_idx].data_ptr(),
                self.block_tables.data_ptr(), self.context_lens.data_ptr(), out.data_ptr())
        shape = (self.block_tables.shape[1], n_head, cache.k.shape[3], head_dim, cache.block_size,
                 -1 if window is None else window, head_dim ** -0.5, int(q.dtype == torch.bfloat16))
        call = lambda first, end: kernel(*args, first, end, *shape)
        if len(self.ranges) == 1:
            results = [call(*self.ranges[0])]
        else:
            results = list(_thread_pool(torch.get_num_threads()).map(lambda r: call(*r), self.ranges))
        if any(results):
            raise MemoryError("the CPU decode attention kernel could not allocate its scratch memory")
