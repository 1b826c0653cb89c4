"""The offline installer: one signed tarball with everything an air-gapped host needs.

`appliance-installer-<version>.tar` holds a wheelhouse (this package, the portable
llama-cpp-python wheel and every dependency), install.sh, the systemd units,
SECURITY.md and the public keys to trust. Its detached signature (DER ECDSA P-256 over
SHA-256) verifies with the system openssl alone, before anything in it is used.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path

from appliance.errors import ApplianceError, UsageError
from appliance.trust.crypto import PublicKey, SigningKey
from appliance.trust.digest import sha256_file

LLAMA_CPP_WHEEL = "llama_cpp_python-0.3.36-*.whl"


@dataclass(frozen=True)
class InstallerArtifacts:
    tarball: Path
    signature: Path
    install_script: Path
    version: str
    wheels: tuple[str, ...]


def build_installer(
    source: Path, key: SigningKey, trusted: list[PublicKey], out_dir: Path, wheelhouse: Path
) -> InstallerArtifacts:
    """Build and sign the installer for the project checked out at `source`."""
    version = _project_version(source)
    if not list(wheelhouse.glob(LLAMA_CPP_WHEEL)):
        raise UsageError(f"no portable {LLAMA_CPP_WHEEL} in {wheelhouse}: run scripts/setup")
    if not trusted:
        raise UsageError("name at least one public key to trust (--trust-key)")
    out_dir.mkdir(parents=True, exist_ok=True)
    top = f"appliance-installer-{version}"
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".installer-") as work:
        root = Path(work) / top
        wheels = _collect_wheels(source, wheelhouse, root / "wheelhouse")
        shutil.copy(source / "installer" / "install.sh", root / "install.sh")
        shutil.copytree(source / "systemd", root / "systemd")
        shutil.copy(source / "SECURITY.md", root / "SECURITY.md")
        (root / "keys").mkdir()
        for public in trusted:
            (root / "keys" / f"{public.key_id[:16]}.pem").write_bytes(public.pem)
        (root / "VERSION").write_text(version + "\n")
        tarball = out_dir / f"{top}.tar"
        _write_tar(root, tarball)
    signature = tarball.with_name(tarball.name + ".sig")
    signature.write_bytes(key.sign_sha256_digest(bytes.fromhex(sha256_file(tarball))))
    script = out_dir / "install.sh"
    shutil.copy(source / "installer" / "install.sh", script)
    script.chmod(0o755)
    return InstallerArtifacts(tarball, signature, script, version, wheels)


def _project_version(source: Path) -> str:
    try:
        return tomllib.loads((source / "pyproject.toml").read_text())["project"]["version"]
    except (OSError, KeyError, tomllib.TOMLDecodeError) as exc:
        raise UsageError(f"{source} is not the project's source tree: {exc}") from exc


def _collect_wheels(source: Path, wheelhouse: Path, target: Path) -> tuple[str, ...]:
    """This package and every runtime dependency as wheels; llama-cpp-python only from
    the portable wheel in `wheelhouse`, never built or fetched here."""
    pip = [sys.executable, "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check"]
    command = [
        *pip,
        "--wheel-dir",
        str(target),
        "--find-links",
        str(wheelhouse),
        "--only-binary",
        "llama-cpp-python",
        str(source),
    ]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["pip failed"])[-1]
        raise ApplianceError(f"collecting wheels failed: {last}")
    return tuple(sorted(p.name for p in target.glob("*.whl")))


def _write_tar(root: Path, tarball: Path) -> None:
    partial = tarball.with_name(f".{tarball.name}.partial")
    with tarfile.open(partial, "w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted([root, *root.rglob("*")]):
            info = tar.gettarinfo(str(path), arcname=str(path.relative_to(root.parent)))
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mode = 0o755 if path.is_dir() or path.name == "install.sh" else 0o644
            if path.is_file():
                with open(path, "rb") as f:
                    tar.addfile(info, f)
            else:
                tar.addfile(info)
    partial.replace(tarball)
