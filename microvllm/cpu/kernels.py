"""microvllm's C kernels for the CPU: built on first use, cached, called through ctypes.

Three sources make one library: `paged_attention.c` (attention of decodes and short
query chunks over the paged KV cache, used by the `cpu` attention backend),
`fused_ops.c` (the forward's RMSNorm and rotary embedding in one pass each, used by
`CpuOps`) and `sampling_noise.c` (the sampler's noise, used by the CPU platform). All are plain C with no torch headers: the
system compiler (`CC`, else `cc`) builds them for this CPU in about a second, into
`~/.cache/microvllm` (or `MICROVLLM_CACHE`) under a hash of the sources, flags and CPU,
so later processes only load the file. ctypes releases the GIL around
each call, which lets the attention kernel split a batch across threads.

Where no compiler is found or the build fails, `load_library()` is None and the engine
stays on plain torch ops (SDPA attention, torch norms): slower, never wrong.
"""

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

HERE = Path(__file__).parent
SOURCES = (HERE / "paged_attention.c", HERE / "fused_ops.c", HERE / "sampling_noise.c")
HEADERS = (HERE / "bf16.h",)
# -fopenmp-simd vectorises the kernels' loops without pulling in an OpenMP runtime
FLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-fPIC", "-shared")
# the dtypes the kernels read and write (they compute in float32)
KERNEL_DTYPES = (torch.float32, torch.bfloat16)

_pointer, _int, _float = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
SIGNATURES = {  # name: argument types; every kernel returns an int, 0 on success
    "paged_attention": [_pointer] * 6 + [_int] * 8 + [_float, ctypes.c_int],
    "rms_norm": [_pointer, _pointer, _int, _int, _int, _float, ctypes.c_int],
    "rotary_rms_norm": [_pointer, _int, _pointer, _pointer, _pointer, _pointer,
                        _int, _int, _int, _float, _float, ctypes.c_int],
    "scatter_rows": [_pointer, _int, _pointer, _pointer, _int, _int],
    "relu_squared": [_pointer, _int, ctypes.c_int],
    "uniform_noise": [_pointer] * 3 + [_int] * 3 + [_pointer],
}


def _cache_dir() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "microvllm"
    return Path(os.environ.get("MICROVLLM_CACHE", default))


@cache
def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux's /proc/cpuinfo), empty where they cannot be read."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return set(next((line for line in cpuinfo if line.startswith("flags")), "").split()[2:])
    except OSError:
        return set()


def _cpu_signature() -> str:
    # -march=native code may not run on another CPU: a cache shared between machines keys on it
    return " ".join(sorted(cpu_flags())) or platform.processor()


def _build(compiler: str, path: Path) -> bool:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        built = Path(tmp) / path.name
        done = subprocess.run([compiler, *FLAGS, *map(str, SOURCES), "-o", str(built), "-lm"],
                              capture_output=True, text=True)
        if done.returncode:
            logger.warning(f"building microvllm's CPU kernels failed, using torch ops instead:\n"
                           f"{done.stderr[-2000:]}")
            return False
        os.replace(built, path)  # atomic: a process building beside us never sees half a file
    return True


@cache
def load_library():
    """The built kernels as a ctypes library, or None where they cannot be had."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        logger.info("no C compiler found: the CPU runs torch ops only")
        return None
    parts = [path.read_bytes() for path in (*SOURCES, *HEADERS)]
    parts += [" ".join((compiler, *FLAGS)).encode(), _cpu_signature().encode()]
    key = hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]
    path = _cache_dir() / f"cpu_kernels_{key}.so"
    try:
        if not path.exists() and not _build(compiler, path):
            return None
        library = ctypes.CDLL(str(path))
        for name, argtypes in SIGNATURES.items():
            function = getattr(library, name)
            function.argtypes, function.restype = argtypes, ctypes.c_int
    except (OSError, AttributeError) as error:  # no compiler there, an unwritable cache, a bad library
        logger.warning(f"microvllm's CPU kernels are unavailable ({error}), using torch ops instead")
        return None
    return library


def available(dtype: torch.dtype) -> bool:
    return dtype in KERNEL_DTYPES and load_library() is not None
