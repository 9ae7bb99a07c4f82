"""Build the operator and importer images from the project's own Dockerfile, without a daemon.

No registry is reachable here, so ``python:3.11-slim`` cannot be pulled. Debian bookworm's python3 is 3.11, so
a base image made with mmdebstrap (minbase plus python3, python3-venv, python-is-python3, passwd) stands in
for it through the Dockerfile's ``PYTHON_IMAGE`` build argument; the Dockerfile itself is unchanged.

buildah builds both targets with ``--layers``, so a rebuild reuses every layer whose inputs are unchanged
(the base, the venv as long as the sources are the same); its storage and the base rootfs live under
``~/.cache/reflection-operator/images``. The built images are saved as docker-archives there and imported into
a containerd's ``k8s.io`` namespace (:func:`load_into_containerd`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from localcluster import build

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
IMAGE_PACKAGES = ("buildah", "mmdebstrap")
BASE_PACKAGES = ("python3", "python3-venv", "python-is-python3", "passwd")
BASE_SUITE = "bookworm"
BASE_IMAGE = "localhost/reflection-python-base:bookworm"
#: This machine's TLS trust: PyPI is reached through an egress proxy whose CA only the host's bundle holds, so
#: pip inside a build must use this bundle (python:3.11-slim would need the same on such a machine).
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
VERSION = "0.1.0"
#: Dockerfile target -> the image name the chart uses by default (docker.io/library/ is what kubelet adds).
TARGETS = {"operator": "reflection-operator", "importer": "reflection-importer"}


@dataclass(frozen=True)
class BuiltImage:
    target: str
    name: str  # as written in a Pod spec, e.g. reflection-operator:0.1.0
    image_id: str
    archive: Path


def cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "reflection-operator" / "images"


def buildah(*args: str, capture: bool = False) -> str:
    storage = cache_dir() / "storage"
    command = [
        "buildah",
        "--root",
        str(storage / "root"),
        "--runroot",
        str(storage / "run"),
        "--storage-driver",
        "overlay",
        *args,
    ]
    log.info("$ %s", " ".join(command))
    result = subprocess.run(command, check=True, text=True, stdout=subprocess.PIPE if capture else None)
    return (result.stdout or "").strip()


def _image_id(name: str) -> str | None:
    try:
        return buildah("inspect", "--type", "image", "--format", "{{.FromImageID}}", name, capture=True)
    except subprocess.CalledProcessError:
        return None


def ensure_base_image() -> str:
    """The stand-in for python:3.11-slim: a Debian minbase rootfs (cached as a tarball) committed once."""
    if _image_id(BASE_IMAGE):
        return BASE_IMAGE
    rootfs = cache_dir() / f"base-{BASE_SUITE}.tar"
    if not rootfs.exists():
        partial = rootfs.with_suffix(".partial.tar")
        build._run(
            [
                "mmdebstrap",
                "--variant=minbase",
                f"--include={','.join(BASE_PACKAGES)}",
                # apt's lists and caches are not part of a slim image
                "--dpkgopt=path-exclude=/usr/share/doc/*",
                "--customize-hook=rm -rf $1/var/lib/apt/lists/* $1/var/cache/apt/*",
                BASE_SUITE,
                str(partial),
            ]
        )
        partial.rename(rootfs)
    container = buildah("from", "scratch", capture=True)
    try:
        buildah("add", container, str(rootfs), "/")
        buildah("copy", container, str(HOST_CA_BUNDLE), str(HOST_CA_BUNDLE))
        env = ["LANG=C.UTF-8", f"PIP_CERT={HOST_CA_BUNDLE}", f"SSL_CERT_FILE={HOST_CA_BUNDLE}"]
        buildah("config", *[arg for item in env for arg in ("--env", item)], "--cmd", "python3", container)
        buildah("commit", "--rm", container, BASE_IMAGE)
    except BaseException:
        with contextlib.suppress(subprocess.CalledProcessError):
            buildah("rm", container)
        raise
    return BASE_IMAGE


def build_images() -> list[BuiltImage]:
    """Build both Dockerfile targets (cached layers reused) and save each as a docker-archive."""
    build.ensure_packages(IMAGE_PACKAGES)
    cache_dir().mkdir(parents=True, exist_ok=True)
    base = ensure_base_image()
    built = []
    for target, repository in TARGETS.items():
        name = f"{repository}:{VERSION}"
        started = time.monotonic()
        buildah(
            "build",
            "--layers",
            "--network",
            "host",  # pip reaches PyPI; the build needs nothing else
            "--build-arg",
            f"PYTHON_IMAGE={base}",
            "--target",
            target,
            "--tag",
            name,
            "--file",
            str(REPO_ROOT / "Dockerfile"),
            str(REPO_ROOT),
        )
        image_id = _image_id(name) or ""
        built.append(BuiltImage(target, name, image_id, _save(name, image_id)))
        log.info("built %s (%s) in %.0f s", name, image_id[:12], time.monotonic() - started)
    return built


def _save(name: str, image_id: str) -> Path:
    """A docker-archive of the image, rewritten only when the image changed (its ID is in the file name)."""
    archive = cache_dir() / "archives" / f"{name.replace(':', '_')}-{image_id[:16]}.tar"
    if not archive.exists():
        archive.parent.mkdir(exist_ok=True)
        for old in archive.parent.glob(f"{name.replace(':', '_')}-*.tar"):
            old.unlink()
        partial = archive.with_suffix(".partial")
        partial.unlink(missing_ok=True)
        buildah("push", name, f"docker-archive:{partial}:docker.io/library/{name}")
        partial.rename(archive)
    return archive


def load_into_containerd(images: list[BuiltImage], address: Path) -> None:
    """Import the archives into containerd's k8s.io namespace (the one the CRI plugin serves to kubelet)."""
    for image in images:
        build._run(["ctr", "--address", str(address), "-n", "k8s.io", "images", "import", str(image.archive)])


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    started = time.monotonic()
    images = build_images()
    print(json.dumps([{**image.__dict__, "archive": str(image.archive)} for image in images], indent=2))
    log.info("images ready in %.0f s", time.monotonic() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
