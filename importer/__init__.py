"""Streaming importer: Claude Code conversation logs (JSONL) into Qdrant."""

__version__ = "0.1.0"
