"""Importer state kept in ConfigMaps, so a Job that dies resumes where the last one stopped.

Layout (the operator relies on it):

* ``<base>-<n>`` holds, in ``binaryData["state.json.gz"]``, gzip-compressed JSON
  ``{relative path: FileState.to_json()}`` for the paths whose :func:`bucket_index` is ``n``.
* ``<base>-0`` records the bucket count in the annotation ``reflection.dev/state-buckets`` and carries
  ``data["summary"]``: ``{"shard-<i>": ShardSummary.to_json()}``, one entry per job shard.
* Labels: ``app.kubernetes.io/managed-by``, ``reflection.dev/importrun``, ``reflection.dev/state-bucket``.
  Buckets this store creates copy ``<base>-0``'s ownerReferences (the operator sets the one to the ImportRun).

How the bucket count grows without a lock, while several writers save at once:

* Counts are powers of two and only grow, so the buckets a path has under the counts 1, 2, 4, … (its *chain*:
  ``h mod 1``, ``h mod 2``, ``h mod 4``, …) never go down. Every bucket is annotated with the count it was
  written under, and a writer's count only grows: so the copies of a path that one writer leaves behind sit
  higher up the chain the newer they are, and :meth:`ConfigMapStateStore.load` lets the highest one win.
* A writer that finds a bucket annotated with a larger count than its own adopts it and re-plans its save. One
  that finds a smaller count first *marks* the bucket (annotation only, with the resourceVersion read: a
  slower writer's update then fails with 409 and it re-reads the new count), then copies each entry that no
  longer belongs there one step up its chain, to the next bucket it had under a larger count, unless that
  bucket already holds the path (that copy is newer), and only then removes it from the old bucket. Moving
  one step at a time, an old copy can never jump over a newer one that a writer with an older count put in
  between; the bucket it lands in moves it on the same way.
* Before writing under a larger count, a writer marks ``<base>-0`` first, so ``<base>-0``'s annotation
  always covers every bucket that exists: a reader reads buckets ``0..count-1`` in ascending order (entries
  only ever move up) and never misses one.

All network I/O is synchronous (the pipeline calls it through ``asyncio.to_thread``); a lock makes one
instance safe to share between threads. Only ``get``, ``create`` and ``update`` on ConfigMaps are used.
"""

from __future__ import annotations

import base64
import copy
import gzip
import hashlib
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import urllib3
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException
from tenacity import (
    RetryError,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential,
)

from importer.contract import (
    ANNOTATION_STATE_BUCKETS,
    LABEL_IMPORTRUN,
    LABEL_MANAGED_BY,
    LABEL_STATE_BUCKET,
    MANAGED_BY,
    SUMMARY_KEY,
    ShardSummary,
    summary_key,
)
from importer.state.base import FileState, read_entries, read_summary

log = logging.getLogger(__name__)

STATE_KEY = "state.json.gz"

#: Largest compressed payload per bucket. A ConfigMap holds at most 1 MiB; base64 in the JSON body, the
#: summary and the metadata must fit beside it.
DEFAULT_BUCKET_LIMIT = 700 * 1024
#: A bucket count beyond this means something is wrong (4096 × 700 KiB is ~2.8 GiB of compressed state).
MAX_BUCKETS = 4096
#: How many 409 Conflicts one bucket write tolerates before giving up (each one means another writer won).
MAX_CONFLICTS = 200
#: When a bucket overflows, grow until the estimated payload per bucket is at most this share of the limit,
#: so a big first save does not double the count one step at a time.
GROWTH_TARGET = 0.6

TRANSIENT_STATUSES = frozenset({0, 408, 429, 500, 502, 503, 504})

T = TypeVar("T")


class StateStoreError(RuntimeError):
    """The ConfigMap state could not be read or written."""


class StateSaveError(StateStoreError):
    """A checkpoint was not saved; nothing of it may be treated as acknowledged."""


class StateLoadError(StateStoreError):
    """The saved state could not be read."""


