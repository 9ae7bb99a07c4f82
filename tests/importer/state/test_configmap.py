"""The ConfigMap state backend, against the real kube-apiserver of the local control plane."""

from __future__ import annotations

import base64
import json
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import urllib3
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from importer.contract import (
    ANNOTATION_STATE_BUCKETS,
    LABEL_IMPORTRUN,
    LABEL_MANAGED_BY,
    LABEL_STATE_BUCKET,
    ShardSummary,
)
from importer.state.base import FileState
from importer.state.configmap import (
    STATE_KEY,
    ConfigMapStateStore,
    StateLoadError,
    StateSaveError,
    bucket_index,
    decode_entries,
    encode_entries,
    next_bucket,
    read_summaries,
)
from tests.polling import wait_for

MiB = 1024 * 1024


# -- pure logic ----------------------------------------------------------------------------------------------


def test_bucket_index_is_the_documented_stable_hash() -> None:
    # sha256("-home-user-proj/0a1b.jsonl") starts 4200e68a4783c44f: the operator and future versions rely
    # on exactly this function, so pin it.
    path = "-home-user-proj/0a1b.jsonl"
    assert [bucket_index(path, n) for n in (1, 2, 16, 1024)] == [0, 1, 15, 0x4200E68A4783C44F % 1024]
    assert bucket_index("ü/é.jsonl", 1024) == 967


def test_doubling_the_count_only_moves_a_path_up_by_the_old_count() -> None:
    # The growth protocol rests on this: under 2C a path stays in its bucket b or moves to b + C.
    rng = random.Random(7)
    for _ in range(2000):
        path = f"p{rng.random()}/{uuid.UUID(int=rng.getrandbits(128))}.jsonl"
        for count in (1, 2, 8, 64):
            old, new = bucket_index(path, count), bucket_index(path, 2 * count)
            assert new in (old, old + count)


def test_next_bucket_is_the_next_step_up_the_chain() -> None:
    rng = random.Random(8)
    for _ in range(2000):
        path = f"{uuid.UUID(int=rng.getrandbits(128))}.jsonl"
        chain = [bucket_index(path, 2**k) for k in range(11)]  # counts 1 … 1024
        steps = sorted(set(chain))
        for here, above in zip(steps, [*steps[1:], steps[-1]], strict=True):
            assert next_bucket(path, here, 1024) == above
        assert next_bucket(path, chain[3], 8) == chain[3]  # at home under 8 buckets


def path_with_chain(chain: list[int]) -> str:
    """A path whose buckets under 1, 2, 4, … buckets are ``chain``."""
    for i in range(10_000):
        path = f"chosen-{i}.jsonl"
        if [bucket_index(path, 2**k) for k in range(len(chain))] == chain:
            return path
    raise AssertionError(chain)


def test_payload_round_trips_and_is_deterministic() -> None:
    entries = {"a.jsonl": FileState(size=3, skipped={"bad_json": 1}).to_json(), "b/ü.jsonl": {}}
    assert decode_entries(encode_entries(entries)) == entries
    assert encode_entries(entries) == encode_entries(dict(reversed(entries.items())))


# -- helpers -------------------------------------------------------------------------------------------------


def core(kube_api: client.ApiClient) -> client.CoreV1Api:
    return client.CoreV1Api(kube_api)


def make_files(count: int, seed: int = 1, prefix: str = "") -> dict[str, FileState]:
    """Realistic entries: project directories holding session files named by UUID."""
    rng = random.Random(seed)
    files = {}
    for i in range(count):
        session = uuid.UUID(int=rng.getrandbits(128))
        path = f"{prefix}-home-user-work-project-{i % 300}/{session}.jsonl"
        size = rng.randrange(1_000, 5_000_000)
        files[path] = FileState(
            size=size,
            mtime=1_700_000_000 + rng.random() * 10_000_000,
            head_hash=f"{rng.getrandbits(64):016x}",
            consumed=size,
            offset=size - rng.randrange(0, 1000),
            next_chunk=rng.randrange(0, 400),
            project=f"-home-user-work-project-{i % 300}",
            messages=rng.randrange(0, 3000),
            chunks=rng.randrange(0, 400),
            skipped={"bad_json": 1} if i % 50 == 0 else {},
        )
    return files


