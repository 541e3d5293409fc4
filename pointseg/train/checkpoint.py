"""Checkpoint files: tensors and JSON only, through fsspec, refused when they hold code.

A checkpoint is a folder (any fsspec URI) holding::

    meta.json      {"format", "trainable", "config", "categories", "step", "epoch",
                    "batch_in_epoch", "model_sha1", ...}   -- written last: its presence marks a complete folder
    model.pt       the network's state_dict                 (tensors only)
    optimizer.pt   the optimizer's state_dict               (optional; resume)
    extra.pt       the trainable's extra state, e.g. an EMA teacher (optional; resume)

Every ``.pt`` file is read with ``torch.load(..., weights_only=True)``: a file
that needs anything beyond tensors and plain containers (a pickle whose
``__reduce__`` would run code, a pickled class) is refused with
:class:`UnsafeCheckpointError` naming the file, and nothing in it runs.
Nothing here uses ``pathlib``: a checkpoint on ``s3://`` or ``gs://`` is read by
an actor on any node the same way as a local folder.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
from dataclasses import dataclass, field
from typing import Any

import fsspec
import torch

from pointseg.storage import write_atomic

FORMAT = "pointseg-checkpoint/1"
META_FILE = "meta.json"
MODEL_FILE = "model.pt"
OPTIMIZER_FILE = "optimizer.pt"
EXTRA_FILE = "extra.pt"


class UnsafeCheckpointError(ValueError):
    """A checkpoint file holding more than tensors and JSON-able containers; it was not loaded."""


def _join(root: str, name: str) -> str:
    return root.rstrip("/") + "/" + name


def _tensor_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def load_tensors(uri: str, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(uri, weights_only=True)`` through fsspec; a file needing more is refused.

    Raises :class:`FileNotFoundError` naming the file when it is missing and
    :class:`UnsafeCheckpointError` when it holds objects other than tensors and
    plain containers (nothing in the file is executed).
    """
    fs, path = fsspec.core.url_to_fs(uri)
    if not fs.exists(path):
        raise FileNotFoundError(f"checkpoint file not found: {uri}")
    with fs.open(path, "rb") as f:
        data = f.read()
    try:
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(
            f"{uri}: refused to load: it holds objects other than tensors and plain containers "
            f"(pointseg reads checkpoints with weights_only=True; {str(e).splitlines()[0][:160]})"
        ) from None
    except (RuntimeError, EOFError) as e:
        raise ValueError(f"{uri}: not a readable torch tensor file ({type(e).__name__}: {str(e)[:160]})") from None


@dataclass
class Checkpoint:
    """A checkpoint folder's content (what :func:`read_checkpoint` asked for)."""

    uri: str
    meta: dict
    model: dict[str, torch.Tensor] | None = None
    optimizer: dict | None = None
    extra: dict = field(default_factory=dict)

    @property
    def step(self) -> int:
        return int(self.meta.get("step", 0))


def save_checkpoint(uri: str, meta: dict, model_state: dict, optimizer_state: dict | None = None,
                    extra_state: dict | None = None) -> str:
    """Write a checkpoint folder at ``uri`` (module docstring); returns ``uri``.

    ``meta`` must be JSON-able; ``model_state`` / ``optimizer_state`` /
    ``extra_state`` hold tensors, numbers, strings and containers only.
    ``meta.json`` is written last, with the SHA-1 of ``model.pt``.
    """
    model_bytes = _tensor_bytes(model_state)
    write_atomic(_join(uri, MODEL_FILE), model_bytes)
    if optimizer_state is not None:
        write_atomic(_join(uri, OPTIMIZER_FILE), _tensor_bytes(optimizer_state))
    if extra_state:
        write_atomic(_join(uri, EXTRA_FILE), _tensor_bytes(extra_state))
    full = {"format": FORMAT, **meta, "model_sha1": hashlib.sha1(model_bytes).hexdigest()}
    write_atomic(_join(uri, META_FILE), json.dumps(full, indent=1, default=str).encode())
    return uri


def read_meta(uri: str) -> dict:
    """``meta.json`` of the checkpoint folder ``uri``; errors name the folder."""
    fs, path = fsspec.core.url_to_fs(_join(uri, META_FILE))
    if not fs.exists(path):
        hint = " (an older single-file checkpoint? retrain: pointseg reads checkpoint folders)" if uri.endswith(".pt") else ""
        raise FileNotFoundError(f"checkpoint {uri}: no {META_FILE} (not a pointseg checkpoint folder, or incomplete){hint}")
    with fs.open(path, "r") as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT:
        raise ValueError(f"checkpoint {uri}: format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


def read_checkpoint(uri: str, optimizer: bool = False, extra: bool = False,
                    map_location: str | torch.device = "cpu") -> Checkpoint:
    """Read the folder ``uri``: meta, the model state and, when asked, optimizer and extra state."""
    meta = read_meta(uri)
    ck = Checkpoint(uri, meta, model=load_tensors(_join(uri, MODEL_FILE), map_location))
    if optimizer:
        fs, path = fsspec.core.url_to_fs(_join(uri, OPTIMIZER_FILE))
        ck.optimizer = load_tensors(_join(uri, OPTIMIZER_FILE), map_location) if fs.exists(path) else None
    if extra:
        fs, path = fsspec.core.url_to_fs(_join(uri, EXTRA_FILE))
        ck.extra = load_tensors(_join(uri, EXTRA_FILE), map_location) if fs.exists(path) else {}
    return ck


def checkpoint_fingerprint(uri: str) -> str:
    """SHA-1 of the model weights, from ``meta.json`` (no weight file is read into memory)."""
    meta = read_meta(uri)
    if meta.get("model_sha1"):
        return str(meta["model_sha1"])
    h = hashlib.sha1()  # written by hand? hash the weights in chunks
    with fsspec.open(_join(uri, MODEL_FILE), "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def copy_checkpoint(src: str, dst: str) -> str:
    """Copy a checkpoint folder between any two fsspec locations (``meta.json`` last)."""
    read_meta(src)  # refuse to copy something that is not a complete checkpoint
    src_fs, src_path = fsspec.core.url_to_fs(src)
    names = [p.rsplit("/", 1)[-1] for p in src_fs.ls(src_path, detail=False)]
    for name in sorted(n for n in names if n.endswith(".pt")) + [META_FILE]:
        with src_fs.open(_join(src_path, name), "rb") as f:
            write_atomic(_join(dst, name), f.read())
    return dst
