"""The systemd units: valid, hardened, and a network boundary of the kernel's (socket
activation on loopback, PrivateNetwork for the service)."""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import REPO

pytestmark = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="needs systemd-analyze"
)
UNITS = ("appliance.service", "appliance.socket")


@pytest.fixture
def units(tmp_path: Path) -> Path:
    """Both units, pointed at this checkout's venv so `verify` finds the executable."""
    venv_bin = REPO / ".venv" / "bin"
    for name in UNITS:
        text = (REPO / "systemd" / name).read_text()
        (tmp_path / name).write_text(text.replace("/opt/appliance/current/venv/bin", str(venv_bin)))
    return tmp_path


def settings(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # keys are case-sensitive in unit files
    parser.read_string(path.read_text())
    return parser


def test_systemd_units_are_valid_and_hardened(units):
    verify = subprocess.run(
        ["systemd-analyze", "verify", *(str(units / name) for name in UNITS)],
        capture_output=True,
        text=True,
    )
    assert verify.returncode == 0 and not verify.stderr.strip(), verify.stderr
    security = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", str(units / "appliance.service")],
        capture_output=True,
        text=True,
    )
    score = float(re.search(r"Overall exposure level for \S+: ([0-9.]+)", security.stdout)[1])
    assert score <= 2.0, security.stdout
    assert "✗ PrivateNetwork=" not in security.stdout


def test_socket_listens_on_loopback_only_and_service_has_no_network():
    socket_unit = settings(REPO / "systemd/appliance.socket")
    assert socket_unit["Socket"]["ListenStream"] == "127.0.0.1:8080"
    assert socket_unit["Socket"]["Accept"] == "no"
    assert socket_unit["Socket"]["IPAddressAllow"] == "localhost"
    text = (REPO / "systemd/appliance.socket").read_text()
    assert len(re.findall(r"^Listen\w+=", text, flags=re.M)) == 1  # nothing else listens

    service = settings(REPO / "systemd/appliance.service")
    assert service["Service"]["PrivateNetwork"] == "yes"
    assert service["Service"]["Type"] == "notify"
    assert service["Unit"]["Requires"] == "appliance.socket"
    assert "--require-socket-activation" in service["Service"]["ExecStart"]


def test_the_cold_path_dropin_admits_exactly_the_registered_addresses(units, run_cli):
    """`route units` writes the drop-in that takes the service out of its private network
    namespace with an IP filter admitting the loopback and the registered targets only;
    systemd reads it beside the unit without a complaint."""
    dropins = units / "appliance.service.d"
    result = run_cli("route", "units", "--out", dropins)
    assert (
        result.exit_code == 0
        and "keeps PrivateNetwork=yes" in (dropins / "cold-paths.conf").read_text()
    )
    for name, url in (("big", "http://10.0.0.7:8000/v1"), ("vllm", "http://[fd00::7]:9000")):
        assert run_cli("route", "add", name, "--url", url, "--model", "m").exit_code == 0
    assert run_cli("route", "units", "--out", dropins).exit_code == 0
    dropin = settings(dropins / "cold-paths.conf")["Service"]
    assert dropin["PrivateNetwork"] == "no" and dropin["IPAddressDeny"] == "any"
    # the unit's "localhost" is reset first (127.0.0.53 would reach a resolver)
    text = (dropins / "cold-paths.conf").read_text()
    allowed = re.findall(r"^IPAddressAllow=(.*)$", text, re.M)
    assert allowed == ["", "127.0.0.1 ::1 10.0.0.7 fd00::7"]
    verify = subprocess.run(
        ["systemd-analyze", "verify", str(units / "appliance.service")],
        capture_output=True,
        text=True,
    )
    assert verify.returncode == 0 and not verify.stderr.strip(), verify.stderr
