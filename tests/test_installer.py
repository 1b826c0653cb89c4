"""The offline installer: signed with a key openssl checks on its own, installed with no
network into a directory tree, idempotent, upgradable with software rollback; and the
hardened systemd unit."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import REPO

from appliance.build.installer import build_installer
from appliance.trust.crypto import load_public_key, load_signing_key
from appliance.trust.keyfiles import write_key_pair

pytestmark = pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare")
SOURCE_FILES = ("pyproject.toml", "README.md", "SECURITY.md", "appliance", "installer", "systemd")


@pytest.fixture(scope="session")
def installer_keys(tmp_path_factory):
    keys = tmp_path_factory.mktemp("installer-keys")
    signer = write_key_pair(keys, "installer", None)
    release = write_key_pair(keys, "release", None)
    return signer, release


def build(source: Path, out: Path, installer_keys) -> Path:
    signer, release = installer_keys
    built = build_installer(
        source,
        load_signing_key(signer.private_key.read_bytes(), None),
        [load_public_key(release.public_key.read_bytes())],
        out,
        REPO / "wheelhouse",
    )
    return built.tarball


@pytest.fixture(scope="session")
def installer_v1(tmp_path_factory, installer_keys) -> Path:
    return build(REPO, tmp_path_factory.mktemp("installer-v1"), installer_keys)


@pytest.fixture(scope="session")
def installer_v2(tmp_path_factory, installer_keys) -> Path:
    """The same software, labelled one version up, built from a copy of the source."""
    source = tmp_path_factory.mktemp("source-v2")
    for name in SOURCE_FILES:
        copy = shutil.copytree if (REPO / name).is_dir() else shutil.copy
        copy(REPO / name, source / name)
    pyproject = source / "pyproject.toml"
    pyproject.write_text(
        re.sub(r'^version = ".*"', 'version = "99.0.0"', pyproject.read_text(), count=1, flags=re.M)
    )
    return build(source, tmp_path_factory.mktemp("installer-v2"), installer_keys)


def install(tarball: Path, root: Path, public_key: Path, *extra: str):
    """Run install.sh (the copy shipped beside the tarball) in a namespace with no network."""
    script = tarball.parent / "install.sh"
    env = {k: v for k, v in os.environ.items() if k not in ("APPLIANCE_HOME", "APPLIANCE_ROOT")}
    command = (
        f'echo "interfaces: $(tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d " ")"; '
        f'exec bash "{script}" --public-key "{public_key}" --root "{root}" {" ".join(extra)}'
        f' "{tarball}"'
    )
    return subprocess.run(
        ["unshare", "-rn", "bash", "-c", command],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def installed(root: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "APPLIANCE_HOME"}
    env["APPLIANCE_ROOT"] = str(root)
    app = root / "opt/appliance/current/venv/bin/appliance"
    return subprocess.run([str(app), *args], env=env, capture_output=True, text=True)


def test_signature_verifies_with_system_openssl(installer_v1, installer_keys):
    signer, _ = installer_keys
    done = subprocess.run(
        [
            "openssl",
            "dgst",
            "-sha256",
            "-verify",
            str(signer.public_key),
            "-signature",
            f"{installer_v1}.sig",
            str(installer_v1),
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0 and "Verified OK" in done.stdout


def test_installer_holds_everything_the_target_needs(installer_v1):
    import tarfile

    with tarfile.open(installer_v1) as tar:
        names = tar.getnames()
    top = "appliance-installer-0.1.0"
    for required in ("install.sh", "VERSION", "SECURITY.md", "systemd/appliance.service"):
        assert f"{top}/{required}" in names
    wheels = [n for n in names if n.endswith(".whl")]
    assert any("llama_cpp_python-0.3.36" in w for w in wheels)
    assert any("custom_slm_appliance-0.1.0" in w for w in wheels)
    assert len([n for n in names if n.startswith(f"{top}/keys/")]) == 1


def test_offline_install_into_a_root(installer_v1, installer_keys, tmp_path):
    signer, release = installer_keys
    root = tmp_path / "root"
    done = install(installer_v1, root, signer.public_key)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "interfaces: lo\n" in done.stdout, "the install must run with no network at all"
    assert installed(root, "--version").stdout.strip() == "appliance, version 0.1.0"
    assert os.readlink(root / "opt/appliance/current") == "versions/0.1.0"
    link = root / "usr/local/bin/appliance"
    assert os.readlink(link) == str(root / "opt/appliance/current/venv/bin/appliance")
    unit = root / "etc/systemd/system/appliance.service"
    assert unit.read_text() == (REPO / "systemd/appliance.service").read_text()
    assert (root / "var/lib/appliance").stat().st_mode & 0o777 == 0o750
    keys = json.loads(installed(root, "keys", "list", "--json").stdout)["keys"]
    assert [k["key_id"] for k in keys] == [release.key_id]
    audit_rows = json.loads(installed(root, "audit", "list", "--json").stdout)["rows"]
    assert [r["action"] for r in audit_rows] == ["key trust"]

    again = install(installer_v1, root, signer.public_key)
    assert again.returncode == 0, again.stderr
    assert "already installed" in again.stdout
    assert len(json.loads(installed(root, "audit", "list", "--json").stdout)["rows"]) == 1


def test_tampered_installer_is_refused_before_anything_happens(
    installer_v1, installer_keys, tmp_path
):
    signer, _ = installer_keys
    tampered = tmp_path / installer_v1.name
    data = bytearray(installer_v1.read_bytes())
    data[len(data) // 2] ^= 0x01
    tampered.write_bytes(bytes(data))
    shutil.copy(f"{installer_v1}.sig", f"{tampered}.sig")
    shutil.copy(installer_v1.parent / "install.sh", tmp_path / "install.sh")
    root = tmp_path / "root"
    done = install(tampered, root, signer.public_key)
    assert done.returncode == 10
    assert "signature check FAILED" in done.stderr
    assert list(root.iterdir()) == []


def test_installer_signed_by_another_key_is_refused(installer_v1, installer_keys, tmp_path):
    _, release = installer_keys  # a real key, but not the one that signed the installer
    done = install(installer_v1, tmp_path / "root", release.public_key)
    assert done.returncode == 10


def test_upgrade_keeps_the_previous_version_for_rollback(
    installer_v1, installer_v2, installer_keys, tmp_path
):
    signer, _ = installer_keys
    root = tmp_path / "root"
    assert install(installer_v1, root, signer.public_key).returncode == 0
    upgraded = install(installer_v2, root, signer.public_key)
    assert upgraded.returncode == 0, upgraded.stderr
    assert installed(root, "--version").stdout.strip() == "appliance, version 99.0.0"
    assert os.readlink(root / "opt/appliance/previous") == "versions/0.1.0"

    script = installer_v1.parent / "install.sh"
    rolled = subprocess.run(
        ["bash", str(script), "--rollback", "--root", str(root)], capture_output=True, text=True
    )
    assert rolled.returncode == 0, rolled.stderr
    assert installed(root, "--version").stdout.strip() == "appliance, version 0.1.0"
    assert os.readlink(root / "opt/appliance/previous") == "versions/99.0.0"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_systemd_unit_is_valid_and_hardened(tmp_path):
    venv_bin = REPO / ".venv" / "bin"
    unit = tmp_path / "appliance.service"
    # Point the unit at this checkout's venv so `verify` can check the executable exists.
    unit.write_text(
        (REPO / "systemd/appliance.service")
        .read_text()
        .replace("/opt/appliance/current/venv/bin", str(venv_bin))
    )
    verify = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True
    )
    assert verify.returncode == 0, verify.stderr
    security = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", str(unit)], capture_output=True, text=True
    )
    score = float(re.search(r"Overall exposure level for \S+: ([0-9.]+)", security.stdout)[1])
    assert score <= 2.0, security.stdout
