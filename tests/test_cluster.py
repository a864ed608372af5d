"""Multi-node launches that really run, on this machine's loopback interface.

Two "nodes" are two torchrun agents started separately against one c10d rendezvous endpoint
(what SLURM's srun does on a cluster); the SLURM script runs under a fake ``srun``/``scontrol``;
the deepspeed launcher runs the CLI with a hostfile. The cluster manifests (``ray up``,
KubeRay) are validated as data, with the commands they run checked against the repository.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from launch.cli import main as cli_main
from pipeline.config import load_config
from tests.conftest import DEMO, ROOT
from tests.helpers.procs import free_port

SBATCH = ROOT / "launch" / "slurm.sbatch"
HOSTFILE = ROOT / "launch" / "hostfile.example"
RAY_CLUSTER = ROOT / "launch" / "ray-cluster.yaml"
RAYJOB = ROOT / "launch" / "kuberay-rayjob.yaml"
DOCS = ROOT / "docs" / "cluster.md"
BIN = Path(sys.executable).parent


def run_env(**extra: str) -> dict[str, str]:
    """One CPU thread per rank (equal arithmetic in every launch shape), gloo on loopback."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "PYTHONPATH": str(ROOT),
            "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", **extra}


def torchrun(nnodes: int, nproc: int, port: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--nproc-per-node={nproc}",
            "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id=t{port}",
            "--local-addr=127.0.0.1", "--max-restarts=0", *args]


def wait_all(procs: list[subprocess.Popen], timeout: float) -> list[tuple[int, str]]:
    results = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=timeout)
            results.append((p.returncode, out))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return results


# --- torchrun: two nodes against one rendezvous ---------------------------------------------


