"""Row file names made absolute for Ray workers, in a module that imports nothing heavy.

Ray Data ships :func:`absolute_file_names` to its read tasks by reference, so
every worker that runs one imports this module: kept free of torch (importing
:mod:`operators.training` costs a fresh worker about 4-5 CPU-seconds).
"""

from __future__ import annotations

import os


def absolute_file_names(batch: dict, cwd: str) -> dict:
    """Local relative ``file_name`` -> absolute against the driver's ``cwd`` (workers run elsewhere)."""
    batch["file_name"] = [f if "://" in f or os.path.isabs(f) else os.path.join(cwd, f) for f in batch["file_name"]]
    return batch
