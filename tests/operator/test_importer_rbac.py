"""The importer's Role (reflection_operator.rbac) is what its ConfigMap state needs, no more: the state store
runs under exactly that Role against the real API server, and fails without any one of its verbs."""

from __future__ import annotations

import base64
import hashlib
import time
from collections.abc import Callable
from typing import Any, cast

import pytest
from kubernetes import client
from reflection_operator.rbac import IMPORTER_CONFIGMAP_VERBS, importer_rbac

from importer.contract import ShardSummary
from importer.state.base import FileState
from importer.state.configmap import ConfigMapStateStore, StateLoadError, StateSaveError

#: The store's word for the request each verb allows (it names the failed request in its errors).
OPERATION_OF_VERB = {"get": "read", "create": "create", "update": "update"}


def as_service_account(kube_api: client.ApiClient, namespace: str, account: str) -> client.CoreV1Api:
    """A client holding the ServiceAccount's own token (its Secret, made by the controller-manager in v1.20),
    so the API server authorizes every request against that account's Role alone."""
    core = client.CoreV1Api(kube_api)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for reference in core.read_namespaced_service_account(account, namespace).secrets or []:
            secret: Any = core.read_namespaced_secret(cast(str, reference.name), namespace)
            if secret.type == "kubernetes.io/service-account-token" and (secret.data or {}).get("token"):
                configuration = client.Configuration()
                configuration.host = kube_api.configuration.host
                configuration.ssl_ca_cert = kube_api.configuration.ssl_ca_cert
                token = base64.b64decode(secret.data["token"]).decode()
                configuration.api_key = {"authorization": f"Bearer {token}"}
                return client.CoreV1Api(client.ApiClient(configuration))
        time.sleep(0.5)
    raise AssertionError(f"no token for ServiceAccount {namespace}/{account}")


def files(count: int, version: int) -> dict[str, FileState]:
    # Hashes that do not compress: the state outgrows one small bucket and new buckets are made.
    return {
        f"project-{i % 7}/{i:04d}.jsonl": FileState(
            size=1000 + version, consumed=version, head_hash=hashlib.sha256(f"{i}/{version}".encode()).hexdigest()[:16]
        )
        for i in range(count)
    }


def importer_lifetime(api: client.CoreV1Api, namespace: str) -> Callable[[], None]:
    """What an importer does with its state over two runs: create buckets, write them again, read them back."""

    def run() -> None:
        first = ConfigMapStateStore("r", namespace, run_name="r", api=api, max_attempts=1, bucket_limit=2048)
        first.save(files(400, 1), ShardSummary(phase="Running"))  # creates buckets (more than one: 2 KiB each)
        first.save(files(400, 2), ShardSummary(phase="Succeeded"))  # writes them again
        assert first.bucket_count > 1
        assert ConfigMapStateStore("r", namespace, api=api).load() == files(400, 2)

    return run


def apply_role(kube_api: client.ApiClient, namespace: str, account: str, verbs: list[str]) -> None:
    """``importer_rbac`` for ``account``, with its Role's verbs replaced by ``verbs``."""
    service_account, role, binding = importer_rbac(namespace, account)
    role["rules"][0]["verbs"] = verbs
    core, authz = client.CoreV1Api(kube_api), client.RbacAuthorizationV1Api(kube_api)
    core.create_namespaced_service_account(namespace, cast(Any, service_account))  # plain dicts work too
    authz.create_namespaced_role(namespace, cast(Any, role))
    authz.create_namespaced_role_binding(namespace, cast(Any, binding))


def test_the_state_store_works_under_exactly_the_importer_role(kube_api: client.ApiClient, namespace: str) -> None:
    apply_role(kube_api, namespace, "reflection-importer", list(IMPORTER_CONFIGMAP_VERBS))
    api = as_service_account(kube_api, namespace, "reflection-importer")
    # The restriction is real: what the Role does not grant is refused.
    with pytest.raises(client.ApiException) as denied:
        api.list_namespaced_config_map(namespace)
    assert denied.value.status == 403
    importer_lifetime(api, namespace)()


@pytest.mark.parametrize("missing", IMPORTER_CONFIGMAP_VERBS)
def test_every_verb_of_the_importer_role_is_needed(kube_api: client.ApiClient, namespace: str, missing: str) -> None:
    account = f"importer-without-{missing}"
    apply_role(kube_api, namespace, account, [v for v in IMPORTER_CONFIGMAP_VERBS if v != missing])
    api = as_service_account(kube_api, namespace, account)
    with pytest.raises((StateSaveError, StateLoadError)) as refused:
        importer_lifetime(api, namespace)()
    message = str(refused.value)
    assert "403" in message and OPERATION_OF_VERB[missing] in message, message