def summary_of(files: dict[str, FileState], phase: str = "Running") -> ShardSummary:
    return ShardSummary(
        files_total=len(files),
        files_done=len(files),
        chunks=sum(f.chunks for f in files.values()),
        bytes=sum(f.consumed for f in files.values()),
        phase=phase,
        updated_at="2024-01-01T00:00:00Z",
    )


def state_configmaps(api: client.CoreV1Api, namespace: str, base: str) -> dict[int, Any]:
    listed: list[Any] = api.list_namespaced_config_map(namespace).items
    found = {}
    for cm in listed:
        name = cm.metadata.name
        if name.startswith(f"{base}-") and name[len(base) + 1 :].isdigit():
            found[int(name[len(base) + 1 :])] = cm
    return found


def serialized_size(api: client.CoreV1Api, cm: client.V1ConfigMap) -> int:
    return len(json.dumps(api.api_client.sanitize_for_serialization(cm)).encode())


def stored_paths(cm: client.V1ConfigMap) -> set[str]:
    encoded = (cm.binary_data or {}).get(STATE_KEY)
    return set(decode_entries(base64.b64decode(encoded))) if encoded else set()


class InterposedApi:
    """The real CoreV1Api with a hook that runs before chosen calls (to let another writer in between a read
    and the update built on it), recording the HTTP errors the real server answered."""

    def __init__(self, real: client.CoreV1Api) -> None:
        self._real = real
        self.before: dict[str, Callable[[], None]] = {}
        self.errors: list[int] = []

    def __getattr__(self, attribute: str) -> Any:
        target = getattr(self._real, attribute)
        if not callable(target):
            return target

        def call(*args: Any, **kwargs: Any) -> Any:
            hook = self.before.pop(attribute, None)
            if hook is not None:
                hook()
            try:
                return target(*args, **kwargs)
            except ApiException as error:
                self.errors.append(error.status)
                raise

        return call


# -- against the control plane -------------------------------------------------------------------------------


@pytest.mark.cluster
def test_100k_files_round_trip_over_buckets_under_1_mib(kube_api: client.ApiClient, namespace: str) -> None:
    api = core(kube_api)
    files = make_files(100_000)
    writer = ConfigMapStateStore("state", namespace, run_name="run-a", api=api)
    paths = list(files)
    started = time.monotonic()
    # Saved in growing batches, as a run would: the bucket count grows while the state is spread out.
    for start in range(0, len(paths), 20_000):
        batch = {p: files[p] for p in paths[start : start + 20_000]}
        writer.save(batch, summary_of(batch))
    save_seconds = time.monotonic() - started

    started = time.monotonic()
    loaded = ConfigMapStateStore("state", namespace, api=api).load()
    load_seconds = time.monotonic() - started
    assert loaded == files

    buckets = state_configmaps(api, namespace, "state")
    count = int(buckets[0].metadata.annotations[ANNOTATION_STATE_BUCKETS])
    assert count == writer.bucket_count > 1
    assert set(buckets) == set(range(count))
    sizes = {index: serialized_size(api, cm) for index, cm in buckets.items()}
    assert max(sizes.values()) < MiB
    # After the growth every entry sits once, in its own bucket: nothing stale is left behind.
    seen: set[str] = set()
    for index, cm in buckets.items():
        paths_here = stored_paths(cm)
        assert all(bucket_index(p, count) == index for p in paths_here)
        assert not (seen & paths_here)
        seen |= paths_here
    assert seen == set(files)

    # A checkpoint of a few files rewrites only their buckets and <base>-0.
    before = {i: cm.metadata.resource_version for i, cm in buckets.items()}
    changed = dict(list(files.items())[:3])
    for state in changed.values():
        state.next_chunk += 1
    started = time.monotonic()
    writer.save(changed, summary_of(files))
    small_save_seconds = time.monotonic() - started
    after = {i: cm.metadata.resource_version for i, cm in state_configmaps(api, namespace, "state").items()}
    rewritten = {i for i in after if after[i] != before[i]}
    assert rewritten == {0} | {bucket_index(p, count) for p in changed}
    assert ConfigMapStateStore("state", namespace, api=api).load() == files

    smallest, largest = min(sizes.values()) / 1024, max(sizes.values()) / 1024
    print(
        f"\n100,000 files: {count} ConfigMaps, {smallest:.0f}-{largest:.0f} KiB each"
        f" ({sum(sizes.values()) / MiB:.1f} MiB in all); save in 5 batches {save_seconds:.1f} s,"
        f" load {load_seconds:.1f} s, checkpoint of 3 files {small_save_seconds:.2f} s"
    )


