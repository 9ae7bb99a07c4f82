"""Group consecutive text messages into chunks that the embedding model reads whole.

A chunk holds up to ``max_messages`` messages and at most ``max_chars`` characters: all-MiniLM-L6-v2
reads 256 tokens and silently drops the rest, so a longer chunk would be partly unsearchable. A
message longer than the budget is split at paragraph, then line, then sentence, then word boundaries,
each piece overlapping the previous one a little, and each piece is a chunk of its own.

Chunking is deterministic from any chunk boundary: a run that resumes at the start of the last,
still-short chunk of a file rebuilds that chunk with the same index, now complete.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from importer.parse import Message

ROLE_LABELS = {"user": "User", "assistant": "Assistant"}
_SEPARATORS = (re.compile(r"\n\s*\n"), re.compile(r"\n"), re.compile(r"(?<=[.!?])\s+"), re.compile(r"\s+"))


@dataclass
class Chunk:
    index: int
    text: str
    timestamp: str
    start_role: str
    message_count: int
    #: Where the next chunk's reading may start over: the offset the chunk's first record begins at.
    start: int
    tools: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)


@dataclass
class _Open:
    """The chunk being filled."""

    start: int
    parts: list[str] = field(default_factory=list)
    messages: list[Message] = field(default_factory=list)
    tools: dict[str, None] = field(default_factory=dict)
    files: dict[str, None] = field(default_factory=dict)
    chars: int = 0

    def add_tools(self, message: Message) -> None:
        self.tools.update(dict.fromkeys(t for t in message.tools if t))
        self.files.update(dict.fromkeys(message.files))


class Chunker:
    """Turns a stream of messages into chunks; ``tail`` is the still-open chunk at the end of input."""

    def __init__(self, *, first_index: int, start: int, max_messages: int, max_chars: int) -> None:
        self.next_index = first_index
        self.max_messages = max_messages
        self.max_chars = max_chars
        self.overlap = max(0, max_chars // 10)
        self._open = _Open(start=start)

    @property
    def tail(self) -> Chunk | None:
        """The chunk still open at the end of the input (fewer messages than the maximum), if any."""
        return self._build(self._open) if self._open.messages else None

    @property
    def tail_start(self) -> int:
        """The offset a later run re-reads from to complete the open chunk."""
        return self._open.start

    def feed(self, messages: Iterable[Message]) -> Iterator[Chunk]:
        for message in messages:
            yield from self._add(message)

    def _add(self, message: Message) -> Iterator[Chunk]:
        if not message.text:
            # A turn that only used tools: what it touched belongs to the conversation around it.
            self._open.add_tools(message)
            return
        labelled = f"{ROLE_LABELS[message.role]}: {message.text}"
        if len(labelled) > self.max_chars:
            if self._open.messages:
                yield self._flush(next_start=message.start)
            yield from self._split_message(message, labelled)
            self._open = _Open(start=message.end)
            return
        separator = 2 if self._open.parts else 0
        if self._open.messages and self._open.chars + separator + len(labelled) > self.max_chars:
            yield self._flush(next_start=message.start)
            separator = 0
        self._open.parts.append(labelled)
        self._open.messages.append(message)
        self._open.chars += separator + len(labelled)
        self._open.add_tools(message)
        if len(self._open.messages) >= self.max_messages:
            yield self._flush(next_start=message.end)

    def _flush(self, next_start: int) -> Chunk:
        chunk = self._build(self._open)
        self.next_index += 1
        self._open = _Open(start=next_start)
        return chunk

    def _build(self, open_chunk: _Open) -> Chunk:
        first = open_chunk.messages[0]
        return Chunk(
            index=self.next_index,
            text="\n\n".join(open_chunk.parts),
            timestamp=first.timestamp,
            start_role=first.role,
            message_count=len(open_chunk.messages),
            start=open_chunk.start,
            tools=list(open_chunk.tools),
            files=list(open_chunk.files),
        )

    def _split_message(self, message: Message, labelled: str) -> Iterator[Chunk]:
        self._open.add_tools(message)
        tools, files = list(self._open.tools), list(self._open.files)
        for piece in split_text(labelled, self.max_chars, self.overlap):
            yield Chunk(
                index=self.next_index,
                text=piece,
                timestamp=message.timestamp,
                start_role=message.role,
                message_count=1,
                start=message.start,
                tools=tools,
                files=files,
            )
            self.next_index += 1


def split_text(text: str, max_chars: int, overlap: int) -> list[str]:
    """Split ``text`` into pieces of at most ``max_chars`` at the coarsest boundary that works.

    Each piece after the first starts with up to ``overlap`` characters from the end of the one before,
    so that a sentence cut at a piece boundary is still found whole in one of them.
    """
    units = _units(text, max_chars - overlap, 0)
    pieces: list[str] = []
    current = ""
    for unit in units:
        if current and len(current) + len(unit) > max_chars:
            pieces.append(current.strip())
            current = _tail(current, overlap)
        current += unit
    if current.strip():
        pieces.append(current.strip())
    return pieces


def _units(text: str, limit: int, level: int) -> list[str]:
    """Cut ``text`` into units no longer than ``limit``, keeping the separators attached."""
    if len(text) <= limit:
        return [text]
    if level == len(_SEPARATORS):
        return [text[i : i + limit] for i in range(0, len(text), limit)]
    units: list[str] = []
    position = 0
    for match in _SEPARATORS[level].finditer(text):
        units.extend(_units(text[position : match.end()], limit, level + 1))
        position = match.end()
    units.extend(_units(text[position:], limit, level + 1))
    return [u for u in units if u]


def _tail(text: str, overlap: int) -> str:
    """The last ``overlap`` characters of ``text``, starting at a word boundary."""
    if overlap <= 0:
        return ""
    tail = text[-overlap:]
    space = tail.find(" ")
    return tail[space + 1 :] if 0 <= space < len(tail) - 1 else tail
