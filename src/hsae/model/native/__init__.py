"""Fused CPU kernels in C++, built on first use with ``torch.utils.cpp_extension``.

On the CPU the support-only training step is a few hundred small library kernels. Four sources
replace the costliest of them, with the same results (up to float32 rounding where they sum in
another order):

* ``stack_constraint.cpp``: the constraint of the whole level stack
  (``hierarchy_losses.stack_constraint``), in one pass over the support entries forward, one
  backward and one over the decoder rows;
* ``borrowed_decode.cpp``: a perturbed level's borrowed children, added into its
  reconstruction in one pass over the child level's entries;
* ``support.cpp``: a JumpReLU level's support entries from its pre-activations, and the
  entries' order by latent (``kernels.support_entries``, ``kernels.column_order``);
* ``tiled_decode.cpp``: decoding from the entries, and the entries' values gradient, for a
  decoder too large for L2, block of rows by block (``kernels.TILED_DECODE_MIN_BYTES``); and
  in the same visit the backward of a perturbed parent level's borrowed children
  (``kernels.BorrowedBackward``).

The first use compiles them (about 30 seconds, with a C++ compiler and ninja; torch caches the
build under ``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``, and rebuilds it
when the source or torch changes). Where it cannot be built (no compiler, or a platform
without OpenMP) a warning says so once and the library kernels are used: same values, slower.
``HSAE_NATIVE=0`` skips the attempt. CUDA tensors always take the library kernels.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

ENV = "HSAE_NATIVE"
"""Set to 0 to use the library kernels only (no build)."""
SOURCES = (
    Path(__file__).with_name("stack_constraint.cpp"),
    Path(__file__).with_name("borrowed_decode.cpp"),
    Path(__file__).with_name("support.cpp"),
    Path(__file__).with_name("tiled_decode.cpp"),
)
NAME = "hsae_native"

log = logging.getLogger(__name__)
_loaded: dict[str, bool] = {}


def enabled() -> bool:
    """Whether the user allows the fused kernels (``HSAE_NATIVE`` is not 0)."""
    return os.environ.get(ENV, "1").strip() not in ("0", "false", "no", "off")


def available() -> bool:
    """Whether the fused kernels are built and loaded (building them on the first call)."""
    if NAME not in _loaded:
        _loaded[NAME] = enabled() and _build()
    return _loaded[NAME]


def takes(*tensors: Tensor) -> bool:
    """Whether the fused kernels take these tensors: all on the CPU, the floating ones float32,
    outside a ``torch.compile`` trace, and the kernels built (building them on the first call).
    The one test of the callers' library fallbacks."""
    return (
        all(t.device.type == "cpu" for t in tensors)
        and all(t.dtype == torch.float32 for t in tensors if t.is_floating_point())
        and not getattr(torch.compiler, "is_compiling", lambda: False)()  # torch >= 2.3
        and available()
    )


def ops() -> Any:
    """The ``torch.ops`` namespace of the fused kernels (call :func:`available` first)."""
    return getattr(torch.ops, NAME)


def _build() -> bool:
    # OpenMP splits the kernels' loops among torch's threads; Apple's clang has no -fopenmp,
    # so there they run on one thread.
    openmp = [] if sys.platform == "darwin" else ["-fopenmp"]
    try:
        from torch.utils.cpp_extension import load

        log.info("hsae: building the fused CPU kernels (once, about 30 seconds)")
        with _ninja_on_path():
            load(
                name=NAME,
                sources=[str(source) for source in SOURCES],
                extra_cflags=["-O3", *openmp],
                extra_ldflags=openmp,
                is_python_module=False,
                verbose=False,
            )
        return all(
            hasattr(ops(), op)
            for op in (
                "stack_constraint_forward",
                "stack_constraint_decoder_rows",
                "borrowed_decode_forward",
                "support_entries",
                "column_order",
                "tiled_decode",
                "tiled_dots_borrowed",
            )
        )
    except Exception as error:  # no compiler, no ninja, no OpenMP: the library kernels serve
        warnings.warn(
            f"hsae: the fused CPU kernels could not be built, so the training step uses "
            f"torch's library kernels (same results, slower on the CPU). Set {ENV}=0 to skip "
            f"this attempt. Cause: {str(error).strip()[:500]}",
            RuntimeWarning,
            stacklevel=3,
        )
        return False


@contextlib.contextmanager
def _ninja_on_path() -> Iterator[None]:
    """torch runs ``ninja`` from PATH; the ``ninja`` package (a dependency) installs it beside
    the interpreter, which is not on PATH when a virtual environment's python is run without
    activating it. Put it there for the build, when no other ninja is."""
    path = os.environ.get("PATH", "")
    try:
        import ninja  # type: ignore[import-untyped]

        directory = ninja.BIN_DIR
    except (ImportError, AttributeError):
        directory = None
    if directory is None or shutil.which("ninja") is not None:
        yield
        return
    os.environ["PATH"] = directory + os.pathsep + path
    try:
        yield
    finally:
        os.environ["PATH"] = path
