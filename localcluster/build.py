"""Build Kubernetes v1.20.2 from Debian's source: the control plane and the node's binaries.

No Kubernetes binaries can be downloaded here (GitHub and dl.k8s.io are out of reach), but Debian bookworm's
source package ``kubernetes`` carries the full upstream v1.20.2 tree with its vendored dependencies, so we
compile the binaries we need with Debian's Go 1.19 and keep only them in the cache: kube-apiserver,
kube-controller-manager, kube-scheduler and kubectl in one folder, kubelet and kube-proxy in another (other
sessions run the control plane from its folder while a node build happens).

It needs root: it adds deb-src entries (``/etc/apt/sources.list.d/reflection-operator-deb-src.sources``,
mirroring the machine's deb entries) and apt-installs Go 1.19 and the other build tools.

The build is idempotent: a finished build is recognised by a marker file written last, after the binaries
have been moved into place; anything else in the cache directory is treated as debris and redone. Each folder
has a file lock that keeps two sessions from building it at the same time. ``ensure_all_built`` builds
whatever is missing of both sets in one ``make`` (on a fresh machine the shared packages and the code
generation are then done once, not twice), holding the locks of both folders, always taken in the same order.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

K8S_VERSION = "v1.20.2"
DEBIAN_VERSION = "1.20.5+really1.20.2-1.1+deb12u1"
ORIG_TARBALL = "kubernetes_1.20.5+really1.20.2.orig.tar.gz"
ORIG_SHA256 = "b83c0780efb182d928dc63d46488a847f161f04e40a94b96bf5247dd671ecdfc"
BINARIES = ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl")
# The node's binaries, from the same source, in a cache folder of their own so a node build never touches
# the control plane's (other sessions run from it while this one builds).
NODE_BINARIES = ("kubelet", "kube-proxy")
BUILD_PACKAGES = ("golang-1.19-go", "rsync", "jq", "make", "golang-github-modern-go-reflect2-dev")
RUNTIME_PACKAGES = ("etcd-server", "openssl")
GO_BIN = Path("/usr/lib/go-1.19/bin")
# reflect2 v1.0.1 (vendored by Kubernetes 1.20) crashes under Go >= 1.18; Debian ships the fixed 1.0.2.
DEBIAN_REFLECT2 = Path("/usr/share/gocode/src/github.com/modern-go/reflect2")
DEB_SRC_LIST = Path("/etc/apt/sources.list.d/reflection-operator-deb-src.sources")
DEBIAN_SOURCES = Path("/etc/apt/sources.list.d/debian.sources")
MARKER_NAME = "BUILD-COMPLETE.json"


def cache_dir(binaries: tuple[str, ...] = BINARIES) -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    suffix = "-node" if binaries == NODE_BINARIES else ""
    return base / "reflection-operator" / f"k8s-{K8S_VERSION}{suffix}"


def bin_dir(binaries: tuple[str, ...] = BINARIES) -> Path:
    return cache_dir(binaries) / "bin"


def is_built(binaries: tuple[str, ...] = BINARIES) -> bool:
    """True only when the marker exists and every binary it lists is present and executable."""
    marker = cache_dir(binaries) / MARKER_NAME
    if not marker.is_file():
        return False
    try:
        listed = json.loads(marker.read_text())["binaries"]
    except (ValueError, KeyError):
        return False
    present = all(os.access(bin_dir(binaries) / name, os.X_OK) for name in listed)
    return present and set(listed) >= set(binaries)


def ensure_built(binaries: tuple[str, ...] = BINARIES) -> Path:
    """Return the directory holding ``binaries``, building them first if the cache has none."""
    return _ensure((binaries,))[0]


def ensure_all_built() -> tuple[Path, Path]:
    """Return the control plane's and the node's directories, building whatever is missing in one compile."""
    control_plane, node = _ensure((BINARIES, NODE_BINARIES))
    return control_plane, node


def _ensure(sets: tuple[tuple[str, ...], ...]) -> list[Path]:
    # Locked (and built) always in the order of the folders' paths, the control plane's first: two processes
    # never each hold a lock the other one waits for.
    missing = sorted((binaries for binaries in sets if not is_built(binaries)), key=cache_dir)
    if missing:
        with ExitStack() as locks:
            for binaries in missing:
                cache_dir(binaries).mkdir(parents=True, exist_ok=True)
                locks.enter_context(_exclusive_lock(cache_dir(binaries) / "build.lock"))
            # Another process may have finished a set while we waited for its lock.
            still_missing = tuple(binaries for binaries in missing if not is_built(binaries))
            if still_missing:
                _build(still_missing)
    return [bin_dir(binaries) for binaries in sets]


@contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _run(args: list[str], cwd: Path | None = None, env: dict[str, str] | None = None) -> None:
    log.info("$ %s", " ".join(args))
    subprocess.run(args, cwd=cwd, env=env, check=True)


def ensure_packages(packages: tuple[str, ...]) -> None:
    """apt-get install the packages that are not installed yet (running apt-get update only if needed)."""
    missing = [p for p in packages if not _dpkg_installed(p)]
    if not missing:
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    _run(["apt-get", "update", "-q"], env=env)
    _run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing], env=env)


def _dpkg_installed(package: str) -> bool:
    result = subprocess.run(["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True, check=False)
    return result.returncode == 0 and "install ok installed" in result.stdout


def _ensure_deb_src() -> bool:
    """Add deb-src entries mirroring the machine's deb entries; True if the list changed."""
    if DEB_SRC_LIST.exists():
        return False
    if DEBIAN_SOURCES.exists():
        stanzas = DEBIAN_SOURCES.read_text().split("\n\n")
        text = "\n\n".join(s.replace("Types: deb\n", "Types: deb-src\n", 1) for s in stanzas if "Types: deb" in s)
    else:
        text = (
            "Types: deb-src\nURIs: http://deb.debian.org/debian\nSuites: bookworm bookworm-updates\n"
            "Components: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
        )
    DEB_SRC_LIST.write_text(text.rstrip("\n") + "\n")
    return True


