"""`elma keys`: the administrator's way to add, list and revoke devices, run as a user would."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from elma_utils.edge.identity import DeviceRegistry
from elma_utils.edge.ssh_keys import fingerprint, generate_ed25519_key, load_authorized_keys
from elma_utils.server.device_keys import add_device, list_devices, revoke_device


def elma(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "elma_utils.cli", "keys", *args], capture_output=True, text=True
    )


@pytest.fixture
def device_keys(tmp_path):
    return {name: generate_ed25519_key(tmp_path / name, comment=name) for name in ("tx2-01", "tx2-02")}


def test_add_list_revoke_with_the_cli(tmp_path, device_keys):
    ak = tmp_path / "server" / "authorized_keys"
    for name in device_keys:
        done = elma(
            "add",
            "--authorized-keys",
            str(ak),
            "--device",
            name,
            "--public-key",
            str(tmp_path / f"{name}.pub"),
        )
        assert done.returncode == 0, done.stderr
        assert f"added device {name}" in done.stdout
    assert ak.stat().st_mode & 0o777 == 0o600
    listed = json.loads(elma("list", "--authorized-keys", str(ak), "--json").stdout)
    assert [(d["device_id"], d["fingerprint"]) for d in listed] == [
        (name, fingerprint(key)) for name, key in device_keys.items()
    ]
    # The endpoint and the signature check see the same devices.
    assert len(load_authorized_keys(ak)) == 2
    assert set(DeviceRegistry(ak).devices()) == {"tx2-01", "tx2-02"}

    revoked = elma("revoke", "--authorized-keys", str(ak), "--device", "tx2-01")
    assert revoked.returncode == 0 and "revoked device tx2-01" in revoked.stdout
    assert [d["device_id"] for d in list_devices(ak)] == ["tx2-02"]
    assert [k.asbytes() for k in load_authorized_keys(ak)] == [device_keys["tx2-02"].asbytes()]


def test_mistakes_get_one_line_and_change_nothing(tmp_path, device_keys):
    ak = tmp_path / "authorized_keys"
    add_device(ak, "tx2-01", tmp_path / "tx2-01.pub")
    before = ak.read_text()
    cases = {
        "already registered": ("add", "--device", "tx2-01", "--public-key", str(tmp_path / "tx2-02.pub")),
        "already registered as device 'tx2-01'": (
            "add",
            "--device",
            "other",
            "--public-key",
            str(tmp_path / "tx2-01.pub"),
        ),
        "must be 1-64 characters": (
            "add",
            "--device",
            "bad id!",
            "--public-key",
            str(tmp_path / "tx2-02.pub"),
        ),
        "not found": ("add", "--device", "tx2-03", "--public-key", str(tmp_path / "missing.pub")),
        "no device 'ghost'": ("revoke", "--device", "ghost"),
        "needs --device": ("revoke",),
    }
    for expected, args in cases.items():
        done = elma(args[0], "--authorized-keys", str(ak), *args[1:])
        assert done.returncode == 2, (args, done.stdout, done.stderr)
        assert expected in done.stderr and "Traceback" not in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
    assert ak.read_text() == before


def test_revoke_removes_only_that_device(tmp_path, device_keys):
    ak = tmp_path / "authorized_keys"
    ak.write_text("# the administrator's own note\n")
    add_device(
        ak, "tx2-01", tmp_path / "tx2-01.pub", options='restrict,port-forwarding,permitopen="127.0.0.1:7000"'
    )
    add_device(ak, "tx2-02", (tmp_path / "tx2-02.pub").read_text())
    assert revoke_device(ak, "tx2-01") == 1
    assert revoke_device(ak, "tx2-01") == 0
    assert ak.read_text().splitlines()[0] == "# the administrator's own note"
    assert [d["device_id"] for d in list_devices(ak)] == ["tx2-02"]


def test_an_administrators_file_mode_is_kept(tmp_path, device_keys):
    """sshd reads the file as the device account, so an administrator may have made it 0644."""
    ak = tmp_path / "authorized_keys"
    add_device(ak, "tx2-01", tmp_path / "tx2-01.pub")
    assert ak.stat().st_mode & 0o777 == 0o600
    ak.chmod(0o644)
    add_device(ak, "tx2-02", tmp_path / "tx2-02.pub")
    revoke_device(ak, "tx2-01")
    assert ak.stat().st_mode & 0o777 == 0o644
