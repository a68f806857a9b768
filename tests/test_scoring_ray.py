"""python -m scoring --engine ray on a real two-node Ray cluster on 127.0.0.1 (started and stopped here).

One cluster for the module (Ray starts slowly on two cores): the same rows as the local engine; a
killed actor process mid-run still gives every file exactly once; a killed driver, then --resume,
scores only the rest. ``ray stop`` ends every Ray process of the machine: nothing else here runs Ray.
"""

from __future__ import annotations

import ipaddress
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from phi_inputs import SOURCES, damaged_with_phi, find_needles, with_phi
from scoring_inputs import film_folder, same_scores

from scoring.job import Config, run
from scoring.localcluster import REPO, LocalCluster

SUMMARY = re.compile(r"scoring: (\d+) files, (\d+) scored now, (\d+) already done, (\d+) errors")


@pytest.fixture(scope="module")
def cluster() -> LocalCluster:
    with LocalCluster(nodes=2, cpus_per_node=1) as running:
        yield running


@pytest.fixture(scope="module")
def films(tmp_path_factory, data_dir) -> Path:
    return film_folder(tmp_path_factory.mktemp("films"), slow_copies=2)


@pytest.fixture(scope="module")
def local(films, tiny_model_dir, tmp_path_factory) -> pd.DataFrame:
    out = tmp_path_factory.mktemp("local") / "r.parquet"
    run(Config(str(films), model=str(tiny_model_dir), out=str(out), batch_size=1), log=lambda _: None)
    return pd.read_parquet(out)


def _scoring(films: Path, model: Path, out: Path, cluster: LocalCluster, *extra: str,
             env: dict[str, str] | None = None) -> subprocess.Popen:
    command = [sys.executable, "-m", "scoring", str(films), "--model", str(model), "--out", str(out),
               "--engine", "ray", "--address", cluster.address, "--actors", "2", "--batch-size", "1", *extra]
    return subprocess.Popen(command, cwd=REPO, env={**cluster.env, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _summary(process: subprocess.Popen) -> tuple[int, int, int, int]:
    try:
        output, _ = process.communicate(timeout=540)
    finally:  # a run that hangs is not left behind
        if process.poll() is None:
            process.kill()
            process.wait(timeout=60)
    process.output = output  # type: ignore[attr-defined]
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


def ray_temp_dir() -> Path:
    """Where ``ray start`` keeps its sessions (Ray's default: $RAY_TMPDIR, else $TMPDIR, else /tmp; then ray/)."""
    return Path(os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp") / "ray"


def _loopback(address: str) -> bool:
    host = ipaddress.ip_address(address.rsplit(":", 1)[0])
    return host.is_loopback or (host.version == 6 and host.ipv4_mapped is not None and host.ipv4_mapped.is_loopback)


def _parts(out: Path) -> list[Path]:
    return sorted(out.with_name(out.name + ".parts").glob("part-*.parquet"))


def test_two_node_cluster_gives_the_local_rows(cluster, films, tiny_model_dir, local, tmp_path):
    out = tmp_path / "r.parquet"
    files, scored, skipped, errors = _summary(_scoring(films, tiny_model_dir, out, cluster))
    assert (files, scored, skipped) == (len(local), len(local), 0) and errors == (local["error"] != "").sum() == 3
    same_scores(pd.read_parquet(out), local)


def test_no_patient_data_in_the_output_or_any_log_of_the_cluster(cluster, tiny_model_dir, tmp_path):
    """A damaged DICOM that makes pydicom quote its patient's name and id, beside a good one: the patient data
    reaches neither the driver's output, the result, nor any log file of the cluster (each worker's stdout
    and stderr are files under Ray's session folder)."""
    films = tmp_path / "films"
    films.mkdir()
    (films / "damaged.dcm").write_bytes(damaged_with_phi())
    (films / "good.dcm").write_bytes(with_phi(SOURCES["study2.dcm"]))
    out = tmp_path / "r.parquet"
    started = time.time() - 1
    process = _scoring(films, tiny_model_dir, out, cluster)
    assert _summary(process)[:2] == (2, 2)
    errors = pd.read_parquet(out).set_index("path")["error"]
    assert "header is damaged" in errors[str(films / "damaged.dcm")] and errors[str(films / "good.dcm")] == ""
    logs = [p for p in (ray_temp_dir() / "session_latest" / "logs").rglob("*")
            if p.is_file() and p.stat().st_mtime >= started]
    assert any(p.name.startswith("worker-") for p in logs), "no worker log of this run was found"
    leaks = find_needles(process.output, "driver output") + find_needles(out.read_bytes(), "result")
    for path in logs:
        leaks += find_needles(path.read_bytes(), str(path))
    assert not leaks, "\n".join(leaks)


def test_a_killed_actor_process_loses_and_repeats_nothing(cluster, films, tiny_model_dir, local, tmp_path):
    out = tmp_path / "r.parquet"
    process = _scoring(films, tiny_model_dir, out, cluster, "--part-size", "1")
    _wait_for(lambda: _parts(out), "the first scored block")
    victims = _actor_pids()
    assert victims and not out.exists(), "the run ended before a worker could be killed"
    # Every process of the cluster, the driver and its actors included, listens on loopback only (Ray
    # 2.60 would turn 127.0.0.1 into the machine's address and listen on every interface).
    listening = cluster.listening()
    assert len(listening) >= 6 and cluster.address.split(":")[1] in {a.rsplit(":", 1)[1] for a in listening}
    assert [a for a in listening if not _loopback(a)] == []
    os.kill(victims[0], signal.SIGKILL)
    files, scored, skipped, _ = _summary(process)
    assert (files, scored, skipped) == (len(local), len(local), 0)  # every file once: none lost, none twice
    same_scores(pd.read_parquet(out), local)


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


def test_the_driver_s_engine_choice_reaches_the_workers_and_each_row_names_its_engine(cluster, tiny_model_dir,
                                                                                      tmp_path):
    """The nodes were started without CXR_ENGINE: without forwarding, ``CXR_ENGINE=tensorflow python -m scoring``
    would have run OpenVINO on every worker, and no row said which engine scored it."""
    assert "CXR_ENGINE" not in cluster.env
    films = film_folder(tmp_path / "films")
    out = tmp_path / "r.parquet"
    files, scored, _, errors = _summary(_scoring(films, tiny_model_dir, out, cluster,
                                                 env={"CXR_ENGINE": "tensorflow"}))
    engines = pd.read_parquet(out).groupby(pd.read_parquet(out)["error"] == "")["engine"].agg(set)
    assert scored == files and engines[True] and all(e.startswith("TensorFlow 2.") for e in engines[True])
    assert engines.get(False, {""}) == {""}


def test_a_node_with_another_version_of_the_model_ends_the_run_with_that_message(cluster, films, tiny_model_dir):
    """Each actor loads the model folder on its own node; one that holds another version (it passes its own
    hash check) stops the run with the reason, not Ray's traceback, before any row of it is kept."""
    from cxr_core.errors import ModelCardError
    from scoring import cluster as ray_engine
    from scoring.rows import Pending

    film = next(p for p in films.rglob("*.jpeg"))
    with pytest.raises(ModelCardError, match="holds another version of '.+'.*install the same model folder"):
        list(ray_engine.score(tiny_model_dir, [Pending(str(film), film.name)], batch_size=1, actors=1,
                              address=cluster.address, card_sha256="0" * 64))
