"""A thin JSON-in, JSON-out layer over the Kubernetes client's HTTP machinery.

The folder provisioner handles claims and volumes as plain dicts (what the API server sends), which keeps it
free of the generated model classes; authentication, TLS and connection pooling still come from the
official client.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kubernetes import config
from kubernetes.client import ApiClient
from kubernetes.client.exceptions import ApiException

JsonDict = dict[str, Any]
MERGE_PATCH = "application/merge-patch+json"
STRATEGIC_PATCH = "application/strategic-merge-patch+json"


class Rest:
    """Raw REST calls against one API server, authenticated by a kubeconfig file."""

    def __init__(self, kubeconfig: Path) -> None:
        self.client: ApiClient = config.new_client_from_config(config_file=str(kubeconfig))
        self.client.user_agent = "localcluster-test-kubelet"

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: dict[str, Any] | None = None,
        content_type: str = "application/json",
        timeout: float | tuple[float, float] = 30,
    ) -> Any:
        """Send one request; return the decoded JSON body, or raise ApiException on a non-2xx answer."""
        response = self._send(method, path, body, query, content_type, timeout)
        data = response.read()
        if not 200 <= response.status <= 299:
            raise ApiException(status=response.status, reason=response.reason, body=data.decode(errors="replace"))
        return json.loads(data) if data else None

    def get(self, path: str, query: dict[str, Any] | None = None) -> Any:
        return self.request("GET", path, query=query)

    def create(self, path: str, body: JsonDict) -> Any:
        return self.request("POST", path, body=body)

    def patch(self, path: str, body: JsonDict, content_type: str = MERGE_PATCH) -> Any:
        return self.request("PATCH", path, body=body, content_type=content_type)

    def delete(self, path: str, body: JsonDict | None = None) -> Any:
        return self.request("DELETE", path, body=body)

    def watch(self, path: str, query: dict[str, Any], timeout_seconds: int = 240) -> Iterator[tuple[str, JsonDict]]:
        """Yield (type, object) for each event of one watch request; ends when the server closes it."""
        query = {**query, "watch": "true", "timeoutSeconds": timeout_seconds, "allowWatchBookmarks": "true"}
        response = self._send("GET", path, None, query, "application/json", (10, timeout_seconds + 30))
        if not 200 <= response.status <= 299:
            data = response.read()
            raise ApiException(status=response.status, reason=response.reason, body=data.decode(errors="replace"))
        raw = response.response
        try:
            pending = b""
            for chunk in raw.stream(amt=None, decode_content=True):
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    if line.strip():
                        event = json.loads(line)
                        yield event["type"], event["object"]
        finally:
            raw.release_conn()

    def close(self) -> None:
        self.client.close()

    def _send(
        self,
        method: str,
        path: str,
        body: Any,
        query: dict[str, Any] | None,
        content_type: str,
        timeout: float | tuple[float, float],
    ) -> Any:
        headers = {"Accept": "application/json", "Content-Type": content_type}
        method, url, headers, body, _ = self.client.param_serialize(
            method,
            path,
            query_params=list((query or {}).items()),
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        return self.client.call_api(method, url, header_params=headers, body=body, _request_timeout=timeout)


def is_status(error: BaseException, *codes: int) -> bool:
    return isinstance(error, ApiException) and error.status in codes
