"""A folder provisioner: gives each pending PersistentVolumeClaim a hostPath PersistentVolume.

It runs beside the node (``python -m localcluster.provisioner``); its folders are open to every user (mode
0777, as local-path-provisioner makes them), since hostPath volumes ignore fsGroup and the importer runs as
UID 65532.

The scheduler will not place a Pod whose claim is unbound, and this cluster has no storage driver, so this
is the external provisioner of the default StorageClass ``local-folder``: the volume of claim
``<namespace>/<claim>`` is the folder ``<workdir>/pvc/<namespace>/<claim>`` (kubelet mounts it as a
hostPath). Released volumes are deleted; their folders are kept (tests may look inside).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from kubernetes.client.exceptions import ApiException

from localcluster.rest import JsonDict, Rest, is_status

log = logging.getLogger(__name__)

STORAGE_CLASS = "local-folder"
PROVISIONER = "localcluster.reflection.dev/folder"
MANAGED_LABEL = "localcluster.reflection.dev/provisioned"
POLL_SECONDS = 1.0


def ensure_storage_class(rest: Rest) -> None:
    body = {
        "apiVersion": "storage.k8s.io/v1",
        "kind": "StorageClass",
        "metadata": {
            "name": STORAGE_CLASS,
            "annotations": {"storageclass.kubernetes.io/is-default-class": "true"},
        },
        "provisioner": PROVISIONER,
        "reclaimPolicy": "Delete",
        "volumeBindingMode": "Immediate",
    }
    try:
        rest.create("/apis/storage.k8s.io/v1/storageclasses", body)
    except ApiException as error:
        if not is_status(error, 409):
            raise


def _wants_volume(claim: JsonDict) -> bool:
    spec = claim.get("spec", {})
    return (
        claim.get("status", {}).get("phase") == "Pending"
        and not spec.get("volumeName")
        and not spec.get("selector")
        and spec.get("storageClassName") == STORAGE_CLASS  # a claim for "" (no class) waits for a static PV
        and "deletionTimestamp" not in claim["metadata"]
    )


def volume_for(claim: JsonDict, folder: Path) -> JsonDict:
    meta, spec = claim["metadata"], claim["spec"]
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {
            "name": f"pvc-{meta['uid']}",
            "labels": {MANAGED_LABEL: "true"},
            "annotations": {"pv.kubernetes.io/provisioned-by": PROVISIONER},
        },
        "spec": {
            "capacity": {"storage": spec.get("resources", {}).get("requests", {}).get("storage", "1Gi")},
            "accessModes": spec.get("accessModes") or ["ReadWriteOnce"],
            "persistentVolumeReclaimPolicy": "Delete",
            "storageClassName": spec.get("storageClassName") or "",
            "volumeMode": spec.get("volumeMode", "Filesystem"),
            "hostPath": {"path": str(folder), "type": "DirectoryOrCreate"},
            "claimRef": {
                "apiVersion": "v1",
                "kind": "PersistentVolumeClaim",
                "namespace": meta["namespace"],
                "name": meta["name"],
                "uid": meta["uid"],
            },
        },
    }


class FolderProvisioner(threading.Thread):
    def __init__(self, rest: Rest, pvc_root: Path, stopping: threading.Event, mode: int | None = None) -> None:
        super().__init__(name="folder-provisioner", daemon=True)
        self.rest = rest
        self.pvc_root = pvc_root
        self.stopping = stopping
        self.mode = mode

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                self.sync_once()
            except Exception as error:  # keep provisioning through API hiccups
                log.warning("provisioner: %s", error)
            self.stopping.wait(POLL_SECONDS)

    def sync_once(self) -> None:
        for claim in self.rest.get("/api/v1/persistentvolumeclaims")["items"]:
            if _wants_volume(claim):
                self._provision(claim)
        volumes = self.rest.get("/api/v1/persistentvolumes", {"labelSelector": f"{MANAGED_LABEL}=true"})["items"]
        for volume in volumes:
            if volume.get("status", {}).get("phase") == "Released":
                self._delete_volume(volume["metadata"]["name"])

    def _provision(self, claim: JsonDict) -> None:
        meta = claim["metadata"]
        folder = self.pvc_root / meta["namespace"] / meta["name"]
        folder.mkdir(parents=True, exist_ok=True)
        if self.mode is not None:
            for part in (self.pvc_root, folder.parent, folder):
                part.chmod(self.mode if part == folder else 0o755)
        try:
            self.rest.create("/api/v1/persistentvolumes", volume_for(claim, folder))
            log.info("provisioned %s for claim %s/%s", folder, meta["namespace"], meta["name"])
        except ApiException as error:
            if not is_status(error, 409):
                raise

    def _delete_volume(self, name: str) -> None:
        try:
            self.rest.delete(f"/api/v1/persistentvolumes/{name}")
        except ApiException as error:
            if not is_status(error, 404):
                raise


def main(argv: list[str] | None = None) -> int:
    """Provision until SIGTERM: the real node's stand-in for a storage driver."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="python -m localcluster.provisioner", description=main.__doc__)
    parser.add_argument("--kubeconfig", type=Path, required=True)
    parser.add_argument("--pvc-root", type=Path, required=True)
    args = parser.parse_args(argv)
    rest = Rest(args.kubeconfig)
    ensure_storage_class(rest)
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    provisioner = FolderProvisioner(rest, args.pvc_root, stopping, mode=0o777)
    provisioner.start()
    log.info("provisioning claims into %s (pid %d)", args.pvc_root, os.getpid())
    stopping.wait()
    provisioner.join(POLL_SECONDS + 5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