class _ApiFailure(Exception):
    """An API call was refused (403, 422, …) or kept failing transiently until the retry budget ran out."""

    def __init__(self, configmap: str, operation: str, last_error: BaseException) -> None:
        super().__init__(f"{operation} ConfigMap {configmap}: {describe_error(last_error)}")
        self.configmap = configmap


class _Corrupt(Exception):
    """A bucket's payload cannot be decoded; we neither trust nor overwrite it."""


class _LayoutChanged(Exception):
    """Some bucket was written under a larger bucket count than this writer knew."""

    def __init__(self, count: int) -> None:
        super().__init__(count)
        self.count = count


class _BucketFull(Exception):
    """A bucket's payload would pass the size limit under the current count."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.size = size


def path_hash(path: str) -> int:
    """First 8 bytes (big-endian) of the sha256 of the path's UTF-8 bytes (undecodable bytes kept as is)."""
    digest = hashlib.sha256(path.encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big")


def bucket_index(path: str, count: int) -> int:
    """The bucket of ``path`` among ``count``."""
    return path_hash(path) % count


def next_bucket(path: str, index: int, count: int) -> int:
    """The next bucket up the chain of ``path`` (stored in bucket ``index``) under at most ``count`` buckets;
    ``index`` itself when the path belongs there under ``count``."""
    digest = path_hash(path)
    candidate = 1
    while candidate <= index:
        candidate *= 2
    while candidate <= count:
        if digest % candidate != index:
            return digest % candidate
        candidate *= 2
    return index


def encode_entries(entries: Mapping[str, Any]) -> bytes:
    """Compact, key-sorted JSON, gzip-compressed with a fixed mtime so equal state gives equal bytes."""
    raw = json.dumps(entries, separators=(",", ":"), sort_keys=True).encode()
    return gzip.compress(raw, compresslevel=6, mtime=0)


def decode_entries(payload: bytes) -> dict[str, Any]:
    data = json.loads(gzip.decompress(payload))
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object, got {type(data).__name__}")
    return data


def describe_error(error: BaseException) -> str:
    if isinstance(error, ApiException):
        return f"HTTP {error.status} {error.reason}"
    return f"{type(error).__name__}: {error}"


def is_transient(error: BaseException) -> bool:
    """Errors worth retrying: the API is unreachable, slow, overloaded or failing inside."""
    if isinstance(error, ApiException):
        return error.status in TRANSIENT_STATUSES or error.status is None
    return isinstance(error, urllib3.exceptions.HTTPError | OSError)


def configmap_name(base: str, index: int) -> str:
    return f"{base}-{index}"


def read_summaries(api: client.CoreV1Api, name: str, namespace: str) -> dict[str, dict[str, Any]]:
    """The per-shard summaries in ``<name>-0`` (``{"shard-<i>": ShardSummary.to_json()}``); empty when absent."""
    try:
        bucket0 = api.read_namespaced_config_map(configmap_name(name, 0), namespace)
    except ApiException as error:
        if error.status == 404:
            return {}
        raise
    return _summaries_of(bucket0)


def _summaries_of(cm: client.V1ConfigMap) -> dict[str, dict[str, Any]]:
    text = (cm.data or {}).get(SUMMARY_KEY)
    if not text:
        return {}
    try:
        parsed = json.loads(text)
    except ValueError:
        log.warning("ConfigMap %s has an unreadable summary; it will be replaced", _meta(cm).name)
        return {}
    return parsed if isinstance(parsed, dict) else {}


def _meta(cm: client.V1ConfigMap) -> client.V1ObjectMeta:
    """Metadata of an object read from the API server, which always has some."""
    assert cm.metadata is not None
    return cm.metadata


def _bucket_count_of(cm: client.V1ConfigMap) -> int:
    """The count a bucket was written under; 1 when unset (``<base>-0`` pre-created by the operator)."""
    value = (_meta(cm).annotations or {}).get(ANNOTATION_STATE_BUCKETS, "1")
    try:
        count = int(value)
    except ValueError as error:
        raise _Corrupt(f"annotation {ANNOTATION_STATE_BUCKETS}={value!r} is not a number") from error
    if count < 1 or count & (count - 1):
        raise _Corrupt(f"annotation {ANNOTATION_STATE_BUCKETS}={value!r} is not a power of two")
    return count


def _entries_of(cm: client.V1ConfigMap) -> dict[str, Any]:
    encoded = (cm.binary_data or {}).get(STATE_KEY)
    if not encoded:
        return {}
    try:
        return decode_entries(base64.b64decode(encoded))
    except (ValueError, OSError, EOFError) as error:
        raise _Corrupt(f"{STATE_KEY} cannot be decoded: {error}") from error


class ConfigMapStateStore:
    """A :class:`~importer.state.base.StateStore` spread over ConfigMaps ``<name>-0``, ``<name>-1``, …"""

    def __init__(
        self,
        name: str,
        namespace: str,
        *,
        run_name: str = "",
        shard_index: int = 0,
        api: client.CoreV1Api | None = None,
        max_attempts: int = 8,
        retry_timeout: float = 45.0,
        request_timeout: tuple[float, float] = (5.0, 30.0),
        bucket_limit: int = DEFAULT_BUCKET_LIMIT,
    ) -> None:
        self.name = name
        self.namespace = namespace
        self.run_name = run_name
        self.shard_index = shard_index
        self.api = api if api is not None else client.CoreV1Api()
        self.max_attempts = max_attempts
        self.retry_timeout = retry_timeout
        self.request_timeout = request_timeout
        self.bucket_limit = bucket_limit
        self._lock = threading.Lock()
        #: The largest bucket count this writer has seen or chosen; only grows.
        self._count = 1
        #: The count ``<base>-0`` was last seen to announce; below ``_count`` until we have marked it.
        self._announced = 0
        #: The last version of each bucket we read or wrote: updates try it first and a 409 refreshes it,
        #: so a lone writer uploads a bucket without downloading it again first.
        self._cache: dict[int, client.V1ConfigMap] = {}
        self._owner_references: list[client.V1OwnerReference] = []
        #: This shard's summary in ``<base>-0`` as the last load found it (raw JSON).
        self._saved_summary: Any = None

    @classmethod
    def from_environment(cls, name: str, namespace: str, **kwargs: Any) -> ConfigMapStateStore:
        """A store using the in-cluster service account, else ``$KUBECONFIG`` or ``~/.kube/config``."""
        configuration = client.Configuration()
        try:
            config.load_incluster_config(client_configuration=configuration)
        except ConfigException:
            # Read $KUBECONFIG now: the client's own default was fixed when it was imported.
            config.load_kube_config(config_file=os.environ.get("KUBECONFIG"), client_configuration=configuration)
        api = client.CoreV1Api(client.ApiClient(configuration))
        return cls(name, namespace, api=api, **kwargs)

    @property
    def bucket_count(self) -> int:
        return self._count

    # -- the StateStore interface ----------------------------------------------------------------------------

    def load(self) -> dict[str, FileState]:
        """Every entry of every bucket; of two copies of a path, the one in the higher bucket wins."""
        with self._lock:
            try:
                raw = self._load_raw()
            except _ApiFailure as error:
                raise StateLoadError(str(error)) from error
            except _Corrupt as error:
                raise StateLoadError(f"ConfigMap state {self.namespace}/{self.name}: {error}") from error
        return read_entries(raw)

    def saved_summary(self) -> ShardSummary | None:
        return read_summary(self._saved_summary)

    def save(self, files: dict[str, FileState], summary: ShardSummary) -> None:
        """Merge ``files`` (the entries changed since the last save) into their buckets and replace this
        shard's summary in ``<base>-0``. Raises :class:`StateSaveError` when that cannot be done."""
        changed = {path: state.to_json() for path, state in files.items()}
        with self._lock:
            try:
                self._save_until_layout_settles(changed, summary.to_json())
            except _ApiFailure as error:
                raise StateSaveError(str(error)) from error
            except _Corrupt as error:
                raise StateSaveError(f"ConfigMap state {self.namespace}/{self.name}: {error}") from error

    # -- loading ---------------------------------------------------------------------------------------------

    def _load_raw(self) -> dict[str, Any]:
        entries: dict[str, Any] = {}
        count = 1
        index = 0
        self._saved_summary = None
        # Ascending order: a bucket emptied by a concurrent growth is marked before it is emptied, so we then
        # see the larger count and go on to read the higher buckets its entries were copied to.
        while index < count:
            cm = self._get(index)
            if cm is not None:
                count = max(count, _bucket_count_of(cm))
                entries.update(_entries_of(cm))
                if index == 0:
                    self._note_bucket0(cm)
                    self._saved_summary = _summaries_of(cm).get(summary_key(self.shard_index))
            index += 1
        self._count = max(self._count, count)
        return entries

    # -- saving ----------------------------------------------------------------------------------------------

    def _save_until_layout_settles(self, changed: dict[str, Any], summary: dict[str, Any]) -> None:
        while True:
            try:
                self._save_under_current_count(changed, summary)
                return
            except _LayoutChanged as news:
                log.info("state %s: another writer uses %d buckets; re-planning", self.name, news.count)
                self._count = max(self._count, news.count)
            except _BucketFull as full:
                self._grow(full.size)

    def _grow(self, payload_size: int) -> None:
        factor = max(2, 2 ** math.ceil(math.log2(payload_size / (self.bucket_limit * GROWTH_TARGET))))
        grown = self._count * factor
        if grown > MAX_BUCKETS:
            raise StateSaveError(
                f"ConfigMap state {self.namespace}/{self.name} would need {grown} buckets (max {MAX_BUCKETS})"
            )
        log.info("state %s: a bucket would hold %d bytes; growing to %d buckets", self.name, payload_size, grown)
        self._count = grown

    def _save_under_current_count(self, changed: dict[str, Any], summary: dict[str, Any]) -> None:
        count = self._count
        if self._announced < count:
            # Mark <base>-0 with the new count before any bucket beyond the old count can exist.
            self._write(0, {}, count)
        by_bucket: dict[int, dict[str, Any]] = {}
        for path, entry in changed.items():
            by_bucket.setdefault(bucket_index(path, count), {})[path] = entry
        for index in sorted(by_bucket):
            if index != 0:
                self._write(index, by_bucket[index], count)
        # <base>-0 last: the summary then never claims more than the entries already saved.
        self._write(0, by_bucket.get(0, {}), count, summary=summary)

    def _write(
        self,
        index: int,
        entries: dict[str, Any],
        count: int,
        *,
        summary: dict[str, Any] | None = None,
        only_absent: bool = False,
        remove: dict[str, Any] | None = None,
    ) -> None:
        """Read bucket ``index``, merge ``entries`` over it (or only where absent), drop the entries of
        ``remove`` that are still unchanged, set our summary, and update with the resourceVersion read;
        re-read and redo on 409 Conflict."""
        redistributed = False
        for _ in range(MAX_CONFLICTS):
            cm = self._read(index)
            if cm is None:
                if self._create(index, entries, count, summary):
                    self._settle_moved_entries(index, entries, count, only_absent)
                    return
                continue
            stored_count = _bucket_count_of(cm)
            if index == 0:
                self._note_bucket0(cm)
            if stored_count > count:
                raise _LayoutChanged(stored_count)
            stored = _entries_of(cm)
            misplaced = {p: e for p, e in stored.items() if bucket_index(p, count) != index}
            # Once per call for leftovers (e.g. of a growth cut short), or whenever the bucket's count is old.
            if stored_count < count or (misplaced and remove is None and not redistributed):
                self._redistribute(index, cm, stored_count, misplaced, count)
                redistributed = True
                continue
            if self._merge_and_update(index, cm, stored, entries, count, summary, only_absent, remove):
                self._settle_moved_entries(index, entries, count, only_absent)
                return
        raise StateSaveError(
            f"ConfigMap {self.namespace}/{configmap_name(self.name, index)}: "
            f"still conflicting after {MAX_CONFLICTS} attempts"
        )

    def _settle_moved_entries(self, index: int, entries: dict[str, Any], count: int, moved: bool) -> None:
        """Entries moved here one step up their chain may have further to go: send them on."""
        if moved and any(bucket_index(path, count) != index for path in entries):
            self._write(index, {}, count)

    def _merge_and_update(
        self,
        index: int,
        cm: client.V1ConfigMap,
        stored: dict[str, Any],
        entries: dict[str, Any],
        count: int,
        summary: dict[str, Any] | None,
        only_absent: bool,
        remove: dict[str, Any] | None,
    ) -> bool:
        """One optimistic update; False when another writer got there first (the caller re-reads)."""
        merged = dict(stored)
        for path, entry in entries.items():
            if not (only_absent and path in merged):
                merged[path] = entry
        for path, entry in (remove or {}).items():
            if merged.get(path) == entry:
                del merged[path]
        summaries: dict[str, Any] | None = None
        if summary is not None:
            summaries = _summaries_of(cm)
            if summaries.get(summary_key(self.shard_index)) == summary:
                summaries = None
            else:
                summaries[summary_key(self.shard_index)] = summary
        if merged == stored and summaries is None and not self._labels_missing(cm, index):
            return True
        payload = encode_entries(merged)
        if len(payload) > self.bucket_limit:
            raise _BucketFull(len(payload))
        return self._update(index, cm, payload, count, summaries)

    def _redistribute(
        self,
        index: int,
        cm: client.V1ConfigMap,
        stored_count: int,
        misplaced: dict[str, Any],
        count: int,
    ) -> None:
        """Bring bucket ``index`` from ``stored_count`` to ``count`` buckets: mark it, copy the entries that
        belong elsewhere now one step up their chain, then remove them here. Returns early if another writer
        intervened."""
        if stored_count < count:
            # Marking freezes the misplaced entries: from now on a writer that updates this bucket has
            # seen the new count and puts such paths in their new buckets.
            encoded = (cm.binary_data or {}).get(STATE_KEY)
            payload = base64.b64decode(encoded) if encoded else encode_entries({})
            if not self._update(index, cm, payload, count, None):
                return
        if not misplaced:
            return
        by_target: dict[int, dict[str, Any]] = {}
        for path, entry in misplaced.items():
            by_target.setdefault(next_bucket(path, index, count), {})[path] = entry
        for target in sorted(by_target):
            # A copy already in the next bucket up the chain is newer than ours: it stays.
            self._write(target, by_target[target], count, only_absent=True)
        self._write(index, {}, count, remove=misplaced)

    # -- single API operations -------------------------------------------------------------------------------

    def _read(self, index: int) -> client.V1ConfigMap | None:
        cached = self._cache.get(index)
        return cached if cached is not None else self._get(index)

    def _get(self, index: int) -> client.V1ConfigMap | None:
        name = configmap_name(self.name, index)
        try:
            cm = self._call(
                "read",
                name,
                lambda: self.api.read_namespaced_config_map(
                    name, self.namespace, _request_timeout=self.request_timeout
                ),
            )
        except ApiException as error:
            if error.status == 404:
                self._cache.pop(index, None)
                return None
            raise _ApiFailure(f"{self.namespace}/{name}", "read", error) from error
        self._cache[index] = cm
        return cm

    def _create(self, index: int, entries: dict[str, Any], count: int, summary: dict[str, Any] | None) -> bool:
        """Create bucket ``index``; False when another writer created it first."""
        name = configmap_name(self.name, index)
        payload = encode_entries(entries)
        if len(payload) > self.bucket_limit:
            raise _BucketFull(len(payload))
        summaries = None if summary is None else {summary_key(self.shard_index): summary}
        body = client.V1ConfigMap(
            api_version="v1",
            kind="ConfigMap",
            metadata=client.V1ObjectMeta(
                name=name,
                namespace=self.namespace,
                labels=self._labels(index),
                annotations={ANNOTATION_STATE_BUCKETS: str(count)},
                # <base>-0 is the operator's (or ours); the other buckets follow it, to be collected with it.
                owner_references=self._owner_references if index != 0 and self._owner_references else None,
            ),
            binary_data={STATE_KEY: base64.b64encode(payload).decode()},
            data=None if summaries is None else {SUMMARY_KEY: json.dumps(summaries, sort_keys=True)},
        )
        try:
            created = self._call(
                "create",
                name,
                lambda: self.api.create_namespaced_config_map(
                    self.namespace, body, _request_timeout=self.request_timeout
                ),
            )
        except ApiException as error:
            if error.status == 409:
                self._cache.pop(index, None)
                return False
            raise _ApiFailure(f"{self.namespace}/{name}", "create", error) from error
        self._remember(index, created)
        return True

    def _update(
        self,
        index: int,
        cm: client.V1ConfigMap,
        payload: bytes,
        count: int,
        summaries: dict[str, Any] | None,
    ) -> bool:
        """Replace bucket ``index`` as read in ``cm`` (its resourceVersion guards the update); False on 409
        Conflict or 404 (deleted meanwhile): the caller re-reads."""
        name = configmap_name(self.name, index)
        metadata = copy.copy(_meta(cm))
        metadata.managed_fields = None
        metadata.labels = {**(metadata.labels or {}), **self._labels(index)}
        metadata.annotations = {**(metadata.annotations or {}), ANNOTATION_STATE_BUCKETS: str(count)}
        data = dict(cm.data or {})
        if summaries is not None:
            data[SUMMARY_KEY] = json.dumps(summaries, sort_keys=True)
        body = client.V1ConfigMap(
            api_version="v1",
            kind="ConfigMap",
            metadata=metadata,
            binary_data={**(cm.binary_data or {}), STATE_KEY: base64.b64encode(payload).decode()},
            data=data or None,
        )
        try:
            updated = self._call(
                "update",
                name,
                lambda: self.api.replace_namespaced_config_map(
                    name, self.namespace, body, _request_timeout=self.request_timeout
                ),
            )
        except ApiException as error:
            if error.status in (404, 409):
                self._cache.pop(index, None)
                return False
            raise _ApiFailure(f"{self.namespace}/{name}", "update", error) from error
        self._remember(index, updated)
        return True

    def _call(self, operation: str, name: str, request: Callable[[], T]) -> T:
        """Run one request, retrying transient failures with exponential backoff within a bounded budget.
        Non-transient API errors (404, 409, 403, …) come back to the caller at once."""
        retrying = Retrying(
            retry=retry_if_exception(is_transient),
            stop=stop_after_attempt(self.max_attempts) | stop_after_delay(self.retry_timeout),
            wait=wait_exponential(multiplier=0.25, max=8.0),
            before_sleep=lambda state: log.warning(
                "%s ConfigMap %s failed (attempt %d): %s; retrying",
                operation,
                name,
                state.attempt_number,
                describe_error(state.outcome.exception() or RuntimeError()) if state.outcome else "?",
            ),
        )
        started = time.monotonic()
        try:
            return retrying(request)
        except RetryError as gave_up:
            last = gave_up.last_attempt.exception()
            assert last is not None
            attempts, elapsed = gave_up.last_attempt.attempt_number, time.monotonic() - started
            given_up = f"{operation} (gave up after {attempts} attempts, {elapsed:.1f} s)"
            raise _ApiFailure(f"{self.namespace}/{name}", given_up, last) from last

    # -- metadata --------------------------------------------------------------------------------------------

    def _labels(self, index: int) -> dict[str, str]:
        labels = {LABEL_MANAGED_BY: MANAGED_BY, LABEL_STATE_BUCKET: str(index)}
        if self.run_name:
            labels[LABEL_IMPORTRUN] = self.run_name
        return labels

    def _labels_missing(self, cm: client.V1ConfigMap, index: int) -> bool:
        present = _meta(cm).labels or {}
        return any(present.get(key) != value for key, value in self._labels(index).items())

    def _remember(self, index: int, cm: client.V1ConfigMap) -> None:
        self._cache[index] = cm
        if index == 0:
            self._note_bucket0(cm)

    def _note_bucket0(self, cm: client.V1ConfigMap) -> None:
        """Track what ``<base>-0`` announces and the ownerReferences new buckets inherit from it."""
        self._announced = max(self._announced, _bucket_count_of(cm))
        self._owner_references = list(_meta(cm).owner_references or [])
