"""The one small interface every embedding provider implements."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class Embedder(Protocol):
    """Turns chunk texts into vectors.

    ``name`` is the provider's short name (``local`` or ``voyage``); it ends the
    collection name so that vectors of different models never share a collection.
    """

    name: str
    dimensions: int
    #: The longest chunk, in characters, the model really reads (longer text is truncated by the model).
    max_chars: int
    #: How many texts the model takes at once (one batch) for the best speed at bounded memory.
    batch_size: int
    #: How many texts one ``embed`` call should carry to keep the embedder busy: a batch for each of the
    #: batches it runs side by side. Callers that split their work split it into calls of this size.
    call_size: int

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """Embed ``texts`` (documents), one vector per text, in order."""
        ...

    async def embed_query(self, text: str) -> list[float]:
        """Embed a search query."""
        ...

    async def aclose(self) -> None:
        """Release threads, sessions and models."""
        ...
