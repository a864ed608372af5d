"""`prunepipe search` on a running two-node Ray cluster, logging to a real MLflow tracking server.

Everything runs on this machine: a Ray head and a second Ray node (two `ray start --block`
processes), `mlflow server` over HTTP with its runs and registry in a throwaway PostgreSQL
cluster. Ray on Linux swaps a loopback node address for the machine's own network address
(ray._private.services.resolve_ip_for_localhost), and a second node cannot join a head kept on
loopback; so the whole cluster runs inside a private network namespace made for the test
(`unshare --net`) where loopback is the only interface: every service listens on, and every
packet goes to, 127.0.0.1. Every service runs in its own process group, and the test ends
exactly those groups (never `ray stop`, which would end every Ray on the machine).
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
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import DEMO, ROOT
from tests.helpers.procs import free_port, http_ok, wait_for
from tests.test_cluster import BIN, run_env

pytestmark = pytest.mark.ray


def pg_bindir() -> Path | None:
    if shutil.which("pg_config") is None:
        return None
    out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True).stdout.strip()
    return Path(out) if out and (Path(out) / "initdb").is_file() and (Path(out) / "pg_ctl").is_file() else None


def stop_groups(procs: list[subprocess.Popen]) -> None:
    """SIGTERM each service's leading process (each was started with start_new_session=True), so
    that it shuts down its own children; then SIGKILL whatever is left in those process groups."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + 30
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # the group is gone: nothing left over
        if p.poll() is None:
            p.wait(timeout=10)


def cluster_env(**extra: str) -> dict[str, str]:
    """The environment of the Ray nodes and of the driver.

    Ray 2.60 turns token authentication on for a new head and keeps the token in
    ~/.ray/auth_token, one file per user: any other Ray head started on this machine meanwhile
    replaces it and our second node is refused (seen here). This throwaway cluster therefore runs
    without it; a real cluster keeps it (docs/cluster.md). No 30 s drain on SIGTERM either:
    nothing is left to drain when the test is over.
    """
    # multi-node on (conftest keeps single-node Rays on loopback with it off): in the private
    # namespace loopback is all there is, so the nodes still advertise 127.0.0.1
    return run_env(RAY_AUTH_MODE="disabled", RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S="240",
                   RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="1",
                   RAY_USAGE_STATS_ENABLED="0", RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="2", **extra)


