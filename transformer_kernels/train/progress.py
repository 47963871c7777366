"""The progress bar: tqdm's when it is installed and wanted, else one that draws nothing."""

from __future__ import annotations


def progress_bar(**kw):
    """``tqdm(**kw)``, or a bar with the same methods that draws nothing (disabled, or tqdm not installed)."""
    try:
        from tqdm import tqdm
    except ImportError:  # optional: plain runs work without it
        kw["disable"] = True
        tqdm = None
    if tqdm is None or kw.get("disable"):

        class _Null:
            def update(self, n=1):
                pass

            def set_postfix_str(self, s):
                pass

            def close(self):
                pass

        return _Null()
    return tqdm(**kw)
