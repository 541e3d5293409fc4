"""Writing files so that a reader never sees half of one (a kill mid-write leaves the old file or none)."""

from __future__ import annotations

import fsspec


def write_atomic(uri: str, data: bytes) -> None:
    """Write ``data`` to ``uri`` (any fsspec URI), creating the parent folder.

    On a local filesystem through a temp name and a rename; object stores write an object whole.
    """
    fs, path = fsspec.core.url_to_fs(uri)
    parent = path.rsplit("/", 1)[0]
    if parent and parent != path:
        fs.makedirs(parent, exist_ok=True)
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    if "file" in protocols:
        tmp = path + ".tmp"
        with fs.open(tmp, "wb") as f:
            f.write(data)
        fs.mv(tmp, path)
    else:
        with fs.open(path, "wb") as f:
            f.write(data)