@pytest.fixture
def postgres() -> Iterator[str]:
    """A throwaway PostgreSQL cluster on 127.0.0.1 (run as the `postgres` user), database `mlflow`."""
    bindir = pg_bindir()
    if bindir is None or shutil.which("runuser") is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl in `pg_config --bindir`) or runuser are not installed")
    pytest.importorskip("psycopg2", reason="psycopg2-binary (requirements-dev.txt) is MLflow's PostgreSQL driver")
    # not under pytest's tmp_path: its 0700 parents keep the postgres user out
    root = Path(tempfile.mkdtemp(prefix="pg", dir="/tmp"))
    root.chmod(0o755)
    shutil.chown(root, "postgres", "postgres")
    port = free_port()
    as_pg = ["runuser", "-u", "postgres", "--"]
    db = str(root / "db")
    subprocess.run([*as_pg, str(bindir / "initdb"), "-D", db, "-A", "trust"], check=True, capture_output=True, timeout=120)
    subprocess.run([*as_pg, str(bindir / "pg_ctl"), "-D", db, "-l", str(root / "log"), "-w", "-o",
                    f"-p {port} -k {root} -c listen_addresses=127.0.0.1", "start"], check=True, capture_output=True,
                   timeout=120)
    try:
        subprocess.run([*as_pg, str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "mlflow"], check=True,
                       capture_output=True, timeout=60)
        # the driver named: SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3, not psycopg2
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/mlflow"
    finally:
        subprocess.run([*as_pg, str(bindir / "pg_ctl"), "-D", db, "-m", "immediate", "stop"], capture_output=True,
                       timeout=120)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def services(postgres: str, tmp_path: Path) -> Iterator[dict[str, str]]:
    """The MLflow server and the two Ray nodes, started side by side (start-up is the slow part)."""
    from ray.util.state import list_nodes

    ray_tmp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # short: Ray's socket paths have a length limit
    gcs, dash, mlflow_port = free_port(), free_port(), free_port()
    env = cluster_env()
    mlflow = [str(BIN / "mlflow"), "server", "--backend-store-uri", postgres, "--artifacts-destination",
              str(tmp_path / "artifacts"), "--host", "127.0.0.1", "--port", str(mlflow_port), "--workers", "1"]
    # Nodes on one machine need their own agent ports; on 2 busy cores the logical CPUs are
    # over-provisioned (Ray's quirk, ../shared/STACK.md): 2 trials x (1 driver + 2 workers) fit.
    agent_ports = ("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--runtime-env-agent-port",
                   "--metrics-export-port")
    common = ["--block", "--node-ip-address=127.0.0.1", "--disable-usage-stats", "--num-cpus=4"]
    head = [str(BIN / "ray"), "start", "--head", f"--port={gcs}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}", f"--temp-dir={ray_tmp}", f"--ray-client-server-port={free_port()}",
            *(f"{a}={free_port()}" for a in agent_ports), *common]
    second = [str(BIN / "ray"), "start", f"--address=127.0.0.1:{gcs}", '--resources={"node_b": 4}',
              *(f"{a}={free_port()}" for a in agent_ports), *common]
    procs: list[subprocess.Popen] = []
    logs = {name: open(tmp_path / f"{name}.log", "w") for name in ("mlflow", "ray-head", "ray-b")}  # noqa: SIM115

    def start(name: str, cmd: list[str]) -> subprocess.Popen:
        procs.append(subprocess.Popen(cmd, stdout=logs[name], stderr=subprocess.STDOUT, env=env,
                                      start_new_session=True))
        return procs[-1]

    def both_nodes_alive() -> bool:
        try:
            return len(list_nodes(address=f"http://127.0.0.1:{dash}", filters=[("state", "=", "ALIVE")])) == 2
        except Exception:  # the dashboard is still starting
            return False

    try:
        server = start("mlflow", mlflow)
        ray_head = start("ray-head", head)
        wait_for(lambda: socket.socket().connect_ex(("127.0.0.1", gcs)) == 0, "ray head", 180, ray_head)
        ray_b = start("ray-b", second)
        wait_for(both_nodes_alive, "second ray node", 180, ray_b)
        wait_for(lambda: http_ok(f"http://127.0.0.1:{mlflow_port}/health"), "mlflow server", 180, server)
        yield {"ray": f"127.0.0.1:{gcs}", "dashboard": f"http://127.0.0.1:{dash}",
               "mlflow": f"http://127.0.0.1:{mlflow_port}"}
    finally:
        stop_groups(procs)
        for f in logs.values():
            f.close()
        shutil.rmtree(ray_tmp, ignore_errors=True)


IN_NETNS = os.environ.get("PRUNEPIPE_PRIVATE_NETNS") == "1"


