"""The backend registry: which implementation serves which op for which inputs.

Every op has the backends ``reference`` (pure PyTorch, the specification), ``native`` (torch's
own fast paths with the package's exact semantics: the CPU backend), ``triton`` and ``cuda`` (the
compiled extension). Each backend of each op declares what it supports in one place (an
:class:`OpBackend`), in one :func:`register_op` call in the op's own file; the declaration also
names the module of the backend's kernels, which :func:`kernel` imports on first use (a direct
backend's, below, at the declaration). The dispatcher, the error messages, ``info`` and the tests
all read those declarations instead of repeating them.

Two kinds of backend: *direct* ones (``reference``, ``native``) are plain differentiable PyTorch,
one function per op that the op calls itself (:func:`direct`); *kernel* ones (``triton``,
``cuda``) are reached through the op's ``torch.library`` custom ops and their registered autograd.

``auto`` picks the first backend of the preference order of the input's device type that
supports the inputs: on CPU tensors :data:`CPU_AUTO_ORDER` (``native``, then ``reference``); on
CUDA tensors the op's ``AUTO_ORDER`` (set from GPU measurements in ``benchmarks/results/``).
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from .triton import triton_interpret

BACKENDS = ("reference", "native", "triton", "cuda")
CHOICES = BACKENDS + ("auto",)

# The preference order of `auto` on CUDA tensors, per op. Until GPU measurements are committed
# under benchmarks/results/, Triton (tested in CI under the interpreter) comes first.
AUTO_ORDER: dict[str, tuple[str, ...]] = {}
DEFAULT_AUTO_ORDER = ("triton", "cuda", "reference")
# ... and on CPU tensors, for every op: torch's fast CPU paths (measured in benchmarks/results/),
# then the specification.
CPU_AUTO_ORDER = ("native", "reference")


_DEVICE_TYPE: dict[torch.device, str] = {}


def device_type(device: torch.device) -> str:
    """``device.type``, remembered per device: every op asks on every call, and torch.device formats
    the type's name through a C++ string stream on each ``.type``, the costliest step of an op's
    checks when the CPU's caches are cold (as right after a long kernel). Under torch.compile the
    type is a constant of the graph, and writing the memo there would only fail the graph's guard
    on it (one recompile)."""
    if torch.compiler.is_compiling():
        return device.type
    kind = _DEVICE_TYPE.get(device)
    if kind is None:
        kind = _DEVICE_TYPE[device] = device.type
    return kind


def auto_order(op: str, kind: str) -> tuple[str, ...]:
    """The backends ``auto`` tries, in order, for ``op`` on tensors of device type ``kind``."""
    if kind == "cuda":
        return AUTO_ORDER.get(op, DEFAULT_AUTO_ORDER)
    return CPU_AUTO_ORDER


class BackendError(ValueError):
    """An op was asked to run on a backend that cannot serve its inputs."""


# Found once at import (cheaply, without importing triton): dynamo traces the checks below.
_TRITON_MISSING = importlib.util.find_spec("triton") is None


def triton_unavailable() -> str | None:
    """Why Triton kernels cannot run on this machine, or None if they can."""
    if _TRITON_MISSING:
        return "triton is not installed"
    if not (torch.cuda.is_available() or triton_interpret()):
        return "no CUDA device (set TRITON_INTERPRET=1 to run Triton kernels on the CPU)"
    return None


def cuda_unavailable() -> str | None:
    """Why the compiled extension cannot run here, or None if it can."""
    from . import _extension

    if not _extension.loaded():
        return f"the CUDA extension is not built ({_extension.load_error()})"
    if not torch.cuda.is_available():
        return "no CUDA device"
    return None


@dataclass(frozen=True)
class OpBackend:
    """What one backend of one op supports, and where its kernels live.

    ``devices``: device types of the input tensors it accepts. ``dtypes``: input dtypes.
    ``check``: extra, op-specific limits; returns a reason string when the inputs are out of them.
    ``unavailable``: returns why the backend cannot run on this machine at all, or None.
    ``kernels``: the module that holds the backend's functions, imported on first use
    (``transformer_kernels.<backend>.<module>``, or ``torch.ops.tk_C`` for the extension).
    ``entry``: for a direct backend, the name of its differentiable function per op, a template of
    ``{op}`` (the reference's ``attention_ref``, the native ``attention``); None for a kernel
    backend, whose functions the op's custom ops fetch by name.
    ``interpretable``: Triton kernels, which also take CPU tensors under ``TRITON_INTERPRET=1``
    (that is how CI tests them).
    """

    devices: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    check: Callable[..., str | None] = lambda **_: None
    unavailable: Callable[[], str | None] = lambda: None
    kernels: str | None = None
    entry: str | None = None
    interpretable: bool = False

    @property
    def direct(self) -> bool:
        """Plain differentiable PyTorch that the op calls itself (no custom op)."""
        return self.entry is not None

    def device_types(self) -> tuple[str, ...]:
        if self.interpretable and triton_interpret() and "cpu" not in self.devices:
            return self.devices + ("cpu",)
        return self.devices


# The dtypes every kernel backend serves; the reference adds float64 (the tests' exact path).
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def reference(module: str, dtypes: tuple[torch.dtype, ...] = KERNEL_DTYPES + (torch.float64,)) -> OpBackend:
    """The pure-PyTorch specification, ``<op>_ref`` in ``transformer_kernels.reference.<module>``:
    every device, every dtype it is written for."""
    return OpBackend(
        devices=("cpu", "cuda"), dtypes=dtypes, kernels=f"{__package__}.reference.{module}", entry="{op}_ref"
    )


def native(module: str, dtypes: tuple[torch.dtype, ...] = KERNEL_DTYPES + (torch.float64,)) -> OpBackend:
    """Torch's own fast paths with the package's semantics, ``<op>`` in
    ``transformer_kernels.native.<module>``. CPU tensors only: on CUDA the kernel backends serve
    (and where they cannot, the reference)."""
    return OpBackend(devices=("cpu",), dtypes=dtypes, kernels=f"{__package__}.native.{module}", entry="{op}")


def triton_kernels(
    module: str, check: Callable[..., str | None] | None = None, dtypes: tuple[torch.dtype, ...] = KERNEL_DTYPES
) -> OpBackend:
    """Triton kernels in ``transformer_kernels.triton.<module>``."""
    return OpBackend(
        devices=("cuda",),
        dtypes=dtypes,
        check=check or (lambda **_: None),
        unavailable=triton_unavailable,
        kernels=f"{__package__}.triton.{module}",
        interpretable=True,
    )


def cuda_kernels(
    check: Callable[..., str | None] | None = None, dtypes: tuple[torch.dtype, ...] = KERNEL_DTYPES
) -> OpBackend:
    """Kernels of the compiled extension, ``torch.ops.tk_C.<name>``."""
    return OpBackend(
        devices=("cuda",),
        dtypes=dtypes,
        check=check or (lambda **_: None),
        unavailable=cuda_unavailable,
        kernels="torch.ops.tk_C",
    )


@dataclass
class Op:
    name: str
    backends: dict[str, OpBackend] = field(default_factory=dict)


_OPS: dict[str, Op] = {}
_DIRECT: dict[tuple[str, str], Callable[..., Any]] = {}


def register_op(op: str, **specs: OpBackend) -> None:
    """Declare ``op`` and what each of its backends serves: ``register_op(name, reference=...,
    triton=..., cuda=...)``. The one place an op's backends are named."""
    unknown = set(specs) - set(BACKENDS)
    if unknown:
        raise ValueError(f"{op}: unknown backend(s) {sorted(unknown)}; expected some of {BACKENDS}")
    _OPS[op] = Op(op, dict(specs))
    # Direct backends are imported now, not on first use: the op looks them up inside graphs that
    # torch.compile traces, where an import cannot run (and they are plain PyTorch, cheap to load).
    for backend, s in specs.items():
        if s.entry is not None:
            _DIRECT[op, backend] = kernel(op, backend, s.entry.format(op=op))


def ops() -> list[str]:
    return sorted(_OPS)


def spec(op: str, backend: str) -> OpBackend:
    """The declaration of ``backend`` for ``op``."""
    if op not in _OPS:
        raise ValueError(f"unknown op {op!r}; expected one of {', '.join(ops())}")
    if backend not in _OPS[op].backends:
        raise ValueError(f"{op}: has no {backend!r} backend (it has {', '.join(_OPS[op].backends)})")
    return _OPS[op].backends[backend]


def kernel(op: str, backend: str, name: str) -> Callable[..., Any]:
    """The kernel function ``name`` of ``op``'s ``backend`` (its module imported on first use).

    Kernel backends of one op expose the same function names with the same signatures, so an op's
    custom ops fetch their implementation with one call, whichever backend the caller chose.
    """
    module = spec(op, backend).kernels
    if module is None:
        raise ValueError(f"{op}: the {backend} backend declares no kernel module")
    if module == "torch.ops.tk_C":
        return getattr(torch.ops.tk_C, name)
    return getattr(importlib.import_module(module), name)


def direct(op: str, backend: str) -> Callable[..., Any] | None:
    """The differentiable function of a direct backend (``reference``, ``native``) for ``op``,
    which the op calls in place of its custom ops; None for a kernel backend."""
    return _DIRECT.get((op, backend))


def why_not(op: str, backend: str, device: torch.device, dtype: torch.dtype, **problem) -> str | None:
    """Why ``backend`` cannot run ``op`` on these inputs, or None if it can."""
    spec = _OPS[op].backends.get(backend)
    if spec is None:
        return "it has no such backend"
    reason = spec.unavailable()
    if reason:
        return reason
    devices = spec.device_types()
    if device_type(device) not in devices:
        return f"{device.type} tensors are not supported (supported: {', '.join(devices)})"
    if dtype not in spec.dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in spec.dtypes)
        return f"dtype {str(dtype).removeprefix('torch.')} is not supported (supported: {names})"
    return spec.check(**problem)


