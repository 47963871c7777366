"""What a user needs to file a bug: versions, the GPU, the extension, and each op's backends."""

from __future__ import annotations

import os
import platform

import torch

from . import __version__, _extension, backends


def _triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "not installed"
    return triton.__version__


def _gpus() -> list[str]:
    if not torch.cuda.is_available():
        return ["none"]
    lines = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        lines.append(
            f"cuda:{i} {p.name} (sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB, "
            f"{p.multi_processor_count} SMs)"
        )
    return lines


def _driver() -> str:
    if not torch.cuda.is_available():
        return "n/a"
    try:
        import subprocess

        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment() -> dict[str, str]:
    """The facts every benchmark result and bug report carries."""
    return {
        "transformer_kernels": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": str(torch.version.cuda),
        "triton": _triton_version(),
        "gpu": "; ".join(_gpus()),
        "driver": _driver(),
        "extension": "built" if _extension.loaded() else f"not built ({_extension.load_error()})",
        "extension_archs": " ".join(_extension.built_archs()) or "n/a",
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
    }


def info() -> str:
    env = environment()
    width = max(map(len, env))
    lines = ["transformer-kernels environment", ""]
    lines += [f"  {k.ljust(width)}  {v}" for k, v in env.items()]
    lines += ["", "backends per op (default device: %s)" % ("cuda" if torch.cuda.is_available() else "cpu"), ""]
    for op in backends.ops():
        for name, spec in backends._OPS[op].backends.items():
            reason = spec.unavailable()
            status = "available" if reason is None else f"unavailable: {reason}"
            lines.append(f"  {op:<26} {name:<10} {status}")
        orders = "; ".join(f"on {dev.upper()} {' > '.join(backends.auto_order(op, dev))}" for dev in ("cpu", "cuda"))
        lines.append(f"  {op:<26} {'auto':<10} order {orders}")
    return "\n".join(lines)
