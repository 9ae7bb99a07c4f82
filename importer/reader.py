"""Per file, what is new and how it becomes chunks: the first stage of the pipeline.

For each session file the reader compares it with its saved state (unchanged, appended, rewritten, or
taken over from the older importer), reads only what is new, and yields the chunk items to embed
followed by a ``FileDone`` carrying the file's new state.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from importer.chunk import Chunk, Chunker
from importer.parse import ParseReport, is_settled, read_messages
from importer.points import point_id
from importer.state.base import LEGACY, FileState

log = logging.getLogger(__name__)

HEAD_BYTES = 4096


@dataclass(frozen=True)
class ReadLimits:
    chunk_messages: int = 5
    max_chunk_chars: int = 1000
    max_line_bytes: int = 8 << 20
    settle_seconds: float = 300.0


@dataclass(slots=True)
class ChunkItem:
    collection: str
    id: str
    text: str
    payload: dict[str, Any]


@dataclass(slots=True)
class DeleteFile:
    """The file was rewritten: its old points go before its new ones arrive."""

    collection: str
    source: str


@dataclass(slots=True)
class FileDone:
    source: str
    state: FileState
    new_messages: int
    bytes_read: int
    skipped: Counter[str]
    #: read: new records were read; unchanged: nothing to do; adopted: taken over from the older
    #: importer's state without reading; failed: the file could not be read.
    outcome: str = "read"


Item = ChunkItem | DeleteFile | FileDone


def discover(root: Path, shard_index: int = 0, shard_count: int = 1) -> list[str]:
    """Session files under ``root`` (relative POSIX paths, sorted) that belong to this shard."""
    found = []
    for directory, _dirs, names in os.walk(root):
        for name in names:
            if name.endswith(".jsonl"):
                rel = Path(directory, name).relative_to(root).as_posix()
                if shard_of(rel, shard_count) == shard_index:
                    found.append(rel)
    return sorted(found)


def shard_of(rel: str, shard_count: int) -> int:
    return int.from_bytes(hashlib.sha256(rel.encode()).digest()[:8], "big") % shard_count


def stream_of(rel: str) -> tuple[str, str]:
    """(conversation id, stream id) of a session file: a sub-agent's chunks get their own id space."""
    parts = Path(rel).parts
    if len(parts) >= 3 and parts[-2] == "subagents":
        session = parts[-3]
        return session, f"{session}/{Path(parts[-1]).stem}"
    session = Path(rel).stem
    return session, session


def project_name(cwd: str, rel: str) -> str:
    """The project is the last component of the session's working directory. Without one, the
    encoded folder name is used as it is: decoding it is ambiguous ('-' stands for '/' and '-')."""
    name = cwd.rstrip("/").rsplit("/", 1)[-1]
    return name or Path(rel).parts[0]


def head_hash(path: Path, size: int) -> tuple[str, int]:
    """A digest of the file's first ``size`` bytes (at most HEAD_BYTES), and how many it covers."""
    covered = min(size, HEAD_BYTES)
    with path.open("rb") as fh:
        return hashlib.sha256(fh.read(covered)).hexdigest()[:16], covered


