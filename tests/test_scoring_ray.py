"""python -m scoring --engine ray on a real two-node Ray cluster on 127.0.0.1 (started and stopped here).

One cluster for the module (Ray starts slowly on two cores): the same rows as the local engine; a
killed actor process mid-run still gives every file exactly once; a killed driver, then --resume,
scores only the rest. ``ray stop`` ends every Ray process of the machine: nothing else here runs Ray.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from scoring_inputs import film_folder, same_scores

from scoring.job import Config, run

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
# Ray 2.60 authenticates every connection with a token: one for this cluster, given to every process by env.
ENV = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": "",
       "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
SUMMARY = re.compile(r"scoring: (\d+) files, (\d+) scored now, (\d+) already done, (\d+) errors")


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _node_ports() -> list[str]:
    """Free ports for the per-node agents, which would collide between two nodes on one machine."""
    names = ("--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
             "--dashboard-agent-grpc-port", "--metrics-export-port", "--runtime-env-agent-port")
    return [f"{name}={port}" for name, port in zip(names, _free_ports(len(names)), strict=True)]


def _alive_nodes(address: str) -> int:
    code = (f"import ray; ray.init(address={address!r}, logging_level='ERROR');"
            "print(sum(1 for n in ray.nodes() if n['Alive']))")
    done = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=120)
    return int(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else 0


@pytest.fixture(scope="module")
def cluster() -> str:
    port, client_port = _free_ports(2)
    address = f"127.0.0.1:{port}"
    common = ["--num-cpus", "1", "--disable-usage-stats", "--node-ip-address", "127.0.0.1"]
    try:
        subprocess.run([RAY, "start", "--head", "--port", str(port), "--ray-client-server-port", str(client_port),
                        "--include-dashboard=false", *common, *_node_ports()],
                       env=ENV, cwd=REPO, check=True, capture_output=True, timeout=180)
        subprocess.run([RAY, "start", f"--address={address}", *common, *_node_ports()],
                       env=ENV, cwd=REPO, check=True, capture_output=True, timeout=180)
        deadline = time.monotonic() + 120
        while _alive_nodes(address) < 2:
            assert time.monotonic() < deadline, "the second Ray node did not join"
            time.sleep(2)
        yield address
    finally:
        subprocess.run([RAY, "stop", "--force"], env=ENV, capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def films(tmp_path_factory, data_dir) -> Path:
    return film_folder(tmp_path_factory.mktemp("films"), slow_copies=2)


@pytest.fixture(scope="module")
def local(films, tiny_model_dir, tmp_path_factory) -> pd.DataFrame:
    out = tmp_path_factory.mktemp("local") / "r.parquet"
    run(Config(str(films), model=str(tiny_model_dir), out=str(out), batch_size=1), log=lambda _: None)
    return pd.read_parquet(out)


def _scoring(films: Path, model: Path, out: Path, address: str, *extra: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "scoring", str(films), "--model", str(model), "--out", str(out),
               "--engine", "ray", "--address", address, "--actors", "2", "--batch-size", "1", *extra]
    return subprocess.Popen(command, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _summary(process: subprocess.Popen) -> tuple[int, int, int, int]:
    output, _ = process.communicate(timeout=540)
    assert process.returncode == 0, output[-3000:]
    match = SUMMARY.search(output)
    assert match, output[-3000:]
    return tuple(int(g) for g in match.groups())


def _actor_pids() -> list[int]:
    """Processes of this cluster's model-holding actors (Ray names them after the Data operator)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "cmdline").read_bytes().startswith(b"ray::MapWorker(MapBatches(Scorer))"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def _wait_for(condition, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def _parts(out: Path) -> list[Path]:
    return sorted(out.with_name(out.name + ".parts").glob("part-*.parquet"))


def test_two_node_cluster_gives_the_local_rows(cluster, films, tiny_model_dir, local, tmp_path):
    out = tmp_path / "r.parquet"
    files, scored, skipped, errors = _summary(_scoring(films, tiny_model_dir, out, cluster))
    assert (files, scored, skipped) == (len(local), len(local), 0) and errors == (local["error"] != "").sum() == 3
    same_scores(pd.read_parquet(out), local)


def test_a_killed_actor_process_loses_and_repeats_nothing(cluster, films, tiny_model_dir, local, tmp_path):
    out = tmp_path / "r.parquet"
    process = _scoring(films, tiny_model_dir, out, cluster, "--part-size", "1")
    _wait_for(lambda: _parts(out), "the first scored block")
    victims = _actor_pids()
    assert victims and not out.exists(), "the run ended before a worker could be killed"
    os.kill(victims[0], signal.SIGKILL)
    files, scored, skipped, _ = _summary(process)
    assert (files, scored, skipped) == (len(local), len(local), 0)  # every file once: none lost, none twice
    table = pd.read_parquet(out)
    assert table["path"].is_unique
    same_scores(table, local)


def test_resume_after_a_killed_driver_scores_only_the_rest(cluster, films, tiny_model_dir, local, tmp_path):
    out = tmp_path / "r.parquet"
    process = _scoring(films, tiny_model_dir, out, cluster, "--part-size", "1")
    _wait_for(lambda: _parts(out), "the first scored block")
    process.kill()
    process.wait(timeout=60)
    assert not out.exists()
    done = pd.concat([pd.read_parquet(p) for p in _parts(out)])
    assert 0 < len(done) < len(local) and done["path"].is_unique
    files, scored, skipped, _ = _summary(_scoring(films, tiny_model_dir, out, cluster, "--resume"))
    assert (files, scored, skipped) == (len(local), len(local) - len(done), len(done))
    same_scores(pd.read_parquet(out), local)
