"""Per file, what is new and how it becomes chunks: the first stage of the pipeline.

For each session file the reader compares it with its saved state (unchanged, appended, rewritten, or
taken over from the older importer), reads only what is new, and yields the chunk items to embed
followed by a ``FileDone`` carrying the file's new state.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat as stat_module
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO

from importer.chunk import Chunk, Chunker
from importer.parse import ParseReport, is_settled, read_messages
from importer.points import point_id
from importer.state.base import DELETED, LEGACY, FileState

log = logging.getLogger(__name__)

HEAD_BYTES = 4096
_HASH_BLOCK = 1 << 20


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
    #: Chunks yielded for the file before this marker (to be written with it).
    chunks: int = 0


Item = ChunkItem | DeleteFile | FileDone


class NotARegularFile(OSError):
    """A FIFO, socket or device named like a session: reading it could block forever."""


def discover(root: Path, shard_index: int = 0, shard_count: int = 1, skipped: Counter[str] | None = None) -> list[str]:
    """Session files under ``root`` (relative POSIX paths, sorted) that belong to this shard.

    Only regular files (or symlinks to them) whose path is valid UTF-8 are listed; the others are
    counted in ``skipped`` (``not_regular_file``, ``undecodable_name``) and logged.
    """
    skipped = Counter() if skipped is None else skipped
    found = []
    for directory, _dirs, names in os.walk(root):
        for name in names:
            if not name.endswith(".jsonl"):
                continue
            rel = Path(directory, name).relative_to(root).as_posix()
            reason = _unreadable_reason(root / rel, rel)
            if reason:
                skipped[reason] += 1
                log.warning("session file skipped", extra={"source": ascii(rel), "reason": reason})
            elif shard_of(rel, shard_count) == shard_index:
                found.append(rel)
    return sorted(found)


def _unreadable_reason(path: Path, rel: str) -> str:
    """Why a listed name is not imported, or "" when it is."""
    try:
        rel.encode()
    except UnicodeEncodeError:
        # os.walk keeps undecodable bytes as lone surrogates; such a name cannot be stored in a
        # payload, a ConfigMap or JSON state, so the file is skipped rather than failing the run.
        return "undecodable_name"
    try:
        mode = path.stat().st_mode
    except OSError:
        return ""  # gone or unreadable: the reader reports it as failed
    return "" if stat_module.S_ISREG(mode) else "not_regular_file"


def shard_of(rel: str, shard_count: int) -> int:
    return int.from_bytes(hashlib.sha256(rel.encode()).digest()[:8], "big") % shard_count


def stream_of(rel: str) -> tuple[str, str]:
    """(conversation id, stream id) of a session file.

    The stream, which names the file's points, is its path relative to the root without the
    ``.jsonl`` suffix: unique per file by construction, so the same session id in two project folders
    (or a sub-agent beside its session) never shares a point id.
    """
    parts = Path(rel).parts
    session = parts[-3] if len(parts) >= 3 and parts[-2] == "subagents" else Path(rel).stem
    return session, rel.removesuffix(".jsonl")


def project_name(cwd: str, rel: str) -> str:
    """The project is the last component of the session's working directory. Without one, the
    encoded folder name is used as it is: decoding it is ambiguous ('-' stands for '/' and '-')."""
    name = cwd.rstrip("/").rsplit("/", 1)[-1]
    return name or Path(rel).parts[0]


def hash_range(fh: BinaryIO, start: int, end: int, digest: Any) -> Any:
    """Feed the file's bytes from ``start`` to ``end`` into ``digest``, read in blocks (the file may be large)."""
    fh.seek(start)
    remaining = end - start
    while remaining > 0:
        block = fh.read(min(remaining, _HASH_BLOCK))
        if not block:
            break  # shrank meanwhile: the digest cannot match, and the next run re-imports it
        digest.update(block)
        remaining -= len(block)
    return digest


def prefix_hash(fh: BinaryIO, end: int) -> str:
    """A digest of the file's bytes before ``end``."""
    return short_hex(hash_range(fh, 0, end, hashlib.sha256()))


def short_hex(digest: Any) -> str:
    return str(digest.hexdigest()[:16])


def head_hash(fh: BinaryIO, size: int) -> tuple[str, int]:
    """A digest of the file's first ``size`` bytes (at most HEAD_BYTES), and how many it covers."""
    covered = min(size, HEAD_BYTES)
    return prefix_hash(fh, covered), covered