@pytest.mark.multiprocess
def test_two_nodes_train_the_same_weights_as_one_node(tmp_path, digits_root):
    """2 nodes x 1 rank and 1 node x 2 ranks, same global batch, N steps: identical weights.

    Exact equality is expected, not a tolerance: in both shapes rank r reads the same shard
    (sharding is by global rank, not by node), computes its gradient with one CPU thread, and
    gloo's all-reduce over two ranks adds the same two numbers (a + b == b + a in IEEE floats).
    Only the transport differs (two agents and a c10d store vs one agent), which must not
    change a single bit.
    """
    helper = str(ROOT / "tests" / "helpers" / "multinode_train.py")
    steps = "4"
    two, one = tmp_path / "two_nodes", tmp_path / "one_node"
    two.mkdir()
    one.mkdir()
    port2, port1 = free_port(), free_port()
    opts = {"cwd": ROOT, "env": run_env(), "stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True}
    procs = [subprocess.Popen(torchrun(2, 1, port2, helper, str(two), str(digits_root), steps), **opts)
             for _node in range(2)]
    procs.append(subprocess.Popen(torchrun(1, 2, port1, helper, str(one), str(digits_root), steps), **opts))
    for rc, out in wait_all(procs, timeout=300):
        assert rc == 0, out[-3000:]

    ranks2 = [json.loads((two / f"rank{r}.json").read_text()) for r in range(2)]
    ranks1 = [json.loads((one / f"rank{r}.json").read_text()) for r in range(2)]
    # really two nodes: each agent ran one local worker and got its own node (group) rank
    assert sorted(r["group_rank"] for r in ranks2) == [0, 1]
    assert all(r["local_world_size"] == 1 and r["local_rank"] == 0 and r["world"] == 2 for r in ranks2)
    assert all(r["group_rank"] == 0 and r["local_world_size"] == 2 and r["world"] == 2 for r in ranks1)
    assert all(r["steps"] == int(steps) and r["changed"] for r in ranks1 + ranks2)
    # every rank of both launches holds the very same parameters, bit for bit; the whole state
    # (BN running statistics too, which stay per-rank after the last forward) matches rank by rank
    assert len({r["params_sha256"] for r in ranks1 + ranks2}) == 1
    assert [r["state_sha256"] for r in ranks2] == [r["state_sha256"] for r in ranks1]
    w2, w1 = np.load(two / "weights.npy"), np.load(one / "weights.npy")
    assert w2.shape == w1.shape and np.array_equal(w2, w1)


# --- the SLURM batch script -------------------------------------------------------------------

FAKE_SCONTROL = """#!/bin/bash
# fake `scontrol show hostnames LIST`: prints $FAKE_HOSTNAMES, one per line
[[ $1 == show && $2 == hostnames ]] || exit 1
printf '%s\\n' $FAKE_HOSTNAMES
"""

# Fake srun: records its argv, then starts the command once per node with SLURM_NODEID set (as
# srun --ntasks-per-node=1 does), unless FAKE_SRUN_DRY is set.
FAKE_SRUN = """#!/bin/bash
printf '%s\\n' "$@" > "$FAKE_SRUN_LOG"
[[ -n ${FAKE_SRUN_DRY:-} ]] && exit 0
while [[ $1 == --* ]]; do shift; done
pids=()
for ((i = 0; i < SLURM_JOB_NUM_NODES; i++)); do
    SLURM_NODEID=$i SLURM_PROCID=$i "$@" > "$FAKE_SRUN_LOG.node$i" 2>&1 &
    pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
exit $rc
"""


def fake_slurm(tmp_path: Path, hostnames: str, **slurm: str) -> tuple[dict[str, str], Path]:
    bindir = tmp_path / "fakebin"
    bindir.mkdir(exist_ok=True)
    for name, text in (("scontrol", FAKE_SCONTROL), ("srun", FAKE_SRUN)):
        f = bindir / name
        f.write_text(text)
        f.chmod(f.stat().st_mode | stat.S_IXUSR)
    log = tmp_path / "srun.args"
    env = run_env(FAKE_HOSTNAMES=hostnames, FAKE_SRUN_LOG=str(log), SLURM_JOB_ID="4242", **slurm)
    env["PATH"] = f"{bindir}{os.pathsep}{env['PATH']}"
    for key in ("SLURM_GPUS_PER_NODE", "SLURM_GPUS_ON_NODE", "SLURM_NNODES"):
        if key not in slurm:
            env.pop(key, None)
    return env, log


def sbatch(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SBATCH), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_slurm_script_is_valid_bash():
    proc = subprocess.run(["bash", "-n", str(SBATCH)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize(("gpu_env", "nproc"), [
    ({"SLURM_GPUS_PER_NODE": "8"}, 8),
    ({"SLURM_GPUS_PER_NODE": "a100:4"}, 4),  # a typed request: the count follows the colon
    ({"SLURM_GPUS_ON_NODE": "2"}, 2),  # --gres=gpu:2 sets only the step's count
])
def test_slurm_script_derives_torchrun_arguments(tmp_path, gpu_env, nproc):
    env, log = fake_slurm(tmp_path, "gpu-a17 gpu-a18 gpu-a19", SLURM_JOB_NODELIST="gpu-a[17-19]",
                          SLURM_JOB_NUM_NODES="3", FAKE_SRUN_DRY="1", **gpu_env)
    proc = sbatch(env, "configs/imagenet_resnet101.yaml", "prune.method=l1", "prune.prune_ratio=0.3")
    assert proc.returncode == 0, proc.stderr
    argv = log.read_text().splitlines()
    cmd = argv[argv.index("torchrun"):]
    assert "--ntasks-per-node=1" in argv[:argv.index("torchrun")]  # one torchrun per node
    assert f"--nproc-per-node={nproc}" in cmd and "--nnodes=3" in cmd
    assert "--rdzv-backend=c10d" in cmd and "--rdzv-endpoint=gpu-a17:29500" in cmd and "--rdzv-id=4242" in cmd
    assert cmd[cmd.index("-m"):] == ["-m", "launch.cli", "prune", "configs/imagenet_resnet101.yaml",
                                     "prune.method=l1", "prune.prune_ratio=0.3"]


@pytest.mark.parametrize(("env_update", "args", "message"), [
    ({}, [], "usage: sbatch launch/slurm.sbatch CONFIG"),
    ({}, ["configs/nope.yaml"], "config file 'configs/nope.yaml' does not exist"),
    ({"SLURM_GPUS_PER_NODE": "a100:"}, ["configs/demo.yaml"], "GPUs per node = 'a100:'"),
    ({"SLURM_GPUS_PER_NODE": "8", "SLURM_JOB_NUM_NODES": "two"}, ["configs/demo.yaml"], "SLURM_JOB_NUM_NODES = 'two'"),
    ({"SLURM_GPUS_PER_NODE": "8", "PRUNEPIPE_RDZV_PORT": "70000"}, ["configs/demo.yaml"], "PRUNEPIPE_RDZV_PORT"),
])
def test_slurm_script_rejects_bad_inputs_in_one_line(tmp_path, env_update, args, message):
    env, log = fake_slurm(tmp_path, "n1 n2", SLURM_JOB_NODELIST="n[1-2]", SLURM_JOB_NUM_NODES="2",
                          FAKE_SRUN_DRY="1")
    proc = sbatch({**env, **env_update}, *args)
    assert proc.returncode == 2 and not log.exists()  # nothing was launched
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


@pytest.mark.multiprocess
def test_slurm_script_runs_a_trial_on_two_nodes(tmp_path, digits_root):
    """The batch script itself, two 'nodes' on loopback: one torchrun each, one prune trial."""
    port = free_port()
    env, log = fake_slurm(
        tmp_path, "127.0.0.1 127.0.0.1", SLURM_JOB_NODELIST="127.0.0.1,127.0.0.1", SLURM_JOB_NUM_NODES="2",
        SLURM_GPUS_PER_NODE="gpu:1", PRUNEPIPE_RDZV_PORT=str(port), PRUNEPIPE_MAX_RESTARTS="0",
        PRUNEPIPE_TORCHRUN_ARGS="--local-addr=127.0.0.1", LOGLEVEL="INFO",  # torchrun logs its rendezvous
    )
    out = tmp_path / "run"
    proc = sbatch(env, "configs/demo.yaml", f"data.root={digits_root}", "data.image_size=16", "data.batch_size=32",
                  f"output_dir={out}", "prune.method=l1", "train.budget_epochs=1", "train.bn_recalib_batches=2",
                  "measure.rounds=2", "measure.attempts=1", "measure.warmup=1", "registry.enabled=false",
                  f"registry.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", timeout=300)
    logs = {i: Path(f"{log}.node{i}").read_text() for i in range(2)}
    assert proc.returncode == 0, proc.stderr + "".join(v[-3000:] for v in logs.values())
    assert (out / "model" / "spec.json").is_file() and (out / "model" / "model.safetensors").is_file()
    # two agents, one worker each, met in one rendezvous of two nodes on the loopback address
    ranks = sorted(int(m) for v in logs.values() for m in re.findall(r"group_rank=(\d+)", v))
    assert ranks == [0, 1], logs
    for v in logs.values():
        assert "group_world_size=2" in v and "global_world_sizes=[2]" in v and "master_addr=127.0.0.1" in v
    assert "pruned model:" in logs[0] + logs[1]  # rank 0's summary, printed once


# --- the deepspeed launcher ---------------------------------------------------------------------


def test_hostfile_example_parses_with_deepspeeds_parser():
    from deepspeed.launcher.runner import _parse_hostfile

    hosts = _parse_hostfile(HOSTFILE.read_text().splitlines())
    assert len(hosts) >= 2 and all(slots > 0 for slots in hosts.values())


def test_cli_accepts_the_deepspeed_launchers_local_rank(tmp_path, monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    args = ["data", "synthetic", "--out", str(tmp_path / "d"), "--train-samples", "4", "--val-samples", "2"]
    assert cli_main(["--local_rank=1", *args]) == 0
    assert os.environ["LOCAL_RANK"] == "1"  # filled in where no launcher set it
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert cli_main(["--local_rank=1", *args]) == 0
    assert os.environ["LOCAL_RANK"] == "0"  # the launcher's environment wins


@pytest.mark.multiprocess
def test_deepspeed_launcher_runs_the_cli_on_two_nodes(tmp_path, digits_root):
    """The deepspeed launcher, one per "node" (--no_ssh --node_rank: no pdsh/ssh here), runs
    `--module launch.cli prune` as one 2-rank job; the launcher adds --local_rank to the CLI."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    port, out = free_port(), tmp_path / "run"
    cmd = [str(BIN / "deepspeed"), "--hostfile", str(hostfile), "--no_ssh", "--master_addr=127.0.0.1",
           f"--master_port={port}", "--module", "launch.cli", "prune", str(DEMO),
           f"data.root={digits_root}", "data.image_size=16", "data.batch_size=32", f"output_dir={out}",
           "prune.method=l1", "train.budget_epochs=1", "train.bn_recalib_batches=2", "measure.rounds=2", "measure.attempts=1",
           "measure.warmup=1", "registry.enabled=false"]
    opts = {"cwd": ROOT, "env": run_env(), "stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True}
    procs = [subprocess.Popen([cmd[0], cmd[1], cmd[2], cmd[3], f"--node_rank={r}", *cmd[4:]], **opts) for r in range(2)]
    results = wait_all(procs, timeout=300)
    for rc, log in results:
        assert rc == 0, log[-3000:]
        assert "dist_world_size=2" in log and "'--local_rank=0', 'prune'" in log
    assert (out / "model" / "spec.json").is_file()
    # one job of two ranks, not two jobs of one: only global rank 0 prints the summary
    assert sum(log.count("pruned model:") for _, log in results) == 1



# --- the cluster manifests and the documented commands ------------------------------------------

# RayJob fields of KubeRay's ray.io/v1 API (ray-operator/apis/ray/v1): a typo there is silently
# dropped by a lenient apply, so the manifest's keys are checked against them.
RAYJOB_SPEC = {"activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
               "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy", "entrypoint", "runtimeEnvYAML",
               "jobId", "submissionMode", "entrypointResources", "entrypointNumCpus", "entrypointNumGpus",
               "ttlSecondsAfterFinished", "shutdownAfterJobFinishes", "suspend", "schedule"}
RAYCLUSTER_SPEC = {"rayVersion", "enableInTreeAutoscaling", "autoscalerOptions", "headGroupSpec", "workerGroupSpecs",
                   "headServiceAnnotations", "suspend", "managedBy", "gcsFaultToleranceOptions"}
HEAD_GROUP = {"rayStartParams", "template", "serviceType", "headService", "enableIngress", "resources", "labels"}
WORKER_GROUP = {"groupName", "replicas", "minReplicas", "maxReplicas", "idleTimeoutSeconds", "rayStartParams", "template",
                "scaleStrategy", "numOfHosts", "suspend", "resources", "labels"}
IMAGE_DIR = "/app/"  # the Dockerfile's WORKDIR: the repository's files sit there in the image


def runs_prunepipe(argv: list[str]) -> int | None:
    """Where the CLI's subcommand starts in a command line: after `prunepipe`, `launch.cli`, an
    image of the project (its entrypoint is prunepipe), or `launch/slurm.sbatch` (which runs
    `prune` with its arguments); None if the line runs no prune/search/pretrain."""
    for i, a in enumerate(argv):
        if a in ("prunepipe", "launch.cli") or re.fullmatch(r"\S+/prunepipe:(gpu|cpu)", a):
            rest = [x for x in argv[i + 1:] if not x.startswith("--local_rank")]
            if rest and rest[0] in ("prune", "search", "pretrain"):
                return argv.index(rest[0])
        if a == "launch/slurm.sbatch":
            return i
    return None


def check_prunepipe_command(argv: list[str]) -> tuple[Path, list[str]]:
    """The config a prunepipe command names (must exist; `/app/...` is the image's copy of the
    repository) and its key=value overrides."""
    start = runs_prunepipe(argv)
    assert start is not None, argv
    args = argv[start:]
    config = ROOT / args[1].removeprefix(IMAGE_DIR)
    assert config.is_file(), f"{argv}: {args[1]} is not a config in the repository"
    overrides = [a for a in args[2:] if "=" in a and not a.startswith("-")]
    return config, overrides


def validate_overrides(config: Path, overrides: list[str]) -> None:
    load_config(config, overrides)  # raises ConfigError naming a bad key or value


def documented_commands() -> list[list[str]]:
    """Every command line in docs/cluster.md's bash blocks (continuations joined)."""
    blocks = re.findall(r"```bash\n(.*?)```", DOCS.read_text(), flags=re.S)
    lines = "\n".join(blocks).replace("\\\n", " ").splitlines()
    return [shlex.split(line, comments=True) for line in lines if line.strip() and not line.lstrip().startswith("#")]


def gpu_image_tag() -> str:
    builds = [c for c in documented_commands() if c[:2] == ["docker", "build"] and "--target" not in c]
    assert len(builds) == 1, builds
    return builds[0][builds[0].index("-t") + 1]


def test_documented_commands_name_existing_files_configs_and_modules():
    import importlib.util

    commands = documented_commands()
    joined = [" ".join(c) for c in commands]
    # the four launchers of this page, each with at least one exact command
    assert any(c[0] == "torchrun" and "--rdzv-backend=c10d" in c and "--nnodes=2" in c for c in commands)
    assert any(c[:2] == ["sbatch", "--nodes=2"] and "launch/slurm.sbatch" in c for c in commands)
    assert any(j.startswith("deepspeed --hostfile launch/hostfile.example --module launch.cli prune ")
               and j.endswith("train.backend=deepspeed") for j in joined)
    assert any(c[:3] == ["ray", "up", "launch/ray-cluster.yaml"] for c in commands)
    assert any(c[:4] == ["kubectl", "apply", "-f", "launch/kuberay-rayjob.yaml"] for c in commands)
    checked = 0
    for argv in commands:
        for token in argv:
            if token.startswith("launch/"):
                assert (ROOT / token).is_file(), f"{token} does not exist"
        for flag in ("-m", "--module"):
            if flag in argv:
                assert importlib.util.find_spec(argv[argv.index(flag) + 1]) is not None, argv
        # `ray exec CLUSTER 'cd /app && prunepipe ...'`: the quoted command is checked too
        inner = [shlex.split(a) for a in argv if "prunepipe " in a]
        for cmd in [argv, *inner]:
            if runs_prunepipe(cmd) is not None:
                validate_overrides(*check_prunepipe_command(cmd))
                checked += 1
    assert checked == 8  # every prune/search line of the page (a new one raises this count)


def test_ray_cluster_config_passes_rays_own_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load(RAY_CLUSTER.read_text())
    validate_config(prepare_config(raw))  # what `ray up` runs first; raises on unknown or bad fields
    docker = raw["docker"]
    assert docker["image"] == gpu_image_tag()
    # the image's ENTRYPOINT is prunepipe, and Ray starts its containers with `bash`
    assert re.search(r'^ENTRYPOINT \["prunepipe"\]', (ROOT / "Dockerfile").read_text(), flags=re.M)
    assert any(o.replace(" ", "=").startswith("--entrypoint=") for o in docker["run_options"])
    assert "--gpus all" in docker["run_options"]
    # the config's paths are on the shared mounts every container gets
    cfg = load_config(ROOT / "configs" / "imagenet_resnet101.yaml")
    mounts = [o.split()[1].split(":")[1] for o in docker["run_options"] if o.startswith("-v ")]
    for path in (cfg.output_dir, cfg.data.root, cfg.model.weights):
        assert any(path.startswith(m + "/") for m in mounts), f"{path} is on no shared mount {mounts}"


def test_kuberay_rayjob_is_a_valid_rayjob_running_an_existing_config():
    job = yaml.safe_load(RAYJOB.read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert set(spec) <= RAYJOB_SPEC, set(spec) - RAYJOB_SPEC
    cluster = spec["rayClusterSpec"]
    assert set(cluster) <= RAYCLUSTER_SPEC and set(cluster["headGroupSpec"]) <= HEAD_GROUP
    workers = cluster["workerGroupSpecs"]
    assert workers and all(set(g) <= WORKER_GROUP for g in workers)
    import ray

    assert cluster["rayVersion"] == ray.__version__  # the image's Ray (requirements.txt)

    config, overrides = check_prunepipe_command(shlex.split(spec["entrypoint"]))
    assert config == ROOT / "configs" / "imagenet_resnet101.yaml"
    validate_overrides(config, overrides)
    cfg = load_config(config, overrides)
    uid = re.findall(r"^USER (\d+)", (ROOT / "Dockerfile").read_text(), flags=re.M)[-1]
    pods = [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in workers]
    for pod in pods:
        assert all(isinstance(v, str) for g in [cluster["headGroupSpec"], *workers] for v in g["rayStartParams"].values())
        assert str(pod["securityContext"]["runAsUser"]) == uid and pod["securityContext"]["runAsNonRoot"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        for c in pod["containers"]:
            assert c["image"] == gpu_image_tag()
            mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
            assert all(name in volumes for name in mounts.values())
            # output_dir, the baseline weights and the data are on claims every pod mounts
            for path in (cfg.output_dir, cfg.model.weights, cfg.data.root):
                top = "/" + path.split("/")[1]
                assert top in mounts and "persistentVolumeClaim" in volumes[mounts[top]], (path, mounts)
    # one trial (num_workers x gpus_per_worker GPUs) per worker pod, max_concurrent pods
    gpu = [g for g in workers if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]]
    assert len(gpu) == 1
    per_pod = int(gpu[0]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    assert per_pod == cfg.search.num_workers * cfg.search.gpus_per_worker
    assert gpu[0]["replicas"] >= cfg.search.max_concurrent


def test_placement_strategy_is_validated_at_the_boundary():
    from pipeline.config import ConfigError

    demo = DEMO
    assert load_config(demo).search.placement_strategy == "PACK"  # one node first: NVLink all-reduce
    assert load_config(demo, ["search.placement_strategy=SPREAD"]).search.placement_strategy == "SPREAD"
    with pytest.raises(ConfigError, match=r"^search\.placement_strategy = 'spread': allowed values are"):
        load_config(demo, ["search.placement_strategy=spread"])