def _download_source(workdir: Path) -> Path:
    tarball = workdir / ORIG_TARBALL
    if not (tarball.exists() and _sha256(tarball) == ORIG_SHA256):
        if _ensure_deb_src():
            _run(["apt-get", "update", "-q"])
        _run(["apt-get", "source", "--download-only", f"kubernetes={DEBIAN_VERSION}"], cwd=workdir)
    digest = _sha256(tarball)
    if digest != ORIG_SHA256:
        raise RuntimeError(f"{tarball.name}: sha256 {digest}, expected {ORIG_SHA256}")
    return tarball


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _unpack(tarball: Path, workdir: Path) -> Path:
    """Unpack into a fresh directory and return the tree's root (the folder holding the Makefile)."""
    src = workdir / "src"
    if src.exists():
        shutil.rmtree(src)
    src.mkdir()
    _run(["tar", "-xzf", str(tarball), "-C", str(src)])
    roots = [p.parent for p in src.glob("*/Makefile")] or ([src] if (src / "Makefile").exists() else [])
    if not roots:
        raise RuntimeError(f"no Makefile at the top of {tarball.name}")
    return roots[0]


def _patch_reflect2(tree: Path) -> None:
    target = tree / "vendor" / "github.com" / "modern-go" / "reflect2"
    sources = [p for p in DEBIAN_REFLECT2.iterdir() if p.suffix in (".go", ".s") and not p.stem.endswith("_test")]
    if not sources:
        raise RuntimeError(f"no reflect2 sources in {DEBIAN_REFLECT2}")
    for old in target.iterdir():
        if old.suffix in (".go", ".s"):
            old.unlink()
    for new in sources:
        shutil.copy2(new, target / new.name)


def _compile(tree: Path, binaries: tuple[str, ...]) -> Path:
    env = {
        **os.environ,
        "PATH": f"{GO_BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        "CGO_ENABLED": "0",
        "GOCACHE": str(tree.parent / "gocache"),
    }
    env.pop("GOPATH", None)
    what = " ".join(f"cmd/{name}" for name in binaries)
    _run(["make", f"WHAT={what}"], cwd=tree, env=env)
    found = {p.name: p for p in (tree / "_output").rglob("*") if p.name in binaries and p.is_file()}
    missing = set(binaries) - set(found)
    if missing:
        raise RuntimeError(f"build finished without {sorted(missing)}")
    return found[binaries[0]].parent


def _install(out: Path, binaries: tuple[str, ...]) -> None:
    """Move the binaries into place, then write the marker (last, so a half-finished build never counts)."""
    staging = cache_dir(binaries) / "bin.partial"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    for name in binaries:
        shutil.copy2(out / name, staging / name)
        (staging / name).chmod(0o755)
    if bin_dir(binaries).exists():
        shutil.rmtree(bin_dir(binaries))
    staging.rename(bin_dir(binaries))
    marker = {
        "version": K8S_VERSION,
        "debian": DEBIAN_VERSION,
        "binaries": list(binaries),
        "built": time.time(),
    }
    tmp = cache_dir(binaries) / (MARKER_NAME + ".tmp")
    tmp.write_text(json.dumps(marker, indent=2))
    tmp.rename(cache_dir(binaries) / MARKER_NAME)


def _build(sets: tuple[tuple[str, ...], ...]) -> None:
    """Compile every set in one ``make`` from one unpacked tree, then install each into its own folder."""
    for binaries in sets:
        (cache_dir(binaries) / MARKER_NAME).unlink(missing_ok=True)
    workdir = cache_dir(sets[0]) / "work"
    workdir.mkdir(exist_ok=True)
    started = time.monotonic()
    names = tuple(name for binaries in sets for name in binaries)
    out = _compile_from_source(workdir, names)
    for binaries in sets:
        _install(out, binaries)
    shutil.rmtree(workdir)  # the source tree and Go cache are several GiB; only the binaries are kept
    folders = " and ".join(str(bin_dir(binaries)) for binaries in sets)
    log.info("built %s in %.0f s into %s", ", ".join(names), time.monotonic() - started, folders)


def _compile_from_source(workdir: Path, binaries: tuple[str, ...]) -> Path:
    """Fetch and unpack Debian's source in ``workdir``, compile ``binaries``; return the folder holding them."""
    ensure_packages(BUILD_PACKAGES)
    tarball = _download_source(workdir)
    tree = _unpack(tarball, workdir)
    _patch_reflect2(tree)
    return _compile(tree, binaries)


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    ensure_packages(RUNTIME_PACKAGES)
    print(ensure_built())
    return 0


if __name__ == "__main__":
    sys.exit(main())
