"""Capture Triton launches, specialise them as the runtime does, compile offline, judge the resources.

The pieces, in the order a check runs them:

1. ``capture``: runs launchers with every ``JITFunction.run`` / ``Autotuner.run`` replaced by a
   recorder. A plain launch is recorded as it is; an autotuned one is expanded into every config its
   pruning keeps (the autotuner's own ``prune_configs``, so ``early_config_prune`` runs on the real
   arguments). Tensors become ``Pointer`` stand-ins (dtype and address), so fake/meta tensors work.
2. ``specialise``: Triton's own binder (``create_function_from_signature`` with the target's backend,
   then ``JITFunction._pack_args``) turns a launch into the signature, constexprs and attributes a
   GPU launch would compile: ints equal to 1 and ``None`` become constexprs, ints divisible by 16
   and 16-byte-aligned pointers get ``tt.divisibility``. Compiling the bare signature instead
   under-reports shared memory (a pipelined tile without known alignment is not pipelined).
3. ``compile_job``: ``triton.compile`` for ``GPUTarget("cuda", arch, 32)`` with the ptxas that Triton
   bundles; its ``-v`` report gives registers and spill bytes, ``metadata.shared`` the shared memory.
4. ``judge``: whether the block can launch on the arch, how many fit on an SM, and the verdict.
"""

from __future__ import annotations

import ast
import contextlib
import fnmatch
import importlib
import inspect
import io
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass

import torch

# ---------------------------------------------------------------------------------------------
# The hardware (CUDA programming guide, "Technical Specifications per Compute Capability").
# smem_block: the opt-in maximum a block may ask for; smem_sm: what an SM has; each resident block
# also costs 1 KiB of shared memory reserved by the system.


@dataclass(frozen=True)
class Arch:
    name: str
    capability: int
    smem_block: int
    smem_sm: int
    regs_sm: int = 65536
    threads_block: int = 1024
    threads_sm: int = 2048
    blocks_sm: int = 32
    smem_reserved: int = 1024


ARCHS = {
    80: Arch("A100 (sm_80)", 80, smem_block=166_912, smem_sm=167_936),
    90: Arch("H100 (sm_90)", 90, smem_block=232_448, smem_sm=233_472),
}


