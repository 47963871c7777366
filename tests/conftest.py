import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") == "1":
    from triton_interpreter_fixes import apply as _fix_interpreter

    _fix_interpreter()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
