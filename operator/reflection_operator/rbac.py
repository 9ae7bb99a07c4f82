"""The importer's identity in a namespace: a ServiceAccount whose Role reaches only ConfigMaps.

The Helm chart makes the same objects; this is for plain installs and tests:
``python -m reflection_operator importer-rbac --namespace team-a | kubectl apply -f -``.
"""

from __future__ import annotations

from typing import Any

from importer.contract import LABEL_MANAGED_BY, MANAGED_BY

#: What the importer does with its state ConfigMaps, and nothing else: read a bucket (get), add one (create),
#: write one back under its resourceVersion (update). It never lists, patches or deletes them; a test runs
#: the state store under exactly this Role.
IMPORTER_CONFIGMAP_VERBS = ["get", "create", "update"]


def importer_rbac(namespace: str, service_account: str = "reflection-importer") -> list[dict[str, Any]]:
    """ServiceAccount, Role and RoleBinding for the importer Pods in ``namespace``."""
    labels = {LABEL_MANAGED_BY: MANAGED_BY, "app.kubernetes.io/name": "reflection-importer"}
    meta = {"name": service_account, "namespace": namespace, "labels": labels}
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": meta,
            "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": IMPORTER_CONFIGMAP_VERBS}],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": meta,
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": service_account},
            "subjects": [{"kind": "ServiceAccount", "name": service_account, "namespace": namespace}],
        },
    ]