class FileReader:
    def __init__(self, root: Path, limits: ReadLimits, collection_for: Callable[[str], str]) -> None:
        self.root = root
        self.limits = limits
        self.collection_for = collection_for

    def items(self, rel: str, old: FileState | None) -> Iterator[Item]:
        """What to embed of one file, then its ``FileDone``; nothing but a ``FileDone`` when unchanged."""
        path = self.root / rel
        try:
            stat = path.stat()
            yield from self._plan_and_read(rel, path, stat, old)
        except OSError as error:
            log.warning("cannot read file", extra={"source": rel, "error": str(error)})
            failed = replace(old or FileState(), status="failed", error=str(error))
            yield FileDone(rel, failed, 0, 0, Counter(), outcome="failed")

    def _plan_and_read(self, rel: str, path: Path, stat: os.stat_result, old: FileState | None) -> Iterator[Item]:
        settled = is_settled(stat.st_mtime, self.limits.settle_seconds)
        if old is not None and old.status == LEGACY:
            if stat.st_mtime <= old.mtime + 1:
                yield self._adopt_legacy(rel, path, stat, old)
                return
            old = None  # changed since the older importer saw it: import it whole
        if old is not None and self._unchanged(old, stat, settled):
            yield FileDone(rel, old, 0, 0, Counter(), outcome="unchanged")
            return
        digest, covered = head_hash(path, stat.st_size)
        rewritten = old is not None and (
            stat.st_size < old.consumed or old.head_hash != head_hash(path, old.head_size)[0]
        )
        if old is None or rewritten:
            if old is not None and old.project:
                yield DeleteFile(self.collection_for(old.project), rel)
            old = FileState()
        yield from self._read_new_part(rel, path, stat, old, settled, (digest, covered))

    @staticmethod
    def _unchanged(old: FileState, stat: os.stat_result, settled: bool) -> bool:
        same = old.size == stat.st_size and old.mtime == stat.st_mtime
        return same and (old.status == "done" or (old.status == "partial" and not settled))

    def _adopt_legacy(self, rel: str, path: Path, stat: os.stat_result, old: FileState) -> FileDone:
        """The older importer embedded this file and it has not changed since: record it, embed nothing."""
        digest, covered = head_hash(path, stat.st_size)
        adopted = replace(
            old,
            size=stat.st_size,
            mtime=stat.st_mtime,
            head_hash=digest,
            head_size=covered,
            consumed=stat.st_size,
            offset=stat.st_size,
            status="done",
        )
        return FileDone(rel, adopted, 0, 0, Counter(), outcome="adopted")

    def _read_new_part(
        self,
        rel: str,
        path: Path,
        stat: os.stat_result,
        old: FileState,
        settled: bool,
        head: tuple[str, int],
    ) -> Iterator[Item]:
        conversation, stream = stream_of(rel)
        sidechain = "/subagents/" in f"/{rel}"
        report = ParseReport()
        chunker = Chunker(
            first_index=old.next_chunk,
            start=old.offset,
            max_messages=self.limits.chunk_messages,
            max_chars=self.limits.max_chunk_chars,
        )
        project, branch, new_messages = old.project, "", 0
        with path.open("rb") as fh:
            messages = read_messages(
                fh,
                old.offset,
                report,
                max_line_bytes=self.limits.max_line_bytes,
                consume_partial_tail=settled,
                count_skips_from=old.consumed,
            )
            for message in messages:
                project = project or project_name(message.cwd, rel)
                branch = message.git_branch or branch
                sidechain = sidechain or message.is_sidechain
                new_messages += bool(message.text) and message.start >= old.consumed
                context = _ChunkContext(rel, conversation, stream, project, branch, sidechain)
                for chunk in chunker.feed([message]):
                    yield self._item(chunk, context)
        tail = chunker.tail
        if tail is not None:
            yield self._item(tail, _ChunkContext(rel, conversation, stream, project, branch, sidechain))
        digest, covered = head
        skipped = Counter({k: v for k, v in report.skipped.items()})
        if stat.st_size == 0:
            skipped["empty_file"] += 1
        total_skipped = Counter(old.skipped) + skipped if old.consumed else skipped
        new_state = FileState(
            size=stat.st_size,
            mtime=stat.st_mtime,
            head_hash=digest,
            head_size=covered,
            consumed=report.consumed,
            offset=chunker.tail_start,
            next_chunk=chunker.next_index,
            project=project,
            messages=old.messages + new_messages,
            chunks=chunker.next_index + (tail is not None),
            skipped=dict(total_skipped),
            status="partial" if report.partial else "done",
        )
        yield FileDone(rel, new_state, new_messages, report.consumed - old.consumed, skipped)

    def _item(self, chunk: Chunk, context: _ChunkContext) -> ChunkItem:
        return ChunkItem(
            collection=self.collection_for(context.project),
            id=point_id(context.stream, chunk.index),
            text=chunk.text,
            payload={
                "text": chunk.text,
                "conversation_id": context.conversation,
                "chunk_index": chunk.index,
                "timestamp": chunk.timestamp,
                "project": context.project,
                "start_role": chunk.start_role,
                "message_count": chunk.message_count,
                "source": context.source,
                "git_branch": context.branch,
                "is_sidechain": context.sidechain,
                "tools_used": chunk.tools,
                "files": chunk.files,
            },
        )


@dataclass(frozen=True, slots=True)
class _ChunkContext:
    source: str
    conversation: str
    stream: str
    project: str
    branch: str
    sidechain: bool
