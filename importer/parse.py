"""Stream-parse one Claude Code session file into text messages, never holding the whole file.

Every damaged line is skipped and counted by reason; nothing that parses is lost. A last line without
a newline is a record still being written: it is left for the next run unless the file has been quiet
for the settle time.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import orjson

BOM = b"\xef\xbb\xbf"
#: Records of these types are turns of the conversation; everything else (summary, system,
#: queue-operation, file-history-snapshot, unknown types) is not embedded.
TURN_TYPES = frozenset({"user", "assistant"})
_SKIP_BLOCK = 64 * 1024
#: How the turns that Claude Code writes itself begin: a slash command's invocation and what it printed, a
#: shell command's output, a background task's notice, an interruption. Nobody searches for them, and
#: they would win searches they should not; their tools and files still count.
_GENERATED_STARTS = (
    "<command-name>",
    "<command-message>",
    "<local-command-stdout>",
    "<local-command-stderr>",
    "<bash-stdout>",
    "<bash-stderr>",
    "<task-notification>",
    "[Request interrupted by user",
)
#: A UTF-16 surrogate left alone in a decoded string: Python's json decodes a paired escape
#: ("\\ud83d\\ude00") to one character, so any surrogate it leaves in a string is unpaired.
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass(slots=True)
class Message:
    """One user or assistant turn. ``text`` is empty for turns that only use tools and for turns Claude Code
    generated (:func:`is_generated`)."""

    role: str
    text: str
    timestamp: str
    #: Byte offsets of the record: where its line starts and just past its newline.
    start: int
    end: int
    tools: list[str]
    files: list[str]
    cwd: str
    git_branch: str
    is_sidechain: bool


@dataclass
class ParseReport:
    """What reading one file found, beyond its messages."""

    #: Offset just past the last complete line consumed.
    consumed: int = 0
    #: True when an incomplete last line was left for a later run.
    partial: bool = False
    #: 1 when the file is settled but its last line is cut: counted as ``truncated_tail`` and left
    #: unconsumed, so that if its writer ever completes it, the completed record is read as new.
    unfinished_tail: int = 0
    skipped: Counter[str] = field(default_factory=Counter)


class BadShape(ValueError):
    """A JSON record whose structure is not that of a conversation turn."""


def read_messages(
    fh: BinaryIO,
    start: int,
    report: ParseReport,
    *,
    max_line_bytes: int,
    consume_partial_tail: bool,
    count_skips_from: int = 0,
) -> Iterator[Message]:
    """Yield the turns of the file from byte ``start`` on, updating ``report`` as lines are consumed.

    Damaged lines before ``count_skips_from`` were counted by an earlier run (which re-reads a file's
    open tail chunk) and are not counted again. With ``consume_partial_tail`` (the file is settled) a
    last line without a newline is final: a complete record is read, a cut one is counted.
    """
    fh.seek(start)
    offset = start
    report.consumed = start
    if start == 0:
        head = fh.read(len(BOM))
        if head == BOM:
            report.skipped["bom"] += 1
            offset = len(BOM)
        fh.seek(offset)
    while True:
        line = fh.readline(max_line_bytes + 1)
        if not line:
            return
        line_start, offset = offset, offset + len(line)
        tally = report.skipped if line_start >= count_skips_from else Counter[str]()
        if not line.endswith(b"\n"):
            if len(line) > max_line_bytes:
                offset += _skip_rest_of_line(fh)
                tally["too_long"] += 1
                report.consumed = offset
                continue
            if not consume_partial_tail:
                report.partial = True
                return
            return (yield from _read_last_line(line, line_start, offset, report, tally))
        report.consumed = offset
        message = _parse_line(line, line_start, offset, tally)
        if message is not None:
            yield message


def _read_last_line(line: bytes, start: int, end: int, report: ParseReport, tally: Counter[str]) -> Iterator[Message]:
    """A settled file's last line without a newline: consumed if it is a whole record, else counted
    and left where it is (its start stays ``consumed``)."""
    cut_before = tally["truncated_tail"]
    message = _parse_line(line, start, end, tally)
    if tally["truncated_tail"] > cut_before:
        report.unfinished_tail = 1
        return
    report.consumed = end
    if message is not None:
        yield message


def _skip_rest_of_line(fh: BinaryIO) -> int:
    """Read past the end of an over-long line in small blocks; return how many bytes were skipped."""
    skipped = 0
    while True:
        block = fh.readline(_SKIP_BLOCK)
        skipped += len(block)
        if not block or block.endswith(b"\n"):
            return skipped


def _parse_line(line: bytes, start: int, end: int, tally: Counter[str]) -> Message | None:
    if not line.strip():
        tally["blank_lines"] += 1
        return None
    try:
        record = _decode(line)
    except (ValueError, RecursionError):
        tally[_undecodable_reason(line)] += 1
        return None
    if not isinstance(record, dict):
        tally["bad_shape"] += 1
        return None
    if record.get("type") not in TURN_TYPES:
        return None
    try:
        return _to_message(record, start, end)
    except BadShape:
        tally["bad_shape"] += 1
        return None


def _decode(line: bytes) -> Any:
    try:
        return orjson.loads(line)
    except orjson.JSONDecodeError:
        pass
    # orjson rejects an unpaired surrogate escape ("\\ud83d"), which Node writes when it cuts a text
    # inside an emoji; Python's json accepts it. Only lines orjson refused pay for this second parse.
    return _replace_lone_surrogates(json.loads(line))


def _replace_lone_surrogates(value: Any) -> Any:
    """The decoded record with each unpaired surrogate replaced by U+FFFD: such a string cannot be
    encoded as UTF-8, so it could be neither embedded nor stored."""
    if isinstance(value, str):
        return _LONE_SURROGATE.sub("\ufffd", value)
    if isinstance(value, list):
        return [_replace_lone_surrogates(v) for v in value]
    if isinstance(value, dict):
        return {_replace_lone_surrogates(k): _replace_lone_surrogates(v) for k, v in value.items()}
    return value


def _undecodable_reason(line: bytes) -> str:
    complete = line.endswith(b"\n")
    try:
        line.decode("utf-8")
    except UnicodeDecodeError as error:
        # a line cut inside a multi-byte character is cut, not mis-encoded
        if complete or error.end < len(line):
            return "non_utf8"
    return "bad_json" if complete else "truncated_tail"


def _to_message(record: dict[str, Any], start: int, end: int) -> Message:
    message = record.get("message")
    if not isinstance(message, dict):
        raise BadShape("message is not an object")
    role = message.get("role", record["type"])
    if role not in TURN_TYPES:
        raise BadShape(f"unexpected role {role!r}")
    texts, tools, files = _read_content(message.get("content"))
    text = "\n\n".join(texts)
    return Message(
        role=role,
        text="" if is_generated(record, text) else text,
        timestamp=_str(record.get("timestamp")),
        start=start,
        end=end,
        tools=tools,
        files=files,
        cwd=_str(record.get("cwd")),
        git_branch=_str(record.get("gitBranch")),
        is_sidechain=record.get("isSidechain") is True,
    )


def is_generated(record: dict[str, Any], text: str) -> bool:
    """A turn Claude Code wrote, not a person or the model: a compaction's summary of the conversation so
    far (it repeats everything, so it would outrank the moment itself), a meta note ("Caveat: the messages
    below were generated by the user while running local commands"), or a user turn starting as above."""
    if record.get("isCompactSummary") is True or record.get("isMeta") is True:
        return True
    return record.get("type") == "user" and text.lstrip().startswith(_GENERATED_STARTS)


def _read_content(content: Any) -> tuple[list[str], list[str], list[str]]:
    """Text to embed, tools used and files touched. Thinking and tool results are not embedded."""
    if isinstance(content, str):
        return ([content] if content.strip() else []), [], []
    if not isinstance(content, list):
        raise BadShape("content is neither a string nor a list of blocks")
    texts: list[str] = []
    tools: list[str] = []
    files: list[str] = []
    for block in content:
        if not isinstance(block, dict):
            raise BadShape("a content block is not an object")
        kind = block.get("type")
        if kind == "text" and isinstance(block.get("text"), str) and block["text"].strip():
            texts.append(block["text"])
        elif kind == "tool_use":
            tools.append(_str(block.get("name")))
            tool_input = block.get("input")
            if isinstance(tool_input, dict):
                path = tool_input.get("file_path") or tool_input.get("path")
                if isinstance(path, str) and path:
                    files.append(path)
    return texts, tools, files


def _str(value: Any) -> str:
    return value if isinstance(value, str) else ""


def is_settled(mtime: float, settle_seconds: float, now: float | None = None) -> bool:
    """A file untouched for ``settle_seconds`` is no longer being written: its last line is final."""
    return ((now if now is not None else time.time()) - mtime) >= settle_seconds