@pytest.mark.cluster
def test_two_shards_with_forced_conflicts_lose_nothing(kube_api: client.ApiClient, namespace: str) -> None:
    api = core(kube_api)
    interposed = InterposedApi(api)
    shard0 = ConfigMapStateStore("st", namespace, shard_index=0, api=interposed)  # type: ignore[arg-type]
    shard1 = ConfigMapStateStore("st", namespace, shard_index=1, api=api)
    # Both start from the same (empty) state, as two shards of a Job do.
    assert shard0.load() == {} and shard1.load() == {}
    files0, files1 = make_files(50, seed=1, prefix="a"), make_files(50, seed=2, prefix="b")
    shard0.save(dict(list(files0.items())[:10]), summary_of(files0))
    shard1.save(dict(list(files1.items())[:10]), summary_of(files1))

    # Shard 0 has read <base>-0 (its cached copy); shard 1 writes it just before shard 0's update lands.
    interposed.before["replace_namespaced_config_map"] = lambda: shard1.save(files1, summary_of(files1))
    shard0.save(files0, summary_of(files0, phase="Done"))
    assert 409 in interposed.errors, "the interleaving did not force a conflict"

    loaded = ConfigMapStateStore("st", namespace, api=api).load()
    assert loaded == {**files0, **files1}
    summaries = read_summaries(api, "st", namespace)
    assert summaries == {
        "shard-0": summary_of(files0, phase="Done").to_json(),
        "shard-1": summary_of(files1).to_json(),
    }


@pytest.mark.cluster
def test_each_shards_next_attempt_finds_its_own_summary(kube_api: client.ApiClient, namespace: str) -> None:
    api = core(kube_api)
    files = make_files(20, seed=3)
    for shard in (0, 1):
        summary = summary_of(files, phase=f"Shard{shard}").model_copy(update={"run_id": "1767607200"})
        ConfigMapStateStore("sum", namespace, shard_index=shard, api=api).save(files, summary)
    for shard in (0, 1):
        again = ConfigMapStateStore("sum", namespace, shard_index=shard, api=api)
        assert again.saved_summary() is None  # nothing loaded yet
        assert again.load() == files
        saved = again.saved_summary()
        assert saved is not None and (saved.phase, saved.run_id) == (f"Shard{shard}", "1767607200")
    assert ConfigMapStateStore("none", namespace, api=api).load() == {}


@pytest.mark.cluster
def test_a_stale_writer_follows_a_growth_by_another(kube_api: client.ApiClient, namespace: str) -> None:
    api = core(kube_api)
    small = 4 * 1024  # a few dozen entries per bucket, so growth is cheap to provoke
    slow = ConfigMapStateStore("g", namespace, shard_index=0, api=api, bucket_limit=small)
    fast = ConfigMapStateStore("g", namespace, shard_index=1, api=api, bucket_limit=small)
    slow_files, fast_files = make_files(40, seed=3, prefix="s"), make_files(600, seed=4, prefix="f")
    slow.save(slow_files, summary_of(slow_files))
    known = slow.bucket_count
    fast.save(fast_files, summary_of(fast_files))
    assert fast.bucket_count > known
    # The slow writer still believes the old count; its next save must find and adopt the new one.
    for state in slow_files.values():
        state.next_chunk += 7
    slow.save(slow_files, summary_of(slow_files))
    assert slow.bucket_count == fast.bucket_count
    assert ConfigMapStateStore("g", namespace, api=api).load() == {**slow_files, **fast_files}


def put_bucket(api: client.CoreV1Api, namespace: str, name: str, count: int, entries: dict[str, Any]) -> None:
    payload = base64.b64encode(encode_entries(entries)).decode()
    api.create_namespaced_config_map(
        namespace,
        client.V1ConfigMap(
            metadata=client.V1ObjectMeta(name=name, annotations={ANNOTATION_STATE_BUCKETS: str(count)}),
            binary_data={STATE_KEY: payload},
        ),
    )