def regs_per_warp(regs: int) -> int:
    """Registers a warp holds: per thread, times 32, rounded up to the 256-register allocation unit."""
    return -(-regs * 32 // 256) * 256


def launch_problems(arch: Arch, threads: int, regs: int, smem: int) -> list[str]:
    """Why a block of this shape cannot launch on ``arch`` (empty: it can)."""
    why = []
    if threads > arch.threads_block:
        why.append(f"{threads} threads > {arch.threads_block}")
    if smem > arch.smem_block:
        why.append(f"shared memory {smem:,} B > {arch.smem_block:,} B")
    if regs_per_warp(regs) * (threads // 32) > arch.regs_sm:
        why.append(f"{regs} registers x {threads} threads > {arch.regs_sm:,}")
    return why


def blocks_per_sm(arch: Arch, threads: int, regs: int, smem: int) -> int:
    """Resident blocks per SM: the tightest of the thread, block, register and shared-memory limits."""
    warps = max(threads // 32, 1)
    limits = [arch.blocks_sm, arch.threads_sm // max(threads, 1)]
    if regs:
        limits.append(arch.regs_sm // regs_per_warp(regs) // warps)
    if smem:
        limits.append(arch.smem_sm // (smem + arch.smem_reserved))
    return max(min(limits), 0)


# ---------------------------------------------------------------------------------------------
# ptxas -v


@dataclass
class PtxasFigures:
    registers: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    stack: int = 0
    static_smem: int = 0
    max_threads: int | None = None  # from .maxntid, where the PTX declares it


_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(\w+)'")
_PROPS = re.compile(r"Function properties for (\S+)")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:.*?, (\d+) bytes smem)?")


def parse_ptxas(log: str) -> dict[str, PtxasFigures]:
    """Per entry function (mangled name): the figures of a ``ptxas -v`` report.

    ptxas prints, per function, ``Compiling entry function 'f'``, then ``Function properties for f``
    with the stack frame and spill bytes, then ``Used N registers, ... M bytes smem``; device
    functions compiled separately (noinline) get a properties block of their own, skipped here.
    """
    figures: dict[str, PtxasFigures] = {}
    entry = props = None
    for line in log.splitlines():
        if m := _ENTRY.search(line):
            entry = m.group(1)
            figures[entry] = PtxasFigures()
            props = None
        elif m := _PROPS.search(line):
            props = m.group(1)
        elif (m := _FRAME.search(line)) and entry is not None and props == entry:
            f = figures[entry]
            f.stack, f.spill_stores, f.spill_loads = (int(g) for g in m.groups())
        elif (m := _USED.search(line)) and entry is not None:
            f = figures[entry]
            f.registers = int(m.group(1))
            f.static_smem = int(m.group(2) or 0)
    return figures


# ---------------------------------------------------------------------------------------------
# Capture


@dataclass(frozen=True)
class Pointer:
    """A tensor argument as the specialiser sees it: a dtype and an address (nothing is read)."""

    dtype: torch.dtype
    address: int

    def data_ptr(self) -> int:
        return self.address


# Where a fake tensor's storage starts: the CUDA caching allocator hands out 512-byte-aligned blocks,
# so a tensor's address is aligned as its storage offset is.
_BASE_ADDRESS = 1 << 32


def as_pointer(t: torch.Tensor) -> Pointer:
    return Pointer(t.dtype, _BASE_ADDRESS + t.storage_offset() * t.element_size())


def _stand_in(value):
    return as_pointer(value) if isinstance(value, torch.Tensor) else value


@dataclass
class Launch:
    """One kernel launch as the runtime would compile it: ``fn[grid](*args, **kwargs)``."""

    fn: object  # the JITFunction
    args: tuple
    kwargs: dict
    problem: str
    tuned: bool  # one of an autotuner's pruned configs (else a plain launch)
    default: bool = False  # made with TK_AUTOTUNE=0: the launch that runs without tuning


class Recorder:
    """Replaces Triton's launch paths while active: ``JITFunction.run`` records the launch;
    ``Autotuner.run`` records one launch per config that its pruning keeps."""

    def __init__(self):
        self.launches: list[Launch] = []
        self.problem = ""

    def _jit_run(self, fn, *args, grid, warmup, **kwargs):
        self.launches.append(Launch(fn, tuple(map(_stand_in, args)), _stand_ins(kwargs), self.problem, False))

    def _autotuner_run(self, tuner, *args, grid=None, warmup=False, **kwargs):
        tuner.nargs = dict(zip(tuner.arg_names, args, strict=False))
        try:
            configs = tuner.prune_configs(kwargs)
        finally:
            tuner.nargs = None
        fn = tuner.fn
        for config in configs:
            launch_kwargs = _stand_ins({**kwargs, **config.all_kwargs()})
            self.launches.append(Launch(fn, tuple(map(_stand_in, args)), launch_kwargs, self.problem, True))

    @contextlib.contextmanager
    def active(self):
        from triton.runtime.autotuner import Autotuner
        from triton.runtime.jit import JITFunction

        recorder = self

        def jit_run(fn, *args, grid, warmup, **kwargs):
            return recorder._jit_run(fn, *args, grid=grid, warmup=warmup, **kwargs)

        def autotuner_run(tuner, *args, **kwargs):
            return recorder._autotuner_run(tuner, *args, **kwargs)

        saved = JITFunction.run, Autotuner.run
        JITFunction.run, Autotuner.run = jit_run, autotuner_run
        try:
            yield self
        finally:
            JITFunction.run, Autotuner.run = saved


def _stand_ins(kwargs: dict) -> dict:
    return {k: _stand_in(v) for k, v in kwargs.items()}


class _NoDevice(contextlib.nullcontext):
    """``torch.cuda.device`` for fake CUDA tensors: there is no device to switch to."""

    def __init__(self, device=None):
        super().__init__()


@dataclass
class _FakeProperties:
    multi_processor_count: int = 132
    total_memory: int = 80 * 2**30
    name: str = "offline compile check"


@contextlib.contextmanager
def fake_cuda():
    """Fake CUDA tensors (shapes, strides and dtypes, no storage) and the few ``torch.cuda`` queries
    the launchers make answered for an 80 GB H100, so launchers run without a GPU."""
    from unittest import mock

    from torch._subclasses.fake_tensor import FakeTensorMode

    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(torch.cuda, "device", _NoDevice))
        stack.enter_context(mock.patch.object(torch.cuda, "get_device_properties", lambda *a: _FakeProperties()))
        stack.enter_context(mock.patch.object(torch.cuda, "mem_get_info", lambda *a: (80 * 2**30, 80 * 2**30)))
        stack.enter_context(mock.patch.object(torch.cuda, "current_device", lambda: 0))
        stack.enter_context(FakeTensorMode(allow_non_fake_inputs=True))
        yield


@contextlib.contextmanager
def environment(**env: str):
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@dataclass
class Problem:
    """A named call of real launchers; ``run()`` builds its (fake CUDA) inputs and launches."""

    name: str
    run: Callable[[], object]


def capture(problems: Iterable[Problem]) -> list[Launch]:
    """Every launch the problems make: once autotuned (each pruned config), once with
    ``TK_AUTOTUNE=0`` (the launches tests and untuned runs make: ``default``)."""
    problems = list(problems)
    recorder = Recorder()
    launches = []
    with recorder.active(), fake_cuda():
        for autotune in ("1", "0"):
            recorder.launches = []
            with environment(TK_AUTOTUNE=autotune, TRITON_INTERPRET="0"):
                for problem in problems:
                    recorder.problem = problem.name
                    problem.run()
            for launch in recorder.launches:
                launch.default = autotune == "0"
            launches += recorder.launches
    return launches


# ---------------------------------------------------------------------------------------------
# Specialisation and compile jobs


def kernel_name(fn) -> str:
    return f"{fn.fn.__module__}.{fn.fn.__qualname__}"


@dataclass(frozen=True)
class Job:
    """A compile, everything plain data so that it pickles to a worker."""

    module: str
    qualname: str
    arch: int
    signature: tuple  # ((param, type), ...)
    constexprs: tuple  # ((path, value), ...)
    attrs: tuple  # ((path, attrs), ...)
    options: tuple  # ((option, value), ...)


def specialise(launch: Launch, arch: int) -> Job:
    """The compile a GPU launch of ``launch`` would make for ``arch``: Triton's binder and arg packer."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = launch.fn
    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*launch.args, **launch.kwargs)
    params = {p.name for p in fn.params}
    launch_options = {k: v for k, v in launch.kwargs.items() if k not in params}
    _, signature, constexprs, attrs = fn._pack_args(backend, launch_options, bound_args, specialization, options)
    # A launch that leaves an option out compiles as one that passes its default: one compile.
    defaults = backend.parse_options({})
    launch_options = {k: v for k, v in launch_options.items() if v is not None}
    for option in ("num_warps", "num_stages", "num_ctas"):
        launch_options.setdefault(option, getattr(defaults, option))
    return Job(
        fn.fn.__module__,
        fn.fn.__qualname__,
        arch,
        tuple(signature.items()),
        tuple(sorted(constexprs.items(), key=repr)),
        tuple(sorted(((k, tuple(map(tuple, v))) for k, v in attrs.items()), key=repr)),
        tuple(sorted(launch_options.items())),
    )


def _resolve(module: str, qualname: str):
    mod = sys.modules.get(module) or importlib.import_module(module)
    obj = mod
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def compile_job(job: Job) -> dict:
    """Compile one job; the figures, or ``error`` with the compiler's message."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _resolve(job.module, job.qualname)
    attrs = {k: [list(a) for a in v] for k, v in job.attrs}
    src = ASTSource(fn=fn, signature=dict(job.signature), constexprs=dict(job.constexprs), attrs=attrs)
    log = io.StringIO()
    try:
        with environment(TRITON_DUMP_PTXAS_LOG="1", TRITON_ALWAYS_COMPILE="1"), contextlib.redirect_stdout(log):
            kernel = triton.compile(src, target=GPUTarget("cuda", job.arch, 32), options=dict(job.options))
    except Exception as e:  # noqa: BLE001 -- every compiler failure is a verdict, not a crash
        message = f"{type(e).__name__}: {e}"
        return {"error": message[-4000:]}
    figures = parse_ptxas(log.getvalue())
    if len(figures) != 1:
        return {"error": f"expected one entry function in the ptxas report, found {sorted(figures)}"}
    (f,) = figures.values()
    md = kernel.metadata
    return {
        "shared": int(md.shared),
        "threads": int(md.num_warps) * 32,
        "registers": f.registers,
        "spill_stores": f.spill_stores,
        "spill_loads": f.spill_loads,
        "stack": f.stack,
    }


def _worker_init(cache_dir: str) -> None:
    os.environ["TRITON_CACHE_DIR"] = cache_dir


def compile_all(jobs: list[Job], workers: int, progress: Callable[[int, int], None] | None = None) -> list[dict | None]:
    """Compile every job, ``workers`` at a time, with a throw-away Triton cache (nothing is reused).

    Interrupted (Ctrl-C), it returns what it has: ``None`` for the jobs not compiled."""
    results: list[dict | None] = [None] * len(jobs)
    with tempfile.TemporaryDirectory(prefix="tk-compile-check-") as cache_dir:
        try:
            if workers <= 1:
                with environment(TRITON_CACHE_DIR=cache_dir):
                    for i, job in enumerate(jobs):
                        results[i] = compile_job(job)
                        if progress:
                            progress(i + 1, len(jobs))
                return results
            import multiprocessing

            ctx = multiprocessing.get_context("fork")
            pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init, initargs=(cache_dir,))
            try:
                futures = {pool.submit(compile_job, job): i for i, job in enumerate(jobs)}
                for done, future in enumerate(as_completed(futures)):
                    results[futures[future]] = future.result()
                    if progress:
                        progress(done + 1, len(jobs))
            finally:
                pool.shutdown(wait=False, cancel_futures=True)
        except KeyboardInterrupt:
            print(f"interrupted: {sum(r is not None for r in results)} of {len(jobs)} compiled", file=sys.stderr)
    return results


# ---------------------------------------------------------------------------------------------
# Reachability: which @triton.jit functions a set of launched kernels uses


def jit_functions(modules: Iterable) -> dict[str, object]:
    """Every ``@triton.jit`` function defined in ``modules``, by qualified name."""
    from triton.runtime.jit import JITFunction

    found = {}
    for module in modules:
        for value in vars(module).values():
            if isinstance(value, JITFunction) and value.fn.__module__ == module.__name__:
                found[kernel_name(value)] = value
    return found


def callees(fn) -> set[str]:
    """The ``@triton.jit`` functions ``fn``'s body calls, directly or through others."""
    from triton.runtime.jit import JITFunction

    seen: set[str] = set()
    todo = [fn]
    while todo:
        f = todo.pop()
        tree = ast.parse(inspect.cleandoc("\n" + f.src) if f.src.startswith(" ") else f.src)
        for node in ast.walk(tree):
            target = None
            if isinstance(node, ast.Name):
                target = f.fn.__globals__.get(node.id)
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                target = getattr(f.fn.__globals__.get(node.value.id), node.attr, None)
            if isinstance(target, JITFunction) and target is not f:
                name = kernel_name(target)
                if name not in seen:
                    seen.add(name)
                    todo.append(target)
    return seen


# ---------------------------------------------------------------------------------------------
# Verdicts


@dataclass(frozen=True)
class KnownOffender:
    """A failure that exists today and is being fixed: matched by glob on the row's fields."""

    kernel: str
    problem: str = "*"
    config: str = "*"
    flags: str = "*"
    arch: int | None = None
    triton: str = "*"  # glob on triton.__version__
    why: str = ""

    def matches(self, row: dict, triton_version: str) -> bool:
        return (
            fnmatch.fnmatchcase(row["kernel"], self.kernel)
            and any(fnmatch.fnmatchcase(p, self.problem) for p in row["problems"])
            and fnmatch.fnmatchcase(row["config"], self.config)
            and fnmatch.fnmatchcase(row.get("flags", ""), self.flags)
            and self.arch in (None, row["arch"])
            and fnmatch.fnmatchcase(triton_version, self.triton)
        )


def flags_label(launch: Launch) -> str:
    """``CAUSAL=True HAS_DROPOUT=False ...``: the kernel's own constexpr parameters other than tiles,
    which pick the code path (a known offender can name the path that spills)."""
    values = {**dict(zip((p.name for p in launch.fn.params), launch.args, strict=False)), **launch.kwargs}
    return " ".join(
        f"{p.name}={values.get(p.name, p.default)}"
        for p in launch.fn.params
        if p.is_constexpr and not p.name.startswith(("BLOCK", "GROUP_"))
    )


def config_label(launch: Launch) -> str:
    """``BLOCK_M=128 BLOCK_N=64 w8 s3``: the tile constexprs and the launch options."""
    tiles = [f"{k}={v}" for k, v in sorted(launch.kwargs.items()) if k.startswith(("BLOCK", "GROUP"))]
    return " ".join([*tiles, f"w{launch.kwargs.get('num_warps', 4)}", f"s{launch.kwargs.get('num_stages', 3)}"])


def judge(row: dict, spill_budget: int, known: list[KnownOffender], triton_version: str) -> tuple[str, str]:
    """``(verdict, reason)``; verdict is ``ok``, ``known`` (a listed offender) or ``FAIL``."""
    if "error" in row:
        failure = f"compile error: {row['error'].splitlines()[0] if row['error'] else ''}"
    else:
        arch = ARCHS[row["arch"]]
        why = launch_problems(arch, row["threads"], row["registers"], row["shared"])
        spills = row["spill_stores"] + row["spill_loads"]
        if why:
            failure = "cannot launch: " + "; ".join(why)
        elif spills and row["default"]:
            failure = f"spills {spills} B in a config that runs untuned (budget 0)"
        elif spills > spill_budget:
            failure = f"spills {spills} B > budget {spill_budget} B"
        else:
            return "ok", ""
    for offender in known:
        if offender.matches(row, triton_version):
            return "known", f"{failure} [known: {offender.why}]"
    return "FAIL", failure
