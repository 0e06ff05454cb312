"""scripts/start-azurite.sh, the Azurite of the documented `func start` workflow."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time

import pytest

from tests.support.azurite import azurite_program
from tests.support.paths import ROOT


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.integration
def test_start_azurite_script_serves_blob_queue_and_table(tmp_path):
    if azurite_program() is None:
        pytest.fail("azurite is needed: run `make setup-dev`")
    ports = {"AZURITE_BLOB_PORT": _free_port(), "AZURITE_QUEUE_PORT": _free_port(), "AZURITE_TABLE_PORT": _free_port()}
    env = {**os.environ, "AZURITE_DIR": str(tmp_path / "data"), **{k: str(v) for k, v in ports.items()}}
    process = subprocess.Popen([str(ROOT / "scripts" / "start-azurite.sh")], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        pending = set(ports.values())
        while pending and time.monotonic() < deadline:
            assert process.poll() is None, process.stderr.read().decode()
            for port in list(pending):
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                        pending.discard(port)
                except OSError:
                    pass
            time.sleep(0.1)
        assert not pending, f"azurite did not listen on {pending}"
        from azure.storage.blob import BlobServiceClient

        from tests.support.azurite import ACCOUNT, KEY

        blob = BlobServiceClient(f"http://127.0.0.1:{ports['AZURITE_BLOB_PORT']}/{ACCOUNT}", credential={"account_name": ACCOUNT, "account_key": KEY})
        blob.create_container("checkpoints")
        assert [c.name for c in blob.list_containers()] == ["checkpoints"]
        assert (tmp_path / "data").is_dir()
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=10)
        process.stdout.close()
        process.stderr.close()


def test_start_azurite_script_explains_when_azurite_is_missing(tmp_path):
    fake_root = tmp_path / "checkout"
    (fake_root / "scripts").mkdir(parents=True)
    script = fake_root / "scripts" / "start-azurite.sh"
    script.write_text((ROOT / "scripts" / "start-azurite.sh").read_text())
    script.chmod(0o755)
    result = subprocess.run([str(script)], env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}, capture_output=True, timeout=30)
    assert result.returncode == 1
    assert b"azurite not found; run 'make setup-dev'" in result.stderr
