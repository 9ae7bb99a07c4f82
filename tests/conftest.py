"""Shared test configuration: the local control plane's fixtures (kube_cluster, kube_api, namespace)."""

pytest_plugins = ["localcluster.pytest_plugin"]
