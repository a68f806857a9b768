"""A multi-node Ray cluster on this machine, for tests and benchmarks: ``ray start`` processes on 127.0.0.1 only.

    with LocalCluster(nodes=2, cpus_per_node=1) as cluster:
        run(Config(..., engine="ray", address=cluster.address))

Each node is a separate ``ray start`` (its own raylet and workers), so killing a worker or a node is
real. Every Ray process needs the cluster's auth token (Ray 2.60 authenticates connections): it is
generated here and put in ``os.environ`` (and ``env``, for subprocesses) while the cluster runs.
``ray stop --force`` on exit ends *every* Ray process of the machine: use it only where nothing else
runs Ray.

Loopback only: Ray 2.60 rewrites ``--node-ip-address 127.0.0.1`` into the machine's network address (so
that other machines could join) and then listens on every interface. Here the nodes keep 127.0.0.1 (each
``ray start`` runs with that rewrite turned off, ``_RAY_START``), and every process of the cluster and
its drivers runs with ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, Ray's own switch for "this machine only",
under which Ray resolves the local address to loopback. ``listening()`` lists what the cluster's
processes listen on (tested: loopback only).
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path

RAY = str(Path(sys.executable).with_name("ray"))
# ``ray start`` with the loopback address kept as given. With RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 Ray would
# refuse a second node ("not supported on Windows and OSX"); this is Linux, so the process allows it.
_RAY_START = ("import sys\n"
              "from ray._private import ray_constants, services\n"
              "ray_constants.ENABLE_RAY_CLUSTER = True\n"
              "services.resolve_ip_for_localhost = lambda host: host\n"
              "from ray.scripts.scripts import main\n"
              "sys.argv[0] = 'ray'\n"
              "sys.exit(main())\n")
REPO = Path(__file__).resolve().parents[1]
# Agents that every node starts on a fixed default port: two nodes on one machine need their own.
_NODE_PORTS = ("--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
               "--dashboard-agent-grpc-port", "--metrics-export-port", "--runtime-env-agent-port")


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports free on 127.0.0.1 right now."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class LocalCluster:
    """``nodes`` Ray nodes of ``cpus_per_node`` CPUs each on 127.0.0.1, dashboard off, no usage stats."""

    def __init__(self, nodes: int = 2, cpus_per_node: int = 1, timeout_s: float = 180):
        self.nodes, self.cpus, self.timeout_s = nodes, cpus_per_node, timeout_s
        port, self._client_port = free_ports(2)
        self.address = f"127.0.0.1:{port}"
        self.env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token",
                    "RAY_AUTH_TOKEN": secrets.token_hex(32), "TF_CPP_MIN_LOG_LEVEL": "2",
                    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
        self._saved: dict[str, str | None] = {}

    def _ray_start(self, *args: str) -> None:
        ports = [f"{name}={port}" for name, port in zip(_NODE_PORTS, free_ports(len(_NODE_PORTS)), strict=True)]
        subprocess.run([sys.executable, "-c", _RAY_START, "start", *args, "--num-cpus", str(self.cpus),
                        "--disable-usage-stats", "--node-ip-address", "127.0.0.1", *ports], env=self.env, cwd=REPO,
                       check=True, capture_output=True, timeout=self.timeout_s)

    def listening(self) -> set[str]:
        """"HOST:PORT" of every TCP socket a process of this cluster listens on (Linux: the processes are
        found by this cluster's auth token in their environment, the sockets in /proc/net/tcp and tcp6)."""
        token = f"RAY_AUTH_TOKEN={self.env['RAY_AUTH_TOKEN']}".encode()
        inodes: set[str] = set()
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                if token not in (proc / "environ").read_bytes().split(b"\0"):
                    continue
                for fd in (proc / "fd").iterdir():
                    link = os.readlink(fd)
                    if link.startswith("socket:["):
                        inodes.add(link[8:-1])
            except OSError:  # a process that ended meanwhile, or one not ours to read
                continue
        found = set()
        for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes:  # state 0A: LISTEN
                    host, port = fields[1].split(":")
                    raw = bytes.fromhex(host)  # 32-bit words in host (little-endian) order
                    raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                    found.add(f"{socket.inet_ntop(family, raw)}:{int(port, 16)}")
        return found

    def alive_nodes(self) -> int:
        """Nodes the cluster reports alive (asked from a fresh process, so this one never joins)."""
        code = (f"import ray; ray.init(address={self.address!r}, logging_level='ERROR');"
                "print(sum(1 for n in ray.nodes() if n['Alive']))")
        done = subprocess.run([sys.executable, "-c", code], env=self.env, capture_output=True, text=True,
                              timeout=self.timeout_s)
        return int(done.stdout.split()[-1]) if done.returncode == 0 and done.stdout.split() else 0

    def __enter__(self) -> LocalCluster:
        for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_USAGE_STATS_ENABLED", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"):
            self._saved[key] = os.environ.get(key)
            os.environ[key] = self.env[key]
        try:
            self._ray_start("--head", "--port", self.address.split(":")[1], "--ray-client-server-port",
                            str(self._client_port), "--include-dashboard=false")
            for _ in range(self.nodes - 1):
                self._ray_start(f"--address={self.address}")
            deadline = time.monotonic() + self.timeout_s
            while self.alive_nodes() < self.nodes:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the Ray cluster at {self.address} did not reach {self.nodes} nodes")
                time.sleep(2)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        subprocess.run([RAY, "stop", "--force"], env=self.env, capture_output=True, timeout=self.timeout_s)
        for key, value in self._saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
