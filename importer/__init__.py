"""Streaming importer: Claude Code conversation logs (JSONL) into Qdrant."""

from importlib.metadata import PackageNotFoundError, version

try:
    # One version for the project (pyproject.toml), read from the installed distribution.
    __version__ = version("reflection-operator")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"