@pytest.mark.cluster
def test_an_old_copy_never_overtakes_a_newer_one(kube_api: client.ApiClient, namespace: str) -> None:
    """The state a race leaves: writer X grew to 2 buckets and marked <base>-0; writer W learned 2 and put a
    newer copy of path p in bucket 1 (creating it); writer Y grew to 4 and marked <base>-0 before X moved p's
    old copy out of bucket 0. Moving that copy straight to p's bucket under 4 (3) would let it win over the
    newer one; moved one step at a time it meets the newer copy in bucket 1 and yields."""
    api = core(kube_api)
    path = path_with_chain([0, 1, 3])
    old, new = FileState(offset=10, next_chunk=1), FileState(offset=99, next_chunk=9)
    put_bucket(api, namespace, "race-0", 4, {path: old.to_json()})
    put_bucket(api, namespace, "race-1", 2, {path: new.to_json()})
    assert ConfigMapStateStore("race", namespace, api=api).load() == {path: new}

    writer = ConfigMapStateStore("race", namespace, api=api)
    writer.save({}, ShardSummary())  # any save tidies the buckets it passes
    assert writer.bucket_count == 4
    assert ConfigMapStateStore("race", namespace, api=api).load() == {path: new}
    buckets = state_configmaps(api, namespace, "race")
    assert {i: stored_paths(cm) for i, cm in buckets.items()} == {0: set(), 1: set(), 3: {path}}


@pytest.mark.cluster
def test_a_growth_cut_short_is_finished_by_the_next_save(kube_api: client.ApiClient, namespace: str) -> None:
    # A writer marked <base>-0 for 4 buckets and died before moving anything out of it.
    api = core(kube_api)
    far, near, stays = path_with_chain([0, 1, 3]), path_with_chain([0, 0, 2]), path_with_chain([0, 0, 0])
    entries = {far: FileState(offset=1), near: FileState(offset=2), stays: FileState(offset=3)}
    put_bucket(api, namespace, "cut-0", 4, {p: e.to_json() for p, e in entries.items()})

    ConfigMapStateStore("cut", namespace, api=api).save({}, ShardSummary())
    buckets = state_configmaps(api, namespace, "cut")
    # far passed through bucket 1 (created on the way) to 3.
    assert {i: stored_paths(cm) for i, cm in buckets.items()} == {
        0: {stays},
        1: set(),
        2: {near},
        3: {far},
    }
    assert ConfigMapStateStore("cut", namespace, api=api).load() == entries


