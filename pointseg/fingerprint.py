"""Short stable hashes of JSON-able configs (shard provenance, resume keys)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import BaseModel


def config_hash(obj: Any) -> str:
    """Short stable hash (sha1, 12 hex) of a JSON-able config or a pydantic model."""
    if isinstance(obj, BaseModel):
        obj = obj.model_dump(mode="json")
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]
