"""The offline installer: signed with a key openssl checks on its own, installed with no
network into a directory tree, idempotent, upgradable with software rollback; and what
install.sh reads: the very bytes openssl verified, never a second read of the operator's
path."""

from __future__ import annotations

import errno
import json
import os
import re
import select
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
from conftest import REPO

from appliance.bundler.installer import build_installer
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


def install(tarball: Path, root: Path, public_key: Path, *extra: str, env_extra=None):
    """Run install.sh (the copy shipped beside the tarball) in a namespace with no network."""
    script = tarball.parent / "install.sh"
    env = {k: v for k, v in os.environ.items() if k not in ("APPLIANCE_HOME", "APPLIANCE_ROOT")}
    env.update(env_extra or {})
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
    """The installed command as an operator runs it: no environment says where its root
    is (install.sh recorded it), so it must not touch this host's /etc or /var."""
    env = {k: v for k, v in os.environ.items() if k not in ("APPLIANCE_HOME", "APPLIANCE_ROOT")}
    app = root / "usr/local/bin/appliance"
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
    shipped = sorted([*(REPO / "systemd").glob("*.service"), *(REPO / "systemd").glob("*.socket")])
    assert REPO / "systemd/appliance.service" in shipped
    units = root / "etc/systemd/system"
    assert sorted(p.name for p in units.iterdir()) == [p.name for p in shipped]
    for unit in shipped:
        assert (units / unit.name).read_bytes() == unit.read_bytes(), unit.name
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
    assert not root.exists(), "nothing may be created before the signature check passes"


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


class FifoFeeder(threading.Thread):
    """Writes `feeds[0]` to the first process that opens the FIFO for reading and
    `feeds[-1]` to every later one: one path, different bytes on each read."""

    def __init__(self, fifo: Path, feeds: list[bytes], timeout: float = 300):
        super().__init__(daemon=True)
        self.fifo, self.feeds, self.deadline = fifo, feeds, time.monotonic() + timeout
        self.stop = threading.Event()
        self.readers = 0

    def run(self) -> None:
        while not self.stop.is_set() and time.monotonic() < self.deadline:
            try:
                fd = os.open(self.fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as exc:
                if exc.errno != errno.ENXIO:  # ENXIO: nobody has it open for reading yet
                    raise
                time.sleep(0.005)
                continue
            try:
                self.feed(fd, self.feeds[min(self.readers, len(self.feeds) - 1)])
            finally:
                os.close(fd)
            self.readers += 1
            # Let this reader see EOF and go before a new writer joins the same read.
            self.stop.wait(0.5)

    def feed(self, fd: int, data: bytes) -> None:
        view = memoryview(data)
        while view and not self.stop.is_set() and time.monotonic() < self.deadline:
            if not select.select([], [fd], [], 0.1)[1]:
                continue
            try:
                view = view[os.write(fd, view[: 1 << 16]) :]
            except BlockingIOError:
                continue
            except BrokenPipeError:  # the reader stopped early (tar at the end marker)
                return


def installed_version(root: Path) -> str | None:
    app = root / "opt/appliance/current/venv/bin/appliance"
    return installed(root, "--version").stdout.strip() if app.exists() else None


def test_fifo_that_hands_openssl_and_tar_different_bytes_installs_only_what_was_verified(
    installer_v1, installer_v2, installer_keys, tmp_path
):
    """A FIFO answers each open with other bytes: openssl would get the signed v1 and tar
    the v2 (99.0.0) unless install.sh reads the path exactly once."""
    signer, _ = installer_keys
    fifo = tmp_path / installer_v1.name
    os.mkfifo(fifo)
    shutil.copy(f"{installer_v1}.sig", f"{fifo}.sig")
    shutil.copy(installer_v1.parent / "install.sh", tmp_path / "install.sh")
    feeder = FifoFeeder(fifo, [installer_v1.read_bytes(), installer_v2.read_bytes()])
    feeder.start()
    root = tmp_path / "root"
    try:
        done = install(fifo, root, signer.public_key)
    finally:
        feeder.stop.set()
        feeder.join(timeout=10)
    assert installed_version(root) != "appliance, version 99.0.0", "tar read other bytes"
    assert done.returncode == 0, done.stdout + done.stderr
    assert installed_version(root) == "appliance, version 0.1.0"
    assert feeder.readers == 1, "install.sh must read the operator's tarball exactly once"


def test_tarball_swapped_after_openssl_verified_it_is_not_what_gets_installed(
    installer_v1, installer_v2, installer_keys, tmp_path
):
    """The file is replaced the moment openssl exits (here by a shim first on PATH): tar
    must extract the verified copy, not whatever now sits at the operator's path."""
    signer, _ = installer_keys
    tarball = tmp_path / installer_v1.name
    shutil.copy(installer_v1, tarball)
    shutil.copy(f"{installer_v1}.sig", f"{tarball}.sig")
    shutil.copy(installer_v1.parent / "install.sh", tmp_path / "install.sh")
    shim_dir = tmp_path / "shim"
    shim_dir.mkdir()
    shim = shim_dir / "openssl"
    shim.write_text(
        "#!/bin/sh\n"
        f'"{shutil.which("openssl")}" "$@"\n'
        "status=$?\n"
        'cp "$SWAP_IN" "$SWAP_TARGET.new" && mv -f "$SWAP_TARGET.new" "$SWAP_TARGET"\n'
        "exit $status\n"
    )
    shim.chmod(0o755)
    env = {
        "PATH": f"{shim_dir}{os.pathsep}{os.environ['PATH']}",
        "SWAP_IN": str(installer_v2),
        "SWAP_TARGET": str(tarball),
    }
    root = tmp_path / "root"
    done = install(tarball, root, signer.public_key, env_extra=env)
    assert tarball.read_bytes() == installer_v2.read_bytes(), "the shim did not swap the file"
    assert installed_version(root) != "appliance, version 99.0.0", "tar read the swapped file"
    assert done.returncode == 0, done.stdout + done.stderr
    assert installed_version(root) == "appliance, version 0.1.0"