# The global choice: `set_backend` sets it, `use_backend` overrides it in a scope. Process-wide
# plain globals, like torch.backends' flags: torch.compile guards on them (and recompiles when they
# change), where it cannot trace a ContextVar (torch 2.11).
_default_backend = "auto"
_scoped_backends: list[str] = []


def _validate(name: str) -> str:
    if name not in CHOICES:
        raise ValueError(f"unknown backend {name!r}; expected one of {', '.join(CHOICES)}")
    return name


def set_backend(name: str) -> None:
    """Set the backend every op uses unless a call passes ``backend=``."""
    global _default_backend
    _default_backend = _validate(name)


def get_backend() -> str:
    """The backend in force: the innermost ``use_backend``, else ``set_backend``'s, else auto."""
    return _scoped_backends[-1] if _scoped_backends else _default_backend


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the ops inside the ``with`` block on ``name`` (a ``backend=`` argument still wins)."""
    _scoped_backends.append(_validate(name))
    try:
        yield
    finally:
        _scoped_backends.pop()


def available_backends(op: str | None = None) -> list[str]:
    """The backends that can run on this machine: for ``op``, or for at least one op."""
    names = [op] if op is not None else ops()
    usable: set[str] = set()
    for name in names:
        if name not in _OPS:
            raise ValueError(f"unknown op {name!r}; expected one of {', '.join(ops())}")
        usable.update(b for b, spec in _OPS[name].backends.items() if spec.unavailable() is None)
    return [b for b in BACKENDS if b in usable]


def resolve(op: str, backend: str | None, device: torch.device, dtype: torch.dtype, **problem) -> str:
    """The concrete backend that runs ``op`` on these inputs, or a clear :class:`BackendError`.

    ``backend`` (the call's keyword) wins over the global choice. ``problem`` carries the op's
    own size parameters, which each backend's ``check`` reads.
    """
    name = _validate(backend) if backend is not None else get_backend()
    if name != "auto":
        reason = why_not(op, name, device, dtype, **problem)
        if reason:
            hint = "" if name == "reference" else "; use backend='reference' or 'auto'"
            raise BackendError(f"{op}: the {name} backend cannot run these inputs: {reason}{hint}")
        return name
    kind = device_type(device)
    if kind not in ("cpu", "cuda"):
        return "reference"  # the specification runs wherever torch does (meta tensors, ...)
    reasons = []
    for candidate in auto_order(op, kind):
        reason = why_not(op, candidate, device, dtype, **problem)
        if reason is None:
            return candidate
        reasons.append(f"{candidate}: {reason}")
    raise BackendError(f"{op}: no backend supports these inputs ({'; '.join(reasons)})")