@pytest.mark.cluster
def test_concurrent_writers_growing_buckets_lose_nothing(kube_api: client.ApiClient, namespace: str) -> None:
    api = core(kube_api)
    writers = 3
    final: dict[str, FileState] = {}
    failures: list[BaseException] = []
    lock = threading.Lock()

    def run(shard: int) -> None:
        store = ConfigMapStateStore("c", namespace, shard_index=shard, api=api, bucket_limit=6 * 1024)
        mine = make_files(400, seed=10 + shard, prefix=f"w{shard}")
        paths = list(mine)
        try:
            store.load()
            for step in range(12):
                # New files and updates of earlier ones, as checkpoints of a running shard carry.
                batch = {p: mine[p] for p in paths[step * 30 : step * 30 + 40]}
                for state in batch.values():
                    state.next_chunk += 1
                store.save(batch, summary_of(batch))
        except BaseException as error:
            failures.append(error)
            raise
        with lock:
            final.update({p: mine[p] for p in paths[: 11 * 30 + 40]})

    threads = [threading.Thread(target=run, args=(shard,)) for shard in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures
    loaded = ConfigMapStateStore("c", namespace, api=api).load()
    assert loaded == final
    assert set(read_summaries(api, "c", namespace)) == {f"shard-{i}" for i in range(writers)}


@pytest.mark.cluster
def test_save_raises_when_the_api_is_unreachable_and_the_state_stays(
    kube_api: client.ApiClient, namespace: str
) -> None:
    api = core(kube_api)
    files = make_files(100)
    ConfigMapStateStore("u", namespace, api=api).save(files, summary_of(files))

    with socket.socket() as probe:  # a port that nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    configuration = client.Configuration()
    configuration.host = f"https://127.0.0.1:{closed_port}"
    configuration.verify_ssl = False
    dead = client.CoreV1Api(client.ApiClient(configuration))
    store = ConfigMapStateStore("u", namespace, api=dead, max_attempts=4, retry_timeout=3.0)
    changed = {path: FileState(size=1) for path in list(files)[:5]}
    started = time.monotonic()
    with pytest.raises(StateSaveError, match=rf"{namespace}/u-0.*(Connection|Max retries|refused)") as raised:
        store.save(changed, summary_of(changed))
    print(f"\nunreachable API: {raised.value} (after {time.monotonic() - started:.1f} s)")
    assert time.monotonic() - started < 30
    with pytest.raises(StateLoadError, match="u-0"):
        store.load()
    assert ConfigMapStateStore("u", namespace, api=api).load() == files


@pytest.mark.cluster
def test_from_environment_uses_kubeconfig_outside_a_pod(
    kube_cluster: Any, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(kube_cluster.kubeconfig))
    store = ConfigMapStateStore.from_environment("env", namespace, run_name="r1", shard_index=3)
    files = make_files(10)
    store.save(files, summary_of(files))
    assert ConfigMapStateStore.from_environment("env", namespace).load() == files
    bucket0: Any = store.api.read_namespaced_config_map("env-0", namespace)
    assert bucket0.metadata.labels[LABEL_IMPORTRUN] == "r1"


@pytest.mark.cluster
def test_transient_failures_are_retried(kube_api: client.ApiClient, namespace: str) -> None:
    api = core(kube_api)
    flaky = InterposedApi(api)
    failures = {"left": 3}

    def fail_a_few_times() -> None:
        if failures["left"] > 0:
            failures["left"] -= 1
            flaky.before["read_namespaced_config_map"] = fail_a_few_times
            raise urllib3.exceptions.ProtocolError("connection reset by peer")

    flaky.before["read_namespaced_config_map"] = fail_a_few_times
    store = ConfigMapStateStore("t", namespace, api=flaky)  # type: ignore[arg-type]
    files = make_files(20)
    store.save(files, summary_of(files))
    assert failures["left"] == 0
    assert ConfigMapStateStore("t", namespace, api=api).load() == files


@pytest.mark.cluster
def test_labels_and_owner_references_are_copied(kube_api: client.ApiClient, namespace: str) -> None:
    api = core(kube_api)
    # The operator pre-creates <base>-0, empty, owned by its ImportRun; any object serves as owner here.
    owner: Any = api.create_namespaced_config_map(
        namespace, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="the-importrun"))
    )
    reference = client.V1OwnerReference(
        api_version="v1", kind="ConfigMap", name="the-importrun", uid=owner.metadata.uid, controller=True
    )
    api.create_namespaced_config_map(
        namespace,
        client.V1ConfigMap(metadata=client.V1ObjectMeta(name="o-0", owner_references=[reference])),
    )
    store = ConfigMapStateStore("o", namespace, run_name="nightly-1", shard_index=2, api=api, bucket_limit=4096)
    files = make_files(300)
    store.save(files, summary_of(files))

    buckets = state_configmaps(api, namespace, "o")
    assert len(buckets) == store.bucket_count > 1
    for index, cm in buckets.items():
        assert cm.metadata.labels == {
            LABEL_MANAGED_BY: "reflection-operator",
            LABEL_IMPORTRUN: "nightly-1",
            LABEL_STATE_BUCKET: str(index),
        }
        assert [(r.kind, r.name, r.uid) for r in cm.metadata.owner_references] == [
            ("ConfigMap", "the-importrun", owner.metadata.uid)
        ]
    assert buckets[0].metadata.annotations[ANNOTATION_STATE_BUCKETS] == str(store.bucket_count)
    assert json.loads(buckets[0].data["summary"]) == {"shard-2": summary_of(files).to_json()}