def test_two_node_ray_cluster_in_a_private_network_namespace():
    """Runs the cluster test below in a new network namespace that holds only loopback."""
    if IN_NETNS:
        pytest.skip("already inside the private namespace")
    if shutil.which("unshare") is None or shutil.which("ip") is None or os.geteuid() != 0:
        pytest.skip("needs root with unshare and ip to make a private network namespace")
    target = f"{Path(__file__).relative_to(ROOT)}::test_search_on_a_two_node_ray_cluster_with_an_mlflow_server"
    inner = f"ip link set lo up && exec {sys.executable} -m pytest -q -p no:cacheprovider -m slow {target}"
    proc = subprocess.run(["unshare", "--net", "--", "sh", "-c", inner], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PRUNEPIPE_PRIVATE_NETNS": "1"}, timeout=900)
    assert proc.returncode == 0 and " passed" in proc.stdout, proc.stdout[-4000:] + proc.stderr[-2000:]


@pytest.mark.skipif(not IN_NETNS, reason="runs inside the private network namespace made by the test above")
def test_search_on_a_two_node_ray_cluster_with_an_mlflow_server(tmp_path, tiny_synthetic, services):
    """`prunepipe search` joins the cluster through RAY_ADDRESS; two trials run at once, each a
    2-worker DDP job placed with SPREAD (one worker per node); both log to the MLflow server on
    PostgreSQL, and the best is registered there as `challenger`."""
    from mlflow.tracking import MlflowClient
    from ray.util.state import list_actors, list_nodes

    env = cluster_env(RAY_ADDRESS=services["ray"])
    proc = subprocess.run(
        [sys.executable, "-m", "launch.cli", "search", str(DEMO), f"data.root={tiny_synthetic}",
         "data.image_size=16", "data.batch_size=8", f"output_dir={tmp_path / 'out'}", "baseline.epochs=0",
         # trials long enough (3 epochs of 6 steps) that two running at once overlap in time even on
         # a quiet machine: 1-epoch trials finished before the second one's run had started
         "train.budget_epochs=3", "measure.rounds=2", "measure.attempts=1", "measure.warmup=1", "train.bn_recalib_batches=2",
         "search.placement_strategy=SPREAD", "search.max_concurrent=2", "search.num_workers=2",
         # the winner by top-1 alone: the speed-up constraint is not what this test is about, and
         # a speed measured on a shared 2-core machine is flagged unreliable
         "search.objective.min_speedup=null", "search.objective.finalists=1",
         "search.space={prune.method: {grid: [l1, random]}, prune.prune_ratio: {choice: [0.5]}}",
         f"registry.tracking_uri={services['mlflow']}", "registry.experiment=cluster", "registry.model_name=clustered"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=480)
    (tmp_path / "search.log").write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    # every trial's two workers ran on two different nodes, and both nodes were used
    dash = services["dashboard"]
    nodes = {n.node_id: n.resources_total for n in list_nodes(address=dash)}
    assert sum("node_b" in r for r in nodes.values()) == 1  # the second node is the one we started
    workers = list_actors(address=dash, filters=[("class_name", "=", "RayTrainWorker")], detail=True, limit=1000)
    by_trial: dict[str, set[str]] = {}
    for actor in workers:
        by_trial.setdefault(actor.placement_group_id, set()).add(actor.node_id)
    assert len(by_trial) == 2 and all(len(ids) == 2 for ids in by_trial.values()), by_trial
    assert set().union(*by_trial.values()) == set(nodes)

    client = MlflowClient(services["mlflow"])
    runs = client.search_runs([client.get_experiment_by_name("cluster").experiment_id])
    trials = [r for r in runs if "mlflow.parentRunId" in r.data.tags]  # the search's parent run holds them
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and {r.data.tags["mlflow.parentRunId"] for r in trials} == {parents[0].info.run_id}
    # both trials logged to the server; ASHA (grace period 2 of 3 epochs) may stop the weaker one,
    # whose run then ends KILLED rather than FINISHED
    assert len(trials) == 2 and all("val_top1" in r.data.metrics for r in trials)
    assert all(r.info.status in ("FINISHED", "KILLED") for r in trials) and any(r.info.status == "FINISHED" for r in trials)
    # max_concurrent=2: the two trials wrote to the tracking server at the same time
    (_, end_first), (start_second, _) = sorted((r.info.start_time, r.info.end_time) for r in trials)
    assert start_second < end_first, "the trials ran one after the other"
    version = client.get_model_version_by_alias("clustered", "challenger")
    assert version.run_id in {r.info.run_id for r in trials}
