"""Triton kernels and their launchers, one op per file (imported lazily: triton is optional).

Kernel files depend on Triton, torch and this package's ``triton`` folder alone: nothing above them
(the registry, the ops) is imported here.
"""

import os


def triton_interpret() -> bool:
    """True when Triton kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
