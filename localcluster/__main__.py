"""``python -m localcluster build|up|down|status``: the local control plane by hand.

``up`` prints the lines to paste into a shell (``export KUBECONFIG=...`` and this cluster's kubectl on PATH);
the components keep running after the command returns, until ``down`` stops them by the PIDs recorded in the
workdir.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from localcluster import build, images, node
from localcluster.cluster import ClusterError, LocalCluster


def default_workdir() -> Path:
    base = Path(os.environ.get("XDG_STATE_HOME", Path.home() / ".local" / "state"))
    return base / "reflection-operator" / "localcluster"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m localcluster", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("build", "up", "down", "status"))
    parser.add_argument("--workdir", type=Path, default=default_workdir(), help="default: %(default)s")
    parser.add_argument("--timeout", type=float, default=180, help="seconds to wait for readiness (up)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)

    if args.command == "build":
        build.ensure_packages(build.RUNTIME_PACKAGES + node.NODE_PACKAGES)
        # the control plane, kubelet and kube-proxy (one compile when all are missing), then the node's images
        for folder in build.ensure_all_built():
            print(folder)
        images.build_images()
        return 0
    cluster = LocalCluster(args.workdir)
    if args.command == "up":
        try:
            cluster.start(timeout=args.timeout)
        except ClusterError as error:
            print(f"localcluster: {error}", file=sys.stderr)
            return 1
        print(f"export KUBECONFIG={cluster.kubeconfig}")
        print(f"export PATH={cluster.bin_dir}:$PATH")
        print("# images: reflection-operator:0.1.0 and reflection-importer:0.1.0 (the chart's defaults)")
        return 0
    if args.command == "down":
        cluster.stop()
        return 0
    running = cluster.is_running()
    print(f"running at {cluster.server}" if running else "not running")
    return 0 if running else 3


if __name__ == "__main__":
    sys.exit(main())
