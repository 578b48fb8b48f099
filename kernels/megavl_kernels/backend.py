"""Which implementation runs an op: the Triton kernels or the PyTorch references.

Chosen per call from the tensors' device and ``MEGAVL_KERNELS``:

    auto (default)  CUDA tensors -> Triton; anything else -> reference. If Triton cannot be
                    imported on a CUDA machine, falls back to the reference and logs once.
    triton          Triton, always. CPU tensors run through Triton's interpreter.
    torch           the reference, always.

Triton decides at *import* time whether ``@triton.jit`` compiles or interprets (its own library
functions such as ``tl.sum`` are decorated then), so interpreter mode is a process-wide fact:
``TRITON_INTERPRET=1`` must be in the environment before ``triton`` is first imported. When Triton
is forced on a CPU tensor and Triton is not imported yet, this module sets the variable and imports
it; if Triton was already imported compiled, that is an error (never a silent fallback). Triton is
imported only here and in the kernel modules, so ``import megavl_kernels`` never needs CUDA.
"""
from __future__ import annotations

import functools
import logging
import os
import sys

import torch

ENV_VAR = "MEGAVL_KERNELS"
BACKENDS = ("auto", "triton", "torch")

log = logging.getLogger(__name__)


def requested_backend(backend: str | None = None) -> str:
    """The backend asked for: the ``backend`` argument if given, else ``$MEGAVL_KERNELS``, else auto."""
    choice = backend if backend is not None else os.environ.get(ENV_VAR, "auto")
    choice = choice.strip().lower()
    if choice not in BACKENDS:
        source = "backend argument" if backend is not None else f"${ENV_VAR}"
        raise ValueError(f"{source} must be one of {BACKENDS}, got {choice!r}")
    return choice


def resolve_backend(device: torch.device, backend: str | None = None) -> str:
    """'triton' or 'torch' for an op whose tensors live on ``device``; Triton is ready if 'triton'."""
    choice = requested_backend(backend)
    if choice == "torch":
        return "torch"
    if choice == "auto":
        if device.type != "cuda":
            return "torch"
        if _triton_importable():
            _import_triton(device)
            return "triton"
        _warn_once("auto_no_triton", "triton is not importable; megavl_kernels falls back to the "
                   "PyTorch reference on CUDA (slower, same results)")
        return "torch"
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"Triton kernels run on CUDA (or CPU through the interpreter), not on {device.type}")
    if not _triton_importable():
        raise ImportError(f"{ENV_VAR}=triton was requested but the triton package cannot be imported")
    _import_triton(device)
    return "triton"


def interpreter_active() -> bool:
    """True if the imported Triton interprets kernels (it was imported under TRITON_INTERPRET=1)."""
    if "triton" not in sys.modules:
        return False
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.sum, InterpretedFunction)


@functools.lru_cache(maxsize=None)
def _triton_importable() -> bool:
    import importlib.util

    return importlib.util.find_spec("triton") is not None


def _import_triton(device: torch.device) -> None:
    if device.type == "cpu":
        if "triton" not in sys.modules:
            _warn_once("interpret", "running megavl Triton kernels on CPU tensors: importing triton "
                       "with TRITON_INTERPRET=1 (process-wide; every Triton kernel is interpreted)")
            os.environ["TRITON_INTERPRET"] = "1"
            import triton  # noqa: F401  (imported here, in interpreter mode, on purpose)
        if not interpreter_active():
            raise RuntimeError(
                "Triton on CPU tensors needs Triton's interpreter, but triton was already imported in "
                "compiled mode. Set TRITON_INTERPRET=1 in the environment before anything imports triton, "
                f"or use {ENV_VAR}=torch / CUDA tensors.")
        return
    import triton  # noqa: F401

    if interpreter_active():
        _warn_once("cuda_interpreted", "TRITON_INTERPRET=1 is set: megavl Triton kernels on CUDA tensors "
                   "run in the interpreter (correct but very slow)")


@functools.lru_cache(maxsize=None)
def _warn_once(key: str, message: str) -> None:
    log.warning(message)
