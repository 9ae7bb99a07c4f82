from __future__ import annotations

import itertools

from importer.chunk import Chunk, Chunker, split_text
from importer.parse import Message


def _messages(*texts: str, tools_at: int | None = None) -> list[Message]:
    out, offset = [], 0
    for i, text in enumerate(texts):
        role = "user" if i % 2 == 0 else "assistant"
        size = len(text) + 50
        out.append(
            Message(
                role=role,
                text=text,
                timestamp=f"2026-01-01T00:00:{i:02d}Z",
                start=offset,
                end=offset + size,
                tools=["Edit"] if i == tools_at else [],
                files=["/a.py"] if i == tools_at else [],
                cwd="/p",
                git_branch="main",
                is_sidechain=False,
            )
        )
        offset += size
    return out


def _chunk(
    messages: list[Message], *, first: int = 0, start: int = 0, n: int = 5, budget: int = 1000
) -> tuple[list[Chunk], Chunker]:
    chunker = Chunker(first_index=first, start=start, max_messages=n, max_chars=budget)
    chunks = list(chunker.feed(messages))
    return chunks, chunker


def test_consecutive_messages_group_by_count_with_an_open_tail() -> None:
    messages = _messages(*[f"message {i}" for i in range(12)])
    chunks, chunker = _chunk(messages)
    assert [(c.index, c.message_count) for c in chunks] == [(0, 5), (1, 5)]
    assert chunks[0].text.startswith("User: message 0\n\nAssistant: message 1")
    assert chunks[0].timestamp == "2026-01-01T00:00:00Z" and chunks[0].start_role == "user"
    tail = chunker.tail
    assert tail is not None and (tail.index, tail.message_count) == (2, 2)
    assert chunker.tail_start == messages[9].end == messages[10].start


def test_no_chunk_exceeds_the_budget_and_long_messages_split_with_overlap() -> None:
    sentences = " ".join(f"Sentence number {i} explains one more detail of the design." for i in range(60))
    messages = _messages("short question", sentences, "thanks")
    chunks, chunker = _chunk(messages, budget=400)
    all_chunks = [*chunks, *([chunker.tail] if chunker.tail else [])]
    assert all(len(c.text) <= 400 for c in all_chunks)
    pieces = [c for c in all_chunks if c.start == messages[1].start]
    assert len(pieces) >= 8 and all(p.message_count == 1 for p in pieces)
    # neighbouring pieces share text, so a sentence cut at a boundary is whole in one of them
    for left, right in itertools.pairwise(pieces):
        assert right.text.split()[0] in left.text
    assert [c.index for c in all_chunks] == list(range(len(all_chunks)))
    assert all_chunks[0].text == "User: short question"


def test_tools_and_files_of_tool_only_turns_join_the_surrounding_chunk() -> None:
    messages = _messages("a", "", "b", tools_at=1)
    chunks, chunker = _chunk(messages)
    assert chunks == []
    tail = chunker.tail
    assert tail is not None and tail.tools == ["Edit"] and tail.files == ["/a.py"]
    assert tail.message_count == 2


def test_resuming_at_the_open_tail_rebuilds_the_same_chunks() -> None:
    """A re-run from the tail's start offset with more messages re-emits the tail chunk, complete,
    with the same index, and the chunks before it are untouched."""
    messages = _messages(*[f"message number {i} " * 8 for i in range(13)])
    whole, whole_chunker = _chunk(messages, budget=300)
    everything = [*whole, *([whole_chunker.tail] if whole_chunker.tail else [])]

    first_part, chunker = _chunk(messages[:7], budget=300)
    tail_start, next_index = chunker.tail_start, chunker.next_index
    resumed_from = next(i for i, m in enumerate(messages) if m.start >= tail_start)
    rest, rest_chunker = _chunk(messages[resumed_from:], first=next_index, start=tail_start, budget=300)
    rebuilt: list[Chunk] = [*first_part, *rest, *([rest_chunker.tail] if rest_chunker.tail else [])]
    assert [(c.index, c.text) for c in rebuilt] == [(c.index, c.text) for c in everything]


def test_split_text_prefers_paragraphs_then_sentences() -> None:
    text = "First paragraph is short.\n\nSecond one. Has two sentences.\n\n" + "word " * 100
    pieces = split_text(text, 60, 10)
    # greedy packing up to the budget, cut where a paragraph ends, not inside a sentence
    assert pieces[0] == "First paragraph is short.\n\nSecond one. Has two sentences."
    assert all(len(p) <= 60 for p in pieces)
    assert "".join(pieces).count("word") >= 100  # nothing lost (overlap may repeat some)
