"""Certificates, keys and tokens for a control plane that listens on 127.0.0.1 only (made with openssl)."""

from __future__ import annotations

import base64
import secrets
import subprocess
from dataclasses import dataclass
from pathlib import Path

import yaml

DAYS = "3650"
SERVING_NAMES = (
    "IP:127.0.0.1",
    "IP:10.0.0.1",
    "IP:10.244.0.1",  # the real node's bridge, where the API server listens when a real node runs
    "DNS:localhost",
    "DNS:kubernetes",
    "DNS:kubernetes.default",
    "DNS:kubernetes.default.svc",
    "DNS:kubernetes.default.svc.cluster.local",
)
#: name -> (user, groups). The controller-manager and the scheduler get their bootstrap RBAC identities;
#: kubelet is an admin (this cluster runs no Node authorizer; it reads the Secrets and ConfigMaps its Pods use).
IDENTITIES = {
    "admin": ("admin", "system:masters"),
    "controller-manager": ("system:kube-controller-manager", ""),
    "scheduler": ("system:kube-scheduler", ""),
    "kubelet": ("localcluster-kubelet", "system:masters"),
    # The bootstrap ClusterRoleBinding system:node-proxier gives this user what kube-proxy needs.
    "kube-proxy": ("system:kube-proxy", ""),
}


@dataclass(frozen=True)
class Pki:
    dir: Path

    @property
    def ca_cert(self) -> Path:
        return self.dir / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.dir / "ca.key"

    @property
    def serving_cert(self) -> Path:
        return self.dir / "apiserver.crt"

    @property
    def serving_key(self) -> Path:
        return self.dir / "apiserver.key"

    @property
    def sa_key(self) -> Path:
        return self.dir / "sa.key"

    @property
    def sa_pub(self) -> Path:
        return self.dir / "sa.pub"

    @property
    def kubelet_client_cert(self) -> Path:
        """The API server's client certificate towards kubelets (logs, exec), in group system:masters."""
        return self.dir / "apiserver-kubelet-client.crt"

    @property
    def kubelet_client_key(self) -> Path:
        return self.dir / "apiserver-kubelet-client.key"

    @property
    def tokens_csv(self) -> Path:
        return self.dir / "tokens.csv"

    def tokens(self) -> dict[str, str]:
        """name -> bearer token, read back from the static token file."""
        result = {}
        for line in self.tokens_csv.read_text().splitlines():
            token, user = line.split(",")[:2]
            name = next(n for n, (u, _) in IDENTITIES.items() if u == user)
            result[name] = token
        return result


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def create_pki(directory: Path) -> Pki:
    """Create (once) the CA, the API server's serving certificate, the service-account keys and the tokens."""
    pki = Pki(directory)
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    if not pki.ca_cert.exists():
        _openssl(
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            DAYS,
            "-subj",
            "/CN=localcluster-ca",
            "-keyout",
            str(pki.ca_key),
            "-out",
            str(pki.ca_cert),
        )
    if not pki.serving_cert.exists():
        _create_serving_cert(pki)
    if not pki.kubelet_client_cert.exists():
        _sign(
            pki,
            "/O=system:masters/CN=kube-apiserver-kubelet-client",
            "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n",
            pki.kubelet_client_key,
            pki.kubelet_client_cert,
        )
    if not pki.sa_pub.exists():
        _openssl("genrsa", "-out", str(pki.sa_key), "2048")
        _openssl("rsa", "-in", str(pki.sa_key), "-pubout", "-out", str(pki.sa_pub))
    if not pki.tokens_csv.exists():
        lines = [_token_line(user, groups) for user, groups in IDENTITIES.values()]
        pki.tokens_csv.write_text("\n".join(lines) + "\n")
        pki.tokens_csv.chmod(0o600)
    return pki


def _token_line(user: str, groups: str) -> str:
    line = f"{secrets.token_hex(24)},{user},{user}"
    return f'{line},"{groups}"' if groups else line


def _create_serving_cert(pki: Pki) -> None:
    extensions = (
        "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
        f"extendedKeyUsage=serverAuth\nsubjectAltName={','.join(SERVING_NAMES)}\n"
    )
    _sign(pki, "/CN=kube-apiserver", extensions, pki.serving_key, pki.serving_cert)


def _sign(pki: Pki, subject: str, extensions: str, key: Path, cert: Path) -> None:
    """A new key and a certificate for ``subject`` signed by the CA, with the given X.509 extensions."""
    csr = cert.with_suffix(".csr")
    ext_file = cert.with_suffix(".ext")
    ext_file.write_text(extensions)
    _openssl("req", "-new", "-newkey", "rsa:2048", "-nodes", "-subj", subject, "-keyout", str(key), "-out", str(csr))
    _openssl(
        "x509",
        "-req",
        "-in",
        str(csr),
        "-CA",
        str(pki.ca_cert),
        "-CAkey",
        str(pki.ca_key),
        "-CAcreateserial",
        "-days",
        DAYS,
        "-extfile",
        str(ext_file),
        "-out",
        str(cert),
    )
    csr.unlink()


def kubeconfig(server: str, ca_cert: Path, token: str, user: str) -> str:
    """A kubeconfig with everything inline, so it can be copied anywhere."""
    ca_data = base64.b64encode(ca_cert.read_bytes()).decode()
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "localcluster", "cluster": {"server": server, "certificate-authority-data": ca_data}}],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": "localcluster", "context": {"cluster": "localcluster", "user": user}}],
        "current-context": "localcluster",
    }
    return yaml.safe_dump(config, sort_keys=False)
