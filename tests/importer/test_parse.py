from __future__ import annotations

import io
import json
import tracemalloc
from pathlib import Path

from importer.parse import Message, ParseReport, read_messages


def _line(record: dict) -> bytes:
    return json.dumps(record).encode() + b"\n"


def _turn(role: str, content: object, **extra: object) -> bytes:
    return _line({"type": role, "message": {"role": role, "content": content}, "timestamp": "t", **extra})


def _read(data: bytes, start: int = 0, *, settled: bool = False, max_line: int = 1 << 20) -> tuple[list, ParseReport]:
    report = ParseReport()
    messages = list(
        read_messages(io.BytesIO(data), start, report, max_line_bytes=max_line, consume_partial_tail=settled)
    )
    return messages, report


def test_text_comes_from_strings_and_text_blocks_only() -> None:
    data = _turn("user", "plain question") + _turn(
        "assistant",
        [
            {"type": "thinking", "thinking": "secret reasoning"},
            {"type": "text", "text": "the answer"},
            {"type": "tool_use", "name": "Edit", "input": {"file_path": "/src/a.py"}},
            {"type": "tool_use", "name": "Grep", "input": {"path": "/src"}},
        ],
    )
    data += _turn("user", [{"type": "tool_result", "tool_use_id": "x", "content": "tool output"}])
    messages, report = _read(data)
    assert [(m.role, m.text) for m in messages] == [
        ("user", "plain question"),
        ("assistant", "the answer"),
        ("user", ""),
    ]
    assert messages[1].tools == ["Edit", "Grep"]
    assert messages[1].files == ["/src/a.py", "/src"]
    assert report.consumed == len(data) and not report.skipped


def test_non_turn_records_are_ignored_not_counted_as_damage() -> None:
    data = b"".join(
        _line(r)
        for r in (
            {"type": "summary", "summary": "s"},
            {"type": "system", "content": "compacted"},
            {"type": "queue-operation", "operation": "dequeue"},
            {"type": "file-history-snapshot", "snapshot": {}},
            {"type": "something-new", "message": {"role": "user", "content": "no"}},
        )
    )
    messages, report = _read(data)
    assert messages == [] and not report.skipped and report.consumed == len(data)


def test_damage_is_skipped_counted_and_good_records_survive() -> None:
    data = (
        b"\xef\xbb\xbf"
        + _turn("user", "first")
        + b'{"type": "user", "message": {"role": "user", "content": "unterminated\n'
        + b'{"type":"user","message":{"role":"user","content":"caf\xe9 \xff broken"}}\n'
        + b"\n   \n"
        + _line({"type": "user", "message": "not an object"})
        + _line({"type": "assistant", "message": {"role": "assistant", "content": 42}})
        + b"[1, 2]\n"
        + _turn("assistant", [{"type": "text", "text": "second"}])
    )
    messages, report = _read(data)
    assert [m.text for m in messages] == ["first", "second"]
    assert report.skipped == {"bom": 1, "bad_json": 1, "non_utf8": 1, "blank_lines": 2, "bad_shape": 3}


def test_a_last_line_without_newline_waits_until_the_file_settles() -> None:
    complete = _turn("user", "done")
    partial = _turn("assistant", "still being wri")[:-10]
    messages, report = _read(complete + partial)
    assert [m.text for m in messages] == ["done"]
    assert report.partial and report.consumed == len(complete)

    messages, report = _read(complete + partial, settled=True)
    assert [m.text for m in messages] == ["done"]
    assert report.skipped == {"truncated_tail": 1} and not report.partial
    # the cut line stays unconsumed: if its writer completes it, the next run reads it as new
    assert report.consumed == len(complete) and report.unfinished_tail == 1


def test_a_settled_line_cut_inside_a_character_is_a_cut_tail() -> None:
    complete = _turn("user", "done")
    whole = '{"type":"assistant","message":{"role":"assistant","content":"caf\u00e9 au lait"}}\n'.encode()
    cut = whole[: whole.index(b"\xc3") + 1]  # ends with the first byte of a two-byte character
    _, report = _read(complete + cut, settled=True)
    assert report.skipped == {"truncated_tail": 1} and report.consumed == len(complete)


