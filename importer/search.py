"""``python -m importer search``: one query over every collection of a provider, loading only what it needs.

A person waits for this, so it imports neither the import pipeline nor qdrant-client (for an embedded
store) nor fastembed: the tokenizer and one onnxruntime session embed the query, Edge opens the shards.

:class:`Searcher` keeps the query model loaded between queries (the MCP server, the retrieval benchmark);
:func:`search` is one query with everything opened and closed around it (the command line).
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from importer.chunk import ROLE_LABELS, Chunker
from importer.lexical import query_vector
from importer.parse import ParseReport, read_messages
from importer.settings import Settings, SettingsError
from importer.store import ScoredPayload, Sink, StoreQuery, fuse, open_sink

if TYPE_CHECKING:
    from importer.embed.base import Embedder

#: With a filter the store cannot apply (role) or a preference for recent moments, each collection is asked
#: for this many times the hits wanted, and the filter or the preference is applied to those. Time is filtered
#: by the store itself.
FILTER_OVERFETCH = 10
#: Each ranking (dense, lexical) puts at least this many candidates into the fusion: a moment ranked 30th by
#: meaning and 2nd by its words must still reach the top.
FUSION_CANDIDATES = 50
_LABELS = {label: role for role, label in ROLE_LABELS.items()}
#: Where a chunk's next message starts: the chunker joins labelled messages with a blank line.
_MESSAGE_START = re.compile(r"(?:\A|\n\n)(" + "|".join(_LABELS) + r"): ")
_DURATION = re.compile(r"^(\d+)\s*([mhdwy])$")
_UNIT_DAYS = {"m": 1 / 1440, "h": 1 / 24, "d": 1, "w": 7, "y": 365}


@dataclass(frozen=True)
class SearchFilter:
    """What a hit must match besides the query; ``None`` matches anything."""

    project: str | None = None
    #: Only chunks whose first message is at or after this instant.
    since: datetime | None = None
    #: Only chunks holding a message of this role (``user`` or ``assistant``).
    role: str | None = None

    @property
    def needs_overfetch(self) -> bool:
        return self.role is not None


@dataclass
class Hit:
    score: float
    project: str
    timestamp: str
    #: The session file, relative to the source root of the import.
    source: str
    chunk_index: int
    excerpt: str
    text: str = ""
    conversation_id: str = ""
    start_role: str = ""
    message_count: int = 0
    git_branch: str = ""
    is_sidechain: bool = False
    tools_used: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)

    @property
    def session(self) -> str:
        """The session file this hit belongs to: a sub-agent's file counts as its parent session's."""
        return session_of(self.source)

    def messages(self) -> list[dict[str, str]]:
        """The messages the chunk covers, as ``{role, text}``, read back from its labelled text."""
        return split_messages(self.text, self.start_role)

    def to_json(self) -> dict[str, Any]:
        return {
            "score": round(self.score, 4),
            "project": self.project,
            "timestamp": self.timestamp,
            "session_file": self.source,
            "session": self.session,
            "conversation_id": self.conversation_id,
            "chunk_index": self.chunk_index,
            "start_role": self.start_role,
            "message_count": self.message_count,
            "git_branch": self.git_branch,
            "is_sidechain": self.is_sidechain,
            "text": self.text,
            "messages": self.messages(),
            "tools_used": self.tools_used,
            "files": self.files,
        }


@dataclass
class SessionHits:
    """The hits of one session, best first."""

    session: str
    hits: list[Hit]

    @property
    def best(self) -> Hit:
        return self.hits[0]


def session_of(source: str) -> str:
    """``<project>/<session>/subagents/agent-x.jsonl`` belongs to ``<project>/<session>.jsonl``."""
    path = PurePosixPath(source)
    if len(path.parts) >= 3 and path.parts[-2] == "subagents":
        return str(path.parent.parent) + ".jsonl"
    return source


def split_messages(text: str, start_role: str = "") -> list[dict[str, str]]:
    """Split a chunk's text at its ``User:``/``Assistant:`` labels. A piece of a message too long for one
    chunk has no label after its first piece: it is one message of ``start_role``."""
    found = list(_MESSAGE_START.finditer(text))
    messages: list[dict[str, str]] = []
    if not found or found[0].start() > 0:
        head = text[: found[0].start()] if found else text
        if head.strip():
            messages.append({"role": start_role, "text": head.strip()})
    for i, match in enumerate(found):
        end = found[i + 1].start() if i + 1 < len(found) else len(text)
        messages.append({"role": _LABELS[match.group(1)], "text": text[match.end() : end].strip()})
    return messages


def group_by_session(hits: list[Hit], sessions: int) -> list[SessionHits]:
    """The ``sessions`` best sessions, in the order of their best hit."""
    groups: dict[str, list[Hit]] = {}
    for hit in sorted(hits, key=lambda h: h.score, reverse=True):
        groups.setdefault(hit.session, []).append(hit)
    return [SessionHits(session, found) for session, found in list(groups.items())[:sessions]]


def parse_duration(value: str) -> timedelta | None:
    """``2w``, ``3d``, ``12h``, ``30m``, ``1y``; None if ``value`` is not one."""
    match = _DURATION.match(value.strip())
    return timedelta(days=int(match.group(1)) * _UNIT_DAYS[match.group(2)]) if match else None


def parse_half_life(value: str) -> timedelta:
    """The age at which ``--prefer-recent`` halves a moment's score: a duration longer than none."""
    duration = parse_duration(value)
    if not duration:
        raise SettingsError(f"--prefer-recent {value!r}: give the age at which a moment counts half (30d, 2w, 12h)")
    return duration


