"""Registering an op's kernel entry points as ``torch.library`` custom ops, with their fakes.

Every kernel backend of an op is reached through the op's custom ops
(``transformer_kernels::<name>``): opaque to ``torch.compile``, which sees each call whole and
traces shapes through the fake. The extension declares its own ops under ``tk_C::<name>`` with the
same arguments minus the trailing ``backend`` (the seed, too, is a 0-dim int64 tensor on the
inputs' device, or None); :func:`kernel_op` gives those the same fake, so they trace too when
called directly.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .._extension import loaded as _extension_loaded

NAMESPACE = "transformer_kernels"


def kernel_op(
    name: str, fake: Callable, mutates_args: tuple[str, ...] = ()
) -> Callable[[Callable], torch.library.CustomOpDef]:
    """Decorator: register ``fn`` as the custom op ``transformer_kernels::<name>`` with ``fake``.

    ``fn``'s annotations give the op's schema (keep ``typing.Optional``: torch 2.11 parses it);
    its last argument is the backend name, which ``fn`` passes to ``backends.kernel``.
    ``mutates_args`` names the arguments ``fn`` writes in place (the schema's ``Tensor(a!)``).
    """

    def register(fn: Callable) -> torch.library.CustomOpDef:
        op = torch.library.custom_op(f"{NAMESPACE}::{name}", mutates_args=mutates_args)(fn)
        op.register_fake(fake)
        if _extension_loaded() and hasattr(torch.ops.tk_C, name):
            torch.library.register_fake(f"tk_C::{name}")(lambda *args: fake(*args, "cuda"))
        return op

    return register
