"""Build the optional native kernels (native/fastpath.c) for the x86/Linux CPU fast path.

Everything else is configured in pyproject.toml. The extension is optional: when it cannot be
built (no C compiler), installation still succeeds and the runtime uses MLX's own kernels.
"""

import sys

from setuptools import Extension, setup

ext_modules = []
if sys.platform.startswith("linux"):
    ext_modules.append(
        Extension(
            "mlx_llava_next._fastpath",
            sources=["native/fastpath.c", "native/pool.c", "native/kv.c", "native/qint8.c"],
            depends=["native/common.h", "native/pool.h", "native/qint8_body.h"],
            extra_compile_args=["-O3", "-pthread", "-ffp-contract=off", "-fvisibility=hidden"],
            extra_link_args=["-pthread"],
            libraries=["dl"],
            optional=True,
        )
    )

setup(ext_modules=ext_modules)