def parse_since(value: str, now: datetime | None = None) -> datetime:
    """``2w``, ``3d``, ``12h``, ``30m``, ``1y`` before now, or a date / date-time (ISO 8601, UTC if no zone)."""
    now = now or datetime.now(UTC)
    duration = parse_duration(value)
    if duration is not None:
        return now - duration
    try:
        parsed = datetime.fromisoformat(value.strip())
    except ValueError:
        try:
            parsed = datetime.combine(date.fromisoformat(value.strip()), datetime.min.time())
        except ValueError:
            raise SettingsError(f"--since {value!r}: give a duration (2w, 3d, 12h) or a date (2026-01-31)") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def matches(hit: Hit, wanted: SearchFilter) -> bool:
    if wanted.since is not None:
        when = _when(hit)
        if when is None or when < wanted.since:  # no time: it cannot be shown to be recent
            return False
    return wanted.role is None or any(m["role"] == wanted.role for m in hit.messages())


def prefer_recent(hits: list[Hit], half_life: timedelta, now: datetime | None = None) -> list[Hit]:
    """The hits re-ranked by their score times 0.5 ** (age / ``half_life``): a moment one half-life old counts
    half as much as one from now, two half-lives a quarter. A hit without a time counts for nothing (it cannot be
    shown to be recent) and keeps its place among those."""
    now = now or datetime.now(UTC)

    def weight(hit: Hit) -> float:
        when = _when(hit)
        if when is None:
            return 0.0
        return 0.5 ** (max(now - when, timedelta(0)) / half_life)

    weighed = [dataclasses.replace(hit, score=hit.score * weight(hit)) for hit in hits]
    return sorted(weighed, key=lambda hit: hit.score, reverse=True)


def _when(hit: Hit) -> datetime | None:
    try:
        when = datetime.fromisoformat(hit.timestamp)
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


