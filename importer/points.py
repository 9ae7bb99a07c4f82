"""Where a chunk lands: its collection and its point id, the same for every store and every run.

Both the reader (which names each chunk's point) and the sinks (which write it) use these, so they live
here rather than in either stage.
"""

from __future__ import annotations

import hashlib
import uuid

#: Namespace of the point ids: uuid5(namespace, "<stream>:<chunk index>").
POINT_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://reflection.dev/conversation-chunk")


def collection_name(project: str, provider_suffix: str) -> str:
    return f"conv_{hashlib.md5(project.encode()).hexdigest()[:8]}_{provider_suffix}"


def point_id(stream: str, chunk_index: int) -> str:
    """The same chunk of the same conversation always gets the same id: re-runs never duplicate."""
    return str(uuid.uuid5(POINT_NAMESPACE, f"{stream}:{chunk_index}"))
