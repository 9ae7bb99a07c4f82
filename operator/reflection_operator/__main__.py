"""``python -m reflection_operator``: run the operator (the chart's Deployment runs exactly this).

Subcommands:
  run (default)   the operator, with kopf's liveness endpoint and the Prometheus metrics server
  importer-rbac   print the ServiceAccount, Role and RoleBinding the importer needs in a namespace (YAML)
"""

from __future__ import annotations

import argparse
import sys

import kopf
import yaml

from importer import __version__

from .rbac import importer_rbac
from .settings import Settings, SettingsError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="reflection-operator", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"reflection-operator {__version__}")
    commands = parser.add_subparsers(dest="command")
    run = commands.add_parser("run", help="run the operator (settings from REFLECTION_* variables)")
    run.add_argument("--verbose", action="store_true", help="debug logging")
    rbac = commands.add_parser("importer-rbac", help="print the importer's ServiceAccount, Role, RoleBinding")
    rbac.add_argument("--namespace", "-n", required=True)
    rbac.add_argument("--service-account", default=None, help="default: REFLECTION_IMPORTER_SERVICE_ACCOUNT")
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
    except SettingsError as error:
        print(f"reflection-operator: {error}", file=sys.stderr)
        return 2
    if args.command == "importer-rbac":
        account = args.service_account or settings.importer_service_account
        print(yaml.safe_dump_all(importer_rbac(args.namespace, account), sort_keys=False), end="")
        return 0
    run_operator(settings, verbose=bool(getattr(args, "verbose", False)))
    return 0


def run_operator(settings: Settings, verbose: bool = False) -> None:
    from . import handlers  # noqa: F401  (registers the handlers with kopf)
    from .metrics import serve

    log_format = kopf.LogFormat.JSON if settings.json_logs(sys.stderr.isatty()) else kopf.LogFormat.FULL
    kopf.configure(verbose=verbose, log_format=log_format)
    if settings.metrics_port:
        serve(settings.metrics_port)
    liveness = f"http://0.0.0.0:{settings.liveness_port}/healthz" if settings.liveness_port else None
    # One replica (the Deployment uses the Recreate strategy), so no peering is needed.
    kopf.run(
        standalone=True,
        clusterwide=not settings.namespaces,
        namespaces=settings.namespaces,
        liveness_endpoint=liveness,
    )


if __name__ == "__main__":
    sys.exit(main())