class Searcher:
    """The query model loaded once; the store held open until :meth:`aclose`, or released when idle.

    An embedded store admits one process at a time, an import included: a long-lived searcher that held it
    would make every import fail while it runs. So with ``idle_seconds`` the store is opened on demand and
    closed once no query came for that long: queries in quick succession (an assistant searching several
    times) reuse it, and an import that finds it held waits for it (see ``FolderLock``).
    """

    def __init__(self, settings: Settings, model: QueryModel, *, idle_seconds: float | None = None) -> None:
        self.settings = settings
        self._model = model
        #: None: keep the store open until aclose().
        self._idle_seconds = idle_seconds
        self._store: Sink | None = None
        self._using = asyncio.Lock()  # one query or release at a time touches the store
        self._release: asyncio.TimerHandle | None = None
        self._releasing: set[asyncio.Task[None]] = set()

    @classmethod
    async def open(cls, settings: Settings, *, idle_seconds: float | None = None) -> Searcher:
        """A searcher; with ``idle_seconds`` None the store is opened now, so a missing or busy store fails
        before the model is loaded."""
        searcher = cls(settings, await _query_model(settings), idle_seconds=idle_seconds)
        if idle_seconds is None:
            try:
                searcher._store = open_store(settings)
            except BaseException:
                await searcher._model.aclose()
                raise
        return searcher

    async def search(
        self,
        query: str,
        *,
        limit: int = 5,
        wanted: SearchFilter | None = None,
        lexical: bool = True,
        recent_half_life: timedelta | None = None,
    ) -> list[Hit]:
        """The best hits by meaning and, with ``lexical`` (the default), by the query's words, fused; with
        ``recent_half_life``, recent ones preferred (see :func:`prefer_recent`)."""
        wanted = wanted or SearchFilter()
        async with self._using:
            if self._release is not None:
                self._release.cancel()
                self._release = None
            try:
                # The store first: a missing or busy store fails before the query is embedded. Opening may wait
                # for another search holding it, so not on the event loop.
                if self._store is None:
                    self._store = await asyncio.to_thread(open_store, self.settings)
                store = self._store
                overfetch = wanted.needs_overfetch or recent_half_life is not None
                asked = limit * FILTER_OVERFETCH if overfetch else limit
                request = StoreQuery(
                    dense=await self._model.embed(query),
                    lexical=query_vector(query) if lexical else None,
                    limit=asked,
                    candidates=max(asked, FUSION_CANDIDATES),
                    since=wanted.since,
                )
                hits = await asyncio.to_thread(_search_collections, store, request, wanted)
                return (prefer_recent(hits, recent_half_life) if recent_half_life else hits)[:limit]
            finally:
                if self._idle_seconds is not None:
                    self._release = asyncio.get_running_loop().call_later(self._idle_seconds, self._release_soon)

    def _release_soon(self) -> None:
        task = asyncio.ensure_future(self._close_store())
        self._releasing.add(task)  # a reference, or the task may be collected before it runs
        task.add_done_callback(self._releasing.discard)

    async def _close_store(self) -> None:
        async with self._using:
            store, self._store = self._store, None
            if store is not None:
                await asyncio.to_thread(store.close)

    async def aclose(self) -> None:
        if self._release is not None:
            self._release.cancel()
        try:
            await self._model.aclose()
        finally:
            await self._close_store()


def open_store(settings: Settings, *, for_writing: bool = False) -> Sink:
    """The store the settings name: the embedded one at ``--qdrant-path`` or the server. Search reads it
    (an embedded store is then never created); an import writes it."""
    return open_sink(
        url=settings.qdrant_url,
        path=settings.qdrant_path,
        api_key=settings.qdrant_api_key,
        suffix=provider_suffix(settings),
        attempts=settings.upsert_attempts,
        for_writing=for_writing,
        index_min_points=settings.index_min_points,
    )


async def search(
    settings: Settings,
    query: str,
    *,
    limit: int = 5,
    project: str | None = None,
    wanted: SearchFilter | None = None,
    recent_half_life: timedelta | None = None,
) -> list[Hit]:
    """Top hits over every collection of this provider (or one project's); ``wanted``, if given, replaces
    ``project`` with all the filters."""
    searcher = await Searcher.open(settings)
    try:
        wanted = wanted or SearchFilter(project=project)
        return await searcher.search(query, limit=limit, wanted=wanted, recent_half_life=recent_half_life)
    finally:
        await searcher.aclose()


def provider_suffix(settings: Settings) -> str:
    """The provider's collection name suffix (``local`` or ``voyage``), without loading a model."""
    if settings.provider == "voyage":
        from importer.embed.voyage import VoyageEmbedder

        return VoyageEmbedder.name
    from importer.embed.local import LocalEmbedder

    return LocalEmbedder.name


@dataclass
class QueryModel:
    """Embeds one query; its model loaded once."""

    embed: Callable[[str], Awaitable[list[float]]]
    aclose: Callable[[], Awaitable[None]]


async def _query_model(settings: Settings) -> QueryModel:
    if settings.provider == "voyage":
        from importer.runner import make_embedder

        embedder: Embedder = make_embedder(settings)
    else:
        # Only the tokenizer and one onnxruntime session: no fastembed, no qdrant-client, no pipeline.
        from importer.embed.local import LocalEmbedder

        embedder = await asyncio.to_thread(LocalEmbedder, settings.model_dir, threads=1)
    return QueryModel(embedder.embed_query, embedder.aclose)


def _search_collections(sink: Sink, request: StoreQuery, wanted: SearchFilter) -> list[Hit]:
    names = sink.collections()
    if wanted.project is not None:
        names = [name for name in names if name == sink.collection_for(wanted.project)]
    hits = [_hit(found) for found in _ranked(sink, names, request)]
    return [hit for hit in hits if matches(hit, wanted)]


