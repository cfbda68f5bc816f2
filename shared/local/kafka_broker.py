"""A real Apache Kafka broker (KRaft, broker + controller in one JVM) for local runs and tests.

The jars come from Maven Central through ``kafka/pom.xml`` (``mvn dependency:copy-dependencies``)
into a cache outside the repository; nothing is downloaded any other way. The broker listens on
free loopback ports and keeps its data in the directory it is given.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

KAFKA_VERSION = "4.1.1"
_HERE = Path(__file__).resolve().parent / "kafka"


class BrokerStartError(RuntimeError):
    """The local Kafka broker did not come up; the message carries the tail of its log."""


def cache_dir() -> Path:
    base = os.environ.get("WINBACK_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "winback"
    )
    return Path(base) / f"kafka-{KAFKA_VERSION}" / "libs"


def ensure_jars() -> Path:
    """Fetch the broker jars with Maven if the cache does not hold them yet."""
    libs = cache_dir()
    marker = libs / ".complete"
    if marker.exists():
        return libs
    mvn = shutil.which("mvn")
    if mvn is None:
        raise BrokerStartError("Maven (mvn) is needed to fetch the Kafka jars and is not on PATH")
    libs.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [
            mvn,
            "-B",
            "-q",
            "-f",
            str(_HERE / "pom.xml"),
            "dependency:copy-dependencies",
            f"-DoutputDirectory={libs}",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise BrokerStartError(f"mvn could not fetch the Kafka jars:\n{proc.stdout}\n{proc.stderr}")
    marker.touch()
    return libs


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _properties(data_dir: Path, broker_port: int, controller_port: int) -> str:
    return "\n".join(
        [
            "process.roles=broker,controller",
            "node.id=1",
            f"controller.quorum.voters=1@127.0.0.1:{controller_port}",
            f"listeners=PLAINTEXT://127.0.0.1:{broker_port},CONTROLLER://127.0.0.1:{controller_port}",
            f"advertised.listeners=PLAINTEXT://127.0.0.1:{broker_port}",
            "controller.listener.names=CONTROLLER",
            "inter.broker.listener.name=PLAINTEXT",
            "listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            f"log.dirs={data_dir / 'logs'}",
            "num.partitions=1",
            "auto.create.topics.enable=false",
            "offsets.topic.replication.factor=1",
            "offsets.topic.num.partitions=4",
            "transaction.state.log.replication.factor=1",
            "transaction.state.log.min.isr=1",
            "share.coordinator.state.topic.replication.factor=1",
            "share.coordinator.state.topic.min.isr=1",
            "group.initial.rebalance.delay.ms=0",
            "log.retention.hours=24",
            "message.max.bytes=1048588",
            "",
        ]
    )


@dataclass
class LocalKafka:
    """One KRaft broker+controller process. ``start()`` blocks until it answers on its port."""

    data_dir: Path
    heap: str = "512m"
    broker_port: int = field(default_factory=free_port)
    controller_port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.broker_port}"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "broker.log"

    def _java(self, libs: Path) -> list[str]:
        java = shutil.which("java")
        if java is None:
            raise BrokerStartError(
                "Java is needed to run the local Kafka broker and is not on PATH"
            )
        return [
            java,
            f"-Xmx{self.heap}",
            f"-Xms{self.heap}",
            "-XX:+UseSerialGC",
            "-XX:TieredStopAtLevel=1",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={_HERE / 'log4j2.properties'}",
            "-cp",
            f"{libs}/*",
        ]

    def start(self, timeout: float = 90.0) -> LocalKafka:
        libs = ensure_jars()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        props = self.data_dir / "server.properties"
        formatted = (self.data_dir / "logs" / "meta.properties").exists()
        if formatted and props.exists():
            # Reuse the ports the stored cluster was formatted with.
            for line in props.read_text().splitlines():
                if line.startswith("controller.quorum.voters="):
                    self.controller_port = int(line.rsplit(":", 1)[1])
                if line.startswith("advertised.listeners="):
                    self.broker_port = int(line.rsplit(":", 1)[1])
            if not _port_free(self.broker_port) or not _port_free(self.controller_port):
                self.broker_port, self.controller_port = free_port(), free_port()
        props.write_text(_properties(self.data_dir, self.broker_port, self.controller_port))
        started_at = len(_read(self.log_path))  # a restart finds the marker of the last start
        with self.log_path.open("ab") as log:
            if not formatted:
                fmt = subprocess.run(
                    [
                        *self._java(libs),
                        "kafka.tools.StorageTool",
                        "format",
                        # "=" form: a random id may start with "-"
                        f"--cluster-id={_cluster_id()}",
                        "--config",
                        str(props),
                        "--ignore-formatted",
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    check=False,
                )
                if fmt.returncode != 0:
                    raise BrokerStartError(f"kafka storage format failed:\n{self.log_tail()}")
            self.process = subprocess.Popen(
                [*self._java(libs), "kafka.Kafka", str(props)],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BrokerStartError(
                    f"the Kafka broker exited with {self.process.returncode}:\n{self.log_tail()}"
                )
            started = b"Kafka Server started" in _read(self.log_path)[started_at:]
            if started and not _port_free(self.broker_port):
                return self
            time.sleep(0.2)
        self.stop()
        raise BrokerStartError(f"the Kafka broker did not start in {timeout}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 60) -> str:
        text = _read(self.log_path).decode(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def kill(self) -> None:
        """SIGKILL the broker's JVM, as a crash would: no controlled shutdown, the next start
        recovers its logs."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.kill()
        self.process.wait(timeout=30)

    def restart(self, timeout: float = 90.0) -> LocalKafka:
        """Start again (after ``kill`` or ``stop``) on the same ports and data directory, so
        clients find it where it was; waits for the old process's ports to be released."""
        self.kill()
        deadline = time.monotonic() + timeout
        while not (_port_free(self.broker_port) and _port_free(self.controller_port)):
            if time.monotonic() > deadline:
                raise BrokerStartError(
                    f"ports {self.broker_port}/{self.controller_port} still taken after {timeout}s"
                )
            time.sleep(0.1)
        return self.start(timeout=max(1.0, deadline - time.monotonic()))

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return b""


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def _cluster_id() -> str:
    # Kafka wants a base64url-encoded 16-byte UUID without padding.
    import base64

    return base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["--fetch"]:
        print(f"Kafka {KAFKA_VERSION} jars in {ensure_jars()}")
    else:
        raise SystemExit("usage: python -m shared.local.kafka_broker --fetch")