def open_regular(path: Path) -> BinaryIO:
    """Open a regular file for reading; anything else raises instead of blocking.

    O_NONBLOCK makes opening a FIFO return at once (it does not change reads of a regular file), and
    fstat on the open descriptor is what gets read, not whatever the name pointed to a moment ago.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat_module.S_ISREG(os.fstat(fd).st_mode):
            raise NotARegularFile(f"{path}: not a regular file")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


class FileReader:
    def __init__(self, root: Path, limits: ReadLimits, collection_for: Callable[[str], str]) -> None:
        self.root = root
        self.limits = limits
        self.collection_for = collection_for

    def items(self, rel: str, old: FileState | None) -> Iterator[Item]:
        """What to embed of one file, then its ``FileDone``; nothing but a ``FileDone`` when unchanged."""
        try:
            with open_regular(self.root / rel) as fh:
                yield from self._plan_and_read(rel, fh, os.fstat(fh.fileno()), old)
        except OSError as error:
            log.warning("cannot read file", extra={"source": rel, "error": str(error)})
            failed = replace(old or FileState(), status="failed", error=str(error))
            yield FileDone(rel, failed, 0, 0, Counter(), outcome="failed")

    def _plan_and_read(self, rel: str, fh: BinaryIO, stat: os.stat_result, old: FileState | None) -> Iterator[Item]:
        settled = is_settled(stat.st_mtime, self.limits.settle_seconds)
        if old is not None and old.status == DELETED:
            old = None  # pruned earlier (its points are gone): a new file of the same name
        if old is not None and old.status == LEGACY:
            if stat.st_mtime <= old.mtime + 1:
                yield self._adopt_legacy(rel, fh, stat, old)
                return
            old = None  # changed since the older importer saw it: import it whole
        if old is not None and self._unchanged(old, stat, settled):
            yield FileDone(rel, old, 0, 0, Counter(), outcome="unchanged")
            return
        consumed = None if old is None else self._verified_prefix(old, fh, stat)
        if old is None or consumed is None:
            if old is not None and old.project:
                yield DeleteFile(self.collection_for(old.project), rel)
            old, consumed = FileState(), hashlib.sha256()
        yield from self._read_new_part(rel, fh, stat, old, settled, head_hash(fh, stat.st_size), consumed)

    @staticmethod
    def _verified_prefix(old: FileState, fh: BinaryIO, stat: os.stat_result) -> Any | None:
        """The digest of what the last run consumed, if that is unchanged (the new state's digest goes on
        from it, so a grown file's prefix is read once); None when anything consumed has changed: then the
        file is imported again whole.

        The digest of the whole consumed prefix catches a rewrite that keeps the first bytes (and
        the length); an entry written before that digest existed has none and is imported again too,
        which also moves its points to the path-based ids of :func:`stream_of`.
        """
        if stat.st_size < old.consumed or not old.prefix_hash:
            return None
        if old.head_hash != head_hash(fh, old.head_size)[0]:
            return None  # cheap first: most rewrites change the head
        digest = hash_range(fh, 0, old.consumed, hashlib.sha256())
        return digest if short_hex(digest) == old.prefix_hash else None

    @staticmethod
    def _unchanged(old: FileState, stat: os.stat_result, settled: bool) -> bool:
        same = old.size == stat.st_size and old.mtime == stat.st_mtime
        return same and (old.status == "done" or (old.status == "partial" and not settled))

    def _adopt_legacy(self, rel: str, fh: BinaryIO, stat: os.stat_result, old: FileState) -> FileDone:
        """The older importer embedded this file and it has not changed since: record it, embed nothing."""
        digest, covered = head_hash(fh, stat.st_size)
        adopted = replace(
            old,
            size=stat.st_size,
            mtime=stat.st_mtime,
            head_hash=digest,
            head_size=covered,
            prefix_hash=prefix_hash(fh, stat.st_size),
            consumed=stat.st_size,
            offset=stat.st_size,
            status="done",
        )
        return FileDone(rel, adopted, 0, 0, Counter(), outcome="adopted")

    def _read_new_part(
        self,
        rel: str,
        fh: BinaryIO,
        stat: os.stat_result,
        old: FileState,
        settled: bool,
        head: tuple[str, int],
        consumed_digest: Any,
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
        project, branch, new_messages, chunks = old.project, "", 0, 0
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
                chunks += 1
                yield self._item(chunk, context)
        tail = chunker.tail
        if tail is not None:
            chunks += 1
            yield self._item(tail, _ChunkContext(rel, conversation, stream, project, branch, sidechain))
        digest, covered = head
        skipped = Counter({k: v for k, v in report.skipped.items()})
        if stat.st_size == 0:
            skipped["empty_file"] += 1
        total_skipped = Counter(old.skipped) + skipped if old.consumed else Counter(skipped)
        # A cut last line lies past ``consumed``: it is read (and counted) again whenever the file
        # changes, so it is reported for this run but not remembered with the lines before it.
        total_skipped -= Counter({"truncated_tail": report.unfinished_tail})
        new_state = FileState(
            size=stat.st_size,
            mtime=stat.st_mtime,
            head_hash=digest,
            head_size=covered,
            prefix_hash=self._consumed_hash(fh, old.consumed, report.consumed, consumed_digest),
            consumed=report.consumed,
            offset=chunker.tail_start,
            next_chunk=chunker.next_index,
            project=project,
            messages=old.messages + new_messages,
            chunks=chunker.next_index + (tail is not None),
            skipped=dict(total_skipped),
            status="partial" if report.partial else "done",
        )
        yield FileDone(rel, new_state, new_messages, report.consumed - old.consumed, skipped, chunks=chunks)

    @staticmethod
    def _consumed_hash(fh: BinaryIO, before: int, now: int, digest_before: Any) -> str:
        """The digest of the bytes consumed up to ``now``, going on from that of the first ``before``."""
        if now < before:  # never expected (a consumed record stays consumed); hash afresh rather than trust it
            return prefix_hash(fh, now)
        return short_hex(hash_range(fh, before, now, digest_before))

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