def _ranked(sink: Sink, names: list[str], request: StoreQuery) -> list[ScoredPayload]:
    """One collection ranks its own points (the store fuses). Over several, fused scores do not compare (each
    collection's first hit scores the same), so each ranking is merged over the collections by its own
    score first, and those are fused here the way the store would."""
    if len(names) == 1:
        return sink.query(names[0], request)
    dense: list[ScoredPayload] = []
    lexical: list[ScoredPayload] = []
    for name in names:
        first, *rest = sink.rankings(name, request)
        dense.extend(first)
        lexical.extend(hit for ranking in rest for hit in ranking)
    dense.sort(key=lambda hit: hit.score, reverse=True)
    if not lexical:  # by meaning only: asked so, or no collection keeps the lexical vector
        return dense[: request.limit]
    lexical.sort(key=lambda hit: hit.score, reverse=True)
    return fuse([dense[: request.candidates], lexical[: request.candidates]], request.limit)


def _hit(found: ScoredPayload) -> Hit:
    payload = found.payload
    text = str(payload.get("text", ""))
    flat = " ".join(text.split())
    return Hit(
        score=found.score,
        project=str(payload.get("project", "")),
        timestamp=str(payload.get("timestamp", "")),
        source=str(payload.get("source", "")),
        chunk_index=int(payload.get("chunk_index", 0)),
        excerpt=flat[:200] + ("…" if len(flat) > 200 else ""),
        text=text,
        conversation_id=str(payload.get("conversation_id", "")),
        start_role=str(payload.get("start_role", "")),
        message_count=int(payload.get("message_count", 0)),
        git_branch=str(payload.get("git_branch", "")),
        is_sidechain=bool(payload.get("is_sidechain", False)),
        tools_used=[str(t) for t in payload.get("tools_used") or []],
        files=[str(f) for f in payload.get("files") or []],
    )


@dataclass
class ConversationMessage:
    role: str
    timestamp: str
    text: str
    #: One of the messages the hit's chunk covers.
    in_hit: bool


def messages_around(settings: Settings, session_file: str, chunk_index: int, around: int) -> list[ConversationMessage]:
    """The text messages of ``session_file`` (relative to ``--source``) covered by chunk ``chunk_index``, and
    ``around`` messages before and after it.

    The chunk is found again by chunking the file the way the import did, with the same settings
    (``--chunk-messages``, ``--max-chunk-chars``): chunking is deterministic, and the payload does not
    record which messages a chunk covers.
    """
    path = session_path(settings, session_file)
    with path.open("rb") as fh:
        report = ParseReport()
        texts = [
            m
            for m in read_messages(fh, 0, report, max_line_bytes=settings.max_line_bytes, consume_partial_tail=True)
            if m.text
        ]
    chunker = Chunker(first_index=0, start=0, max_messages=settings.chunk_messages, max_chars=chunk_chars(settings))
    chunks = [*chunker.feed(texts), *([chunker.tail] if chunker.tail else [])]
    chunk = next((c for c in chunks if c.index == chunk_index), None)
    if chunk is None:
        raise LookupError(f"{session_file} has {len(chunks)} chunks, no chunk {chunk_index}")
    first = next(i for i, m in enumerate(texts) if m.start >= chunk.start)
    last = first + chunk.message_count - 1
    return [
        ConversationMessage(m.role, m.timestamp, m.text, in_hit=first <= i <= last)
        for i, m in enumerate(texts)
        if first - around <= i <= last + around
    ]


def session_path(settings: Settings, session_file: str) -> Path:
    """The file under the source root; never a path outside it (the name comes from a client)."""
    if settings.source is None:
        raise SettingsError("reading a conversation needs --source (IMPORTER_SOURCE): the tree that was imported")
    root = settings.source.resolve()
    path = (root / session_file).resolve()
    if not path.is_relative_to(root) or path.suffix != ".jsonl" or not path.is_file():
        raise LookupError(f"{session_file}: no session file of that name under {root}")
    return path


def chunk_chars(settings: Settings) -> int:
    """The characters per chunk the import used: the setting, else what the provider's model reads."""
    if settings.max_chunk_chars:
        return settings.max_chunk_chars
    if settings.provider == "voyage":
        from importer.embed.voyage import VoyageEmbedder

        return VoyageEmbedder.max_chars
    from importer.embed.local import LOCAL_MAX_CHARS

    return LOCAL_MAX_CHARS