def test_a_complete_last_record_without_newline_is_read_once_settled() -> None:
    data = _turn("user", "final words").rstrip(b"\n")
    assert _read(data)[0] == []
    assert [m.text for m in _read(data, settled=True)[0]] == ["final words"]


def test_an_over_long_line_is_skipped_without_being_held_in_memory() -> None:
    huge = _turn("user", [{"type": "tool_result", "content": "x" * (8 << 20)}])
    data = _turn("user", "before") + huge + _turn("user", "after")
    tracemalloc.start()
    messages, report = _read(data, max_line=64 * 1024)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert [m.text for m in messages] == ["before", "after"]
    assert report.skipped == {"too_long": 1}
    assert peak < 1 << 20, f"reading held {peak} bytes"


def test_resuming_at_an_offset_reads_only_what_follows() -> None:
    first = _turn("user", "one")
    data = first + _turn("assistant", "two")
    messages, _ = _read(data, start=len(first))
    assert [m.text for m in messages] == ["two"]
    assert messages[0].start == len(first) and messages[0].end == len(data)


def test_real_sessions_parse(real_sessions: Path) -> None:
    found: dict[str, list[Message]] = {}
    for path in sorted(real_sessions.glob("*.jsonl")):
        with path.open("rb") as fh:
            report = ParseReport()
            found[path.name] = list(read_messages(fh, 0, report, max_line_bytes=1 << 20, consume_partial_tail=True))
        assert not report.skipped, path.name
    sample = found["sample.jsonl"]
    assert [(m.role, m.text) for m in sample] == [("user", "test message"), ("assistant", "response")]
    assert sample[0].cwd == "/test" and sample[0].git_branch == "main"
    assert all(m.is_sidechain for m in found["agent-session.jsonl"])


def test_a_lone_surrogate_escape_is_replaced_and_the_record_kept() -> None:
    # Node writes "\ud83d" alone when it cuts a text inside an emoji; Python's json accepts the line.
    cut = b'{"type":"user","message":{"role":"user","content":[{"type":"text","text":"before \\ud83d after"},'
    cut += b'{"type":"text","text":"second block \\ud83d\\ude00 paired"}]},"cwd":"/w/\\udc00x","timestamp":"t"}\n'
    json.loads(cut)  # the premise: the record is valid for Python's json
    messages, report = _read(cut + _turn("assistant", "next"))
    assert not report.skipped
    assert [m.text for m in messages] == ["before \ufffd after\n\nsecond block \U0001f600 paired", "next"]
    assert messages[0].cwd == "/w/\ufffdx"
    messages[0].text.encode()  # no surrogate is left to break the embedder or the store


def test_a_nesting_too_deep_for_any_parser_is_bad_json() -> None:
    deep = b'{"type":"user","message":' + b"[" * 200_000 + b"]" * 200_000 + b"}\n"
    _, report = _read(deep + _turn("user", "after"))
    assert report.skipped == {"bad_json": 1}


def test_turns_claude_code_generated_keep_their_tools_but_no_text() -> None:
    summary = "This session is being continued from a previous conversation that ran out of context."
    caveat = "Caveat: The messages below were generated by the user while running local commands."
    data = _turn("user", "why does the login page stay blank in Safari?")
    data += _turn("user", summary, isCompactSummary=True)
    data += _turn("user", caveat, isMeta=True)
    data += _turn("user", "<command-name>/clear</command-name>\n<command-message>clear</command-message>")
    data += _turn("user", "<local-command-stdout>Login successful</local-command-stdout>")
    data += _turn("user", [{"type": "text", "text": "[Request interrupted by user for tool use]"}])
    data += _turn("user", "\n<task-notification>\n<task-id>b1</task-id>\n<status>failed</status>")
    generated_with_a_tool = [{"type": "text", "text": summary}, {"type": "tool_use", "name": "Read"}]
    data += _turn("user", generated_with_a_tool, isCompactSummary=True)
    # The model quoting such a tag is still the model's answer.
    data += _turn("assistant", "<local-command-stdout> is how Claude Code marks a command's output")
    messages, report = _read(data)
    assert [bool(m.text) for m in messages] == [True, False, False, False, False, False, False, False, True]
    assert messages[7].tools == ["Read"] and not report.skipped
