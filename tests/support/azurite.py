"""Azurite (the Azure Storage emulator) for integration tests, started by the suite itself.

Through testcontainers when a Docker engine answers; otherwise the `azurite` program from npm
(installed by `make setup-dev` under .tools/, or found on PATH). Tests get the connection string
and the endpoints of the Blob, Queue and Table services.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass

from tests.support.paths import ROOT

ACCOUNT = "devstoreaccount1"
# The well-known development key of Azurite (public, documented, not a secret).
KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


@dataclass(frozen=True)
class Azurite:
    blob_url: str
    queue_url: str
    table_url: str
    how: str  # "docker" or "npm"

    @property
    def connection_string(self) -> str:
        return (
            f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={KEY};"
            f"BlobEndpoint={self.blob_url};QueueEndpoint={self.queue_url};TableEndpoint={self.table_url};"
        )


def docker_available() -> bool:
    try:
        import docker

        client = docker.from_env(timeout=3)
        client.ping()
        return True
    except Exception:
        return False


def azurite_program() -> str | None:
    local = ROOT / ".tools" / "node_modules" / ".bin" / "azurite"
    if local.exists():
        return str(local)
    return shutil.which("azurite")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for(port: int, process: subprocess.Popen | None, deadline: float) -> None:
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"azurite exited with code {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"azurite did not listen on port {port} in time")


class AzuriteNpm:
    """The npm program in a temporary folder, on free loopback ports."""

    def __init__(self, program: str) -> None:
        self.program = program
        self.folder = tempfile.mkdtemp(prefix="azurite-")
        self.ports = {name: _free_port() for name in ("blob", "queue", "table")}
        self.process: subprocess.Popen | None = None

    def start(self) -> Azurite:
        args = [
            self.program, "--silent", "--disableTelemetry", "--skipApiVersionCheck", "--loose", "--location", self.folder,
            "--blobHost", "127.0.0.1", "--queueHost", "127.0.0.1", "--tableHost", "127.0.0.1",
            "--blobPort", str(self.ports["blob"]), "--queuePort", str(self.ports["queue"]), "--tablePort", str(self.ports["table"]),
        ]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "AZURITE_ACCOUNTS": ""})
        deadline = time.monotonic() + 60
        for port in self.ports.values():
            _wait_for(port, self.process, deadline)
        return Azurite(
            blob_url=f"http://127.0.0.1:{self.ports['blob']}/{ACCOUNT}",
            queue_url=f"http://127.0.0.1:{self.ports['queue']}/{ACCOUNT}",
            table_url=f"http://127.0.0.1:{self.ports['table']}/{ACCOUNT}",
            how="npm",
        )

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
        shutil.rmtree(self.folder, ignore_errors=True)


class AzuriteDocker:
    def __init__(self) -> None:
        from testcontainers.azurite import AzuriteContainer

        self.container = AzuriteContainer()

    def start(self) -> Azurite:
        self.container.start()
        host = self.container.get_container_host_ip()
        port = lambda p: self.container.get_exposed_port(p)  # noqa: E731
        return Azurite(
            blob_url=f"http://{host}:{port(10000)}/{ACCOUNT}",
            queue_url=f"http://{host}:{port(10001)}/{ACCOUNT}",
            table_url=f"http://{host}:{port(10002)}/{ACCOUNT}",
            how="docker",
        )

    def stop(self) -> None:
        self.container.stop()
