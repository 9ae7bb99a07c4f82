"""The few Kubernetes API calls the operator makes itself, over the asyncio client of `kubernetes`.

Watching is kopf's business; this is for writing: Jobs, the state ConfigMap, the ImportRun's status, and
reading what explains a run that cannot start: the claims an ImportRun names, its Namespace's Pod Security
label, its Jobs' FailedCreate Events. (Secrets are never read: the Pods' own status says when one is missing.)
Bodies are plain dicts (the manifests are built as dicts), so the client's low-level request path is used
rather than its typed models.
"""

from __future__ import annotations

import json
import os
from typing import Any
from urllib.parse import quote

from kubernetes.aio import config as kube_config
from kubernetes.aio.client import ApiClient, Configuration

from . import GROUP, PLURAL, VERSION

MERGE_PATCH = "application/merge-patch+json"


class KubeError(Exception):
    """The API server refused a request."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message

    @property
    def not_found(self) -> bool:
        return self.status == 404

    @property
    def already_exists(self) -> bool:
        return self.status == 409


class Kube:
    def __init__(self, client: ApiClient) -> None:
        self.client = client

    @classmethod
    async def connect(cls) -> Kube:
        """In-cluster credentials in a Pod, else the kubeconfig (KUBECONFIG or ~/.kube/config)."""
        configuration = Configuration()
        try:
            kube_config.load_incluster_config(client_configuration=configuration)
        except kube_config.ConfigException:
            # KUBECONFIG is read now, not when the client library was imported (tests set it late).
            await kube_config.load_kube_config(
                config_file=os.environ.get("KUBECONFIG") or None,
                client_configuration=configuration,
                persist_config=False,
            )
        return cls(ApiClient(configuration))

    async def close(self) -> None:
        await self.client.close()

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: list[tuple[str, str]] | None = None,
        content_type: str = "application/json",
    ) -> dict[str, Any]:
        method, url, headers, payload, post = await self.client.param_serialize(
            method,
            path,
            query_params=query or [],
            header_params={"Accept": "application/json", "Content-Type": content_type},
            body=body,
            auth_settings=["BearerToken"],
        )
        response = await self.client.call_api(method, url, header_params=headers, body=payload, post_params=post)
        data = await response.read()
        text = data.decode("utf-8", errors="replace") if data else ""
        if not 200 <= response.status <= 299:
            raise _error(response.status, response.reason or "", text)
        parsed = json.loads(text) if text else {}
        return parsed if isinstance(parsed, dict) else {}

    async def get(self, path: str) -> dict[str, Any] | None:
        try:
            return await self.request("GET", path)
        except KubeError as error:
            if error.not_found:
                return None
            raise

    async def list(self, path: str, field_selector: str) -> list[dict[str, Any]]:
        found = await self.request("GET", path, query=[("fieldSelector", field_selector)])
        items = found.get("items") or []
        return [item for item in items if isinstance(item, dict)]

    async def create(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return await self.request("POST", path, body)

    async def merge_patch(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return await self.request("PATCH", path, body, content_type=MERGE_PATCH)

    async def delete(self, path: str, propagation: str = "Background") -> bool:
        """Deletes; dependents go with it (Pods of a Job). False when it was already gone."""
        body = {"apiVersion": "v1", "kind": "DeleteOptions", "propagationPolicy": propagation}
        try:
            await self.request("DELETE", path, body)
        except KubeError as error:
            if error.not_found:
                return False
            raise
        return True


def _error(status: int, reason: str, text: str) -> KubeError:
    try:
        payload = json.loads(text)
        message = payload.get("message", text) if isinstance(payload, dict) else text
    except ValueError:
        message = text
    return KubeError(status, reason, message)


def _name(name: str) -> str:
    return quote(name, safe="")


def jobs_path(namespace: str, name: str | None = None) -> str:
    base = f"/apis/batch/v1/namespaces/{_name(namespace)}/jobs"
    return base if name is None else f"{base}/{_name(name)}"


def configmaps_path(namespace: str, name: str | None = None) -> str:
    base = f"/api/v1/namespaces/{_name(namespace)}/configmaps"
    return base if name is None else f"{base}/{_name(name)}"


def events_path(namespace: str) -> str:
    return f"/api/v1/namespaces/{_name(namespace)}/events"


#: Namespaces are listed (by name), not read one by one: the operator's discovery role lists them anyway.
NAMESPACES_PATH = "/api/v1/namespaces"


def claim_path(namespace: str, name: str) -> str:
    return f"/api/v1/namespaces/{_name(namespace)}/persistentvolumeclaims/{_name(name)}"


def importrun_status_path(namespace: str, name: str) -> str:
    return f"/apis/{GROUP}/{VERSION}/namespaces/{_name(namespace)}/{PLURAL}/{_name(name)}/status"