@pytest.mark.cluster
def test_corrupt_state_is_reported_not_overwritten(kube_api: client.ApiClient, namespace: str) -> None:
    api = core(kube_api)
    garbage = base64.b64encode(b"not gzip").decode()
    api.create_namespaced_config_map(
        namespace,
        client.V1ConfigMap(metadata=client.V1ObjectMeta(name="bad-0"), binary_data={STATE_KEY: garbage}),
    )
    store = ConfigMapStateStore("bad", namespace, api=api)
    with pytest.raises(StateLoadError, match="cannot be decoded"):
        store.load()
    with pytest.raises(StateSaveError, match="cannot be decoded"):
        store.save({"x.jsonl": FileState()}, ShardSummary())
    assert api.read_namespaced_config_map("bad-0", namespace).binary_data == {STATE_KEY: garbage}


@pytest.mark.cluster
def test_an_entry_that_cannot_be_understood_is_dropped_not_fatal(kube_api: client.ApiClient, namespace: str) -> None:
    api = core(kube_api)
    good = FileState(offset=10, next_chunk=2, chunks=2)
    put_bucket(
        api, namespace, "odd-0", 1, {"good.jsonl": good.to_json(), "bad.jsonl": 7, "worse.jsonl": {"chunks": "abc"}}
    )
    assert ConfigMapStateStore("odd", namespace, api=api).load() == {"good.jsonl": good}


@pytest.fixture
def restricted_api(kube_api: client.ApiClient, namespace: str) -> Iterator[client.CoreV1Api]:
    """A CoreV1Api authenticated as a ServiceAccount allowed only what the importer's Job gets."""
    core_api, rbac = core(kube_api), client.RbacAuthorizationV1Api(kube_api)
    core_api.create_namespaced_service_account(
        namespace, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name="importer"))
    )
    rbac.create_namespaced_role(
        namespace,
        client.V1Role(
            metadata=client.V1ObjectMeta(name="importer-state"),
            rules=[
                client.V1PolicyRule(
                    api_groups=[""],
                    resources=["configmaps"],
                    verbs=["get", "list", "create", "update", "patch"],
                )
            ],
        ),
    )
    rbac.create_namespaced_role_binding(
        namespace,
        client.V1RoleBinding(
            metadata=client.V1ObjectMeta(name="importer-state"),
            role_ref=client.V1RoleRef(api_group="rbac.authorization.k8s.io", kind="Role", name="importer-state"),
            subjects=[client.RbacV1Subject(kind="ServiceAccount", name="importer", namespace=namespace)],
        ),
    )
    token = service_account_token(core_api, namespace, "importer")
    configuration = client.Configuration()
    configuration.host = kube_api.configuration.host
    configuration.ssl_ca_cert = kube_api.configuration.ssl_ca_cert
    configuration.api_key = {"authorization": f"Bearer {token}"}
    with client.ApiClient(configuration) as restricted:
        yield client.CoreV1Api(restricted)


def service_account_token(api: client.CoreV1Api, namespace: str, account: str) -> str:
    """The token of the ServiceAccount's token Secret (created by kube-controller-manager in v1.20)."""

    def token() -> str | None:
        secrets: list[Any] = api.read_namespaced_service_account(account, namespace).secrets or []
        for reference in secrets:
            secret: Any = api.read_namespaced_secret(reference.name, namespace)
            if secret.type == "kubernetes.io/service-account-token" and (secret.data or {}).get("token"):
                return base64.b64decode(secret.data["token"]).decode()
        return None

    return wait_for(f"a token Secret for ServiceAccount {namespace}/{account}", token, timeout=60, interval=0.5)


@pytest.mark.cluster
def test_works_with_only_the_jobs_rbac(restricted_api: client.CoreV1Api, namespace: str) -> None:
    # The restriction is real: deleting is not allowed.
    restricted_api.create_namespaced_config_map(
        namespace, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="probe"))
    )
    with pytest.raises(ApiException) as denied:
        restricted_api.delete_namespaced_config_map("probe", namespace)
    assert denied.value.status == 403

    store = ConfigMapStateStore("r", namespace, run_name="run-r", api=restricted_api, bucket_limit=4096)
    files = make_files(300)
    store.save(files, summary_of(files))
    assert store.bucket_count > 1
    for state in files.values():
        state.offset += 1
    store.save(files, summary_of(files, phase="Done"))
    assert ConfigMapStateStore("r", namespace, api=restricted_api).load() == files
    assert read_summaries(restricted_api, "r", namespace)["shard-0"]["phase"] == "Done"
