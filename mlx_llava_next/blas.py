"""Put an optimized BLAS under MLX's CPU backend on Linux.

MLX's Linux CPU wheel links a reference BLAS (about 2 GFLOP/s for float32 GEMM). libmlx
resolves `cblas_sgemm` through the process's global symbol scope, so loading OpenBLAS (or
BLIS) with RTLD_GLOBAL *before* `mlx.core` is imported makes every GEMM, conv and batched
matmul run on it: 20-70x faster prefill and vision. Installing it is one package:
`apt install libopenblas0-pthread` (Debian/Ubuntu), `dnf install openblas-threads` (Fedora).
Nothing changes on macOS (Accelerate) or when no such library is found.
Set MLX_LLAVA_NEXT_BLAS=0 to keep the bundled BLAS, or to a library path to choose one.
Without one, `warn_if_reference()` says so once (on stderr) when a model is loaded.
"""

import ctypes
import os
import sys
import warnings
from typing import Optional

CANDIDATES = [
    "libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "libopenblasp.so.0",
    "libblis.so.4",
]

loaded: Optional[str] = None  # the library in use, for `info` and the benchmark
_warned = False


def use_fast_blas() -> Optional[str]:
    """Load the first optimized CBLAS found, globally; returns its name (or None)."""
    global loaded
    choice = os.environ.get("MLX_LLAVA_NEXT_BLAS", "")
    if loaded or sys.platform != "linux" or choice == "0" or "mlx.core" in sys.modules:
        return loaded
    for name in [choice] if choice else CANDIDATES:
        try:
            library = ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
        if hasattr(library, "cblas_sgemm"):
            loaded = name
            return loaded
    return None


def warn_if_reference() -> bool:
    """Warn once per process when MLX runs on its reference BLAS on Linux; True if it warned."""
    global _warned
    if _warned or loaded or sys.platform != "linux" or os.environ.get("MLX_LLAVA_NEXT_BLAS") == "0":
        return False
    _warned = True
    warnings.warn(
        "no optimized BLAS found: MLX runs on its reference BLAS (prompts and images 20-70x slower); "
        "install OpenBLAS (`apt install libopenblas0-pthread`) or set MLX_LLAVA_NEXT_BLAS to a CBLAS library "
        "(MLX_LLAVA_NEXT_BLAS=0 silences this)", RuntimeWarning, stacklevel=2)
    return True
