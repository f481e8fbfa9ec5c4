"""Two nodes on one machine, launched the way a cluster launches them.

Each "node" is a Linux network namespace (its own network stack: a veth pair joins the two,
gloo talks over it) entered with `ip netns exec`, which also gives it a private mount
namespace: its own /dev/shm (DeepSpeed's and streaming's shared memory are per machine) and a
node-local scratch directory bind-mounted at one common path, so the same config serves both
nodes as on a cluster. `run_dir` is on the filesystem both see. Each node runs the DeepSpeed
launcher's multi-node path (`--hostfile --no_ssh --node_rank N`), one CPU rank per node.

The PMP run (early-bird discovery, then masked steps with checkpoints) reads its data from
s3:// (moto in server mode inside node 0's namespace; each node streams into its own
node-local cache), loses a whole node mid-Stage II and mid-epoch (every process in its
namespace SIGKILLed), both nodes are relaunched with `--resume auto`, and the result must
equal a single-node 2-rank run of the same config on local data bit for bit. The same
namespaces check the shared-filesystem contract first: a run_dir that is node-local fails
before training with one clear line.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

from helpers import (REPO, full_masks, launch, launcher_command, launcher_env,
                     run_distributed, tiny_run_config)

PRETRAIN = REPO / "launchers" / "pretrain.py"
PRETRAIN_WITH_FAULT = REPO / "tests" / "dist" / "pretrain_with_fault.py"
KILL_AFTER = 10  # node 1 dies after this optimizer step (Stage II: discovery ends at step 6)


@dataclass
class Node:
    rank: int
    netns: str
    ifname: str
    addr: str


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def _why_no_namespaces() -> str | None:
    if shutil.which("ip") is None:
        return "the `ip` command (Debian package iproute2) is not installed"
    if os.geteuid() != 0:
        return "creating network namespaces needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN)"
    return None


def _setup(nodes: list[Node]) -> None:
    for n in nodes:
        _ip("netns", "add", n.netns)
    a, b = nodes
    _ip("link", "add", a.ifname, "type", "veth", "peer", "name", b.ifname)
    for n in nodes:
        _ip("link", "set", n.ifname, "netns", n.netns)
        _ip("-n", n.netns, "addr", "add", f"{n.addr}/24", "dev", n.ifname)
        _ip("-n", n.netns, "link", "set", n.ifname, "up")
        _ip("-n", n.netns, "link", "set", "lo", "up")  # the launcher's own sockets
        probe = subprocess.run(["ip", "netns", "exec", n.netns, "sh", "-c",
                                "mount -t tmpfs tmpfs /dev/shm"], capture_output=True, text=True)
        if probe.returncode:
            raise PermissionError(f"mount inside a namespace: {probe.stderr.strip()}")


def _kill_namespace(netns: str) -> None:
    """SIGKILL every process of the node: a node lost, not a rank."""
    pids = _ip("netns", "pids", netns, check=False).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass


def _teardown(nodes: list[Node]) -> None:
    for n in nodes:
        _kill_namespace(n.netns)
        _ip("netns", "del", n.netns, check=False)  # takes its end of the veth pair along


# The two-node scenario (five launches on two namespaced nodes, one killed) is the extended
# tier's (tools/test.sh --all). The default tier keeps its cheaper relatives: the shared-run_dir
# probe below, s3:// streaming into a local cache (tests/test_s3.py), SIGKILL mid-run then a
# bit-exact resume (tests/test_fault_tolerance.py).


@pytest.fixture(scope="module")
def nodes():
    why = _why_no_namespaces()
    if why:
        pytest.skip(f"multi-node test needs network namespaces: {why}")
    tag = f"{os.getpid() % 100000}"
    # Addresses exist only inside these two namespaces, so concurrent test runs do not clash.
    pair = [Node(r, f"pmpmn{tag}n{r}", f"pmpv{tag}n{r}", f"10.231.0.{r + 1}") for r in (0, 1)]
    try:
        try:
            _setup(pair)
        except (subprocess.CalledProcessError, PermissionError) as err:
            detail = getattr(err, "stderr", None) or str(err)
            pytest.skip(f"multi-node test needs network namespaces: cannot create them "
                        f"({str(detail).strip()})")
        yield pair
    finally:
        _teardown(pair)


class Cluster:
    """Launches one job on both nodes; `scratch` is node-local (bind-mounted per node)."""

    def __init__(self, root: Path, nodes: list[Node]):
        self.root, self.nodes = root, nodes
        self.scratch = root / "scratch"  # the common path; each node mounts its own dir here
        self.scratch.mkdir()
        self.hostfile = root / "hostfile"
        self.hostfile.write_text("".join(f"node{n.rank} slots=1\n" for n in nodes))

    def node_dir(self, node: Node) -> Path:
        path = self.root / f"node{node.rank}_local"
        path.mkdir(exist_ok=True)
        return path

    def start(self, node: Node, args: list[str], script: Path = PRETRAIN) -> subprocess.Popen:
        tmp = self.scratch / "tmp"
        node_env = launcher_env({"GLOO_SOCKET_IFNAME": node.ifname, "TMPDIR": str(tmp),
                                 "S3_ENDPOINT_URL": f"http://{self.nodes[0].addr}:{S3_PORT}",
                                 "AWS_ACCESS_KEY_ID": "node", "AWS_SECRET_ACCESS_KEY": "node",
                                 "AWS_DEFAULT_REGION": "us-east-1"})
        launcher = launcher_command(script, args, "--hostfile", str(self.hostfile), "--no_ssh",
                                    "--node_rank", str(node.rank), "--master_addr",
                                    self.nodes[0].addr, "--master_port", "29500")
        # A node's own /dev/shm and scratch: mounts made here stay inside its namespace.
        boot = 'mount -t tmpfs tmpfs /dev/shm && mount --bind "$1" "$2" && mkdir -p "$3" ' \
               '&& shift 3 && exec "$@"'
        cmd = ["ip", "netns", "exec", node.netns, "sh", "-c", boot, "sh",
               str(self.node_dir(node)), str(self.scratch), str(tmp), *launcher]
        log = open(self.root / f"{len(list(self.root.glob('*.log')))}_node{node.rank}.log", "w")
        proc = subprocess.Popen(cmd, cwd=REPO, env=node_env, stdout=log,
                                stderr=subprocess.STDOUT, text=True)
        proc.log_path = log.name
        return proc

    def run(self, args: list[str], timeout: int = 600) -> list:
        procs = [self.start(n, args) for n in self.nodes]
        return [_finish(p, timeout) for p in procs]


def _finish(proc: subprocess.Popen, timeout: float) -> tuple[int, str]:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    return proc.returncode, Path(proc.log_path).read_text()


def _stopped(netns: str) -> bool:
    """A process of the node is frozen by its `:STOP` fault point."""
    for pid in _ip("netns", "pids", netns, check=False).stdout.split():
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        if stat.rsplit(")", 1)[1].split()[0] == "T":
            return True
    return False


S3_PORT = 9000
SERVE_S3 = """
import sys, time
from pathlib import Path
import boto3
from moto.server import ThreadedMotoServer
host, port, local, bucket = sys.argv[1:5]
ThreadedMotoServer(ip_address=host, port=int(port), verbose=False).start()
s3 = boto3.client("s3", endpoint_url=f"http://{host}:{port}", region_name="us-east-1",
                  aws_access_key_id="node", aws_secret_access_key="node")
s3.create_bucket(Bucket=bucket)
for path in sorted(Path(local).rglob("*")):  # as object storage holds it: no .mds copies
    if path.is_file() and path.suffix != ".mds":
        s3.upload_file(str(path), bucket, f"tiny/{path.relative_to(local)}")
print("ready", flush=True)
time.sleep(3600)
"""


def _serve_s3(node: Node, data: str) -> subprocess.Popen:
    """A local S3 endpoint in node 0's namespace (both nodes reach it over the veth pair)."""
    proc = subprocess.Popen(["ip", "netns", "exec", node.netns, sys.executable, "-c", SERVE_S3,
                             node.addr, str(S3_PORT), data, "pmp-data"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line.strip() == "ready", line + proc.stderr.read()
    return proc


def _config(root: Path, data: dict, run_dir: Path, cache: Path, path: str | None = None) -> Path:
    cfg = tiny_run_config(run_dir, data, seed=11, checkpoint={"every": 4},
                          data={"path": path or data["data"], "local_cache": str(cache)},
                          pmp={"enabled": True, "mask_ratio": 0.6, "check_every": 2,
                               "patience": 9, "warmup_max_steps": 6, "save_init": True})
    path = root / f"{run_dir.parent.name}_{run_dir.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def multinode(nodes, tiny_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("multinode")
    cluster = Cluster(root, nodes)
    out = {"root": root}
    _serve_s3(nodes[0], tiny_data["data"])  # ends with node 0's namespace
    remote = "s3://pmp-data/tiny"
    # Shared-filesystem contract first (fails before training, so it is cheap): run_dir on
    # node-local scratch, so each node sees only its own rank's probe.
    unshared = _config(root, tiny_data, cluster.scratch / "run", cluster.scratch / "cache",
                       remote)
    out["unshared"] = cluster.run(["--config", str(unshared)], timeout=300)

    cfg = _config(root, tiny_data, root / "run", cluster.scratch / "cache", remote)
    procs = [cluster.start(n, ["--fault", f"rank1:step:{KILL_AFTER}:STOP", "--config", str(cfg),
                               "--resume", "auto"], script=PRETRAIN_WITH_FAULT) for n in nodes]
    deadline = time.monotonic() + 600
    while not _stopped(nodes[1].netns) and procs[1].poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    out["stopped"] = _stopped(nodes[1].netns)
    _kill_namespace(nodes[1].netns)  # node 1 is lost: launcher and rank alike
    out["killed"] = [_finish(procs[1], 60), _finish(procs[0], 180)]
    out["resumed"] = cluster.run(["--config", str(cfg), "--resume", "auto"])

    ref_cfg = _config(root, tiny_data, root / "ref", root / "ref_cache")
    out["ref"] = launch(PRETRAIN, ["--config", str(ref_cfg)], 2)
    return out


def _ok(result) -> None:
    code, log = result
    assert code == 0, log[-5000:]


def _losses(run_dir: Path) -> dict[int, list[float]]:
    from pmp_scale.telemetry import read_metrics
    out: dict[int, list[float]] = {}
    for m in read_metrics(run_dir):
        if "train/loss" in m:
            out.setdefault(m["step"], []).append(m["train/loss"])
    return out


def _release(run_dir: Path, out: Path) -> dict[str, torch.Tensor]:
    from pmp_scale.release import release_checkpoint, resolve_checkpoint, release_tensors
    release_checkpoint(resolve_checkpoint(run_dir), out, dtype="fp32", progress=False)
    return dict(release_tensors(out))


@pytest.mark.extended
@pytest.mark.timeout(2400)  # the module's five launches
def test_two_nodes_lose_one_resume_and_equal_a_single_node_run(multinode):
    ref = multinode["ref"]
    assert ref.returncode == 0, ref.stdout[-4000:] + ref.stderr[-4000:]
    root = multinode["root"]
    assert multinode["stopped"], "node 1 never reached its fault point"
    (b_code, b_log), (a_code, a_log) = multinode["killed"]
    assert b_code != 0 and a_code != 0, (b_log[-3000:], a_log[-3000:])
    for result in multinode["resumed"]:
        _ok(result)
    assert "resumed from step00000008" in multinode["resumed"][0][1]

    # every loss ever logged (the lost steps 9-10 twice) equals the single-node run's
    ref_losses, losses = _losses(root / "ref"), _losses(root / "run")
    assert sorted(ref_losses) == list(range(1, 13)) == sorted(losses)
    for step, values in losses.items():
        assert values == ref_losses[step] * len(values), step

    from pmp_scale.mask.artifact import read_artifact
    from safetensors.torch import load_file
    mask, meta = read_artifact(root / "run" / "private" / "mask")
    ref_mask, _ = read_artifact(root / "ref" / "private" / "mask")
    assert mask.keys() == ref_mask.keys()
    assert all(torch.equal(mask[n], ref_mask[n]) for n in mask)
    assert meta["stage2_start_step"] == 6

    weights = _release(root / "run", root / "release_multinode")
    ref_weights = _release(root / "ref", root / "release_single")
    assert weights.keys() == ref_weights.keys()
    for name, value in ref_weights.items():
        assert torch.equal(weights[name], value), name
    from pmp_scale.release import release_sha256
    assert release_sha256(root / "release_multinode") == release_sha256(root / "release_single")

    init = load_file(str(root / "run" / "private" / "mask" / "init.safetensors"))
    trained = 0
    keeps = full_masks(root / "run" / "private" / "mask")
    for name, value in weights.items():
        keep = keeps[name]
        assert torch.equal(value[~keep], init[name][~keep]), name  # complement bit-exact
        trained += int((value[keep] != init[name][keep]).sum())
    assert trained > 0


@pytest.mark.extended
@pytest.mark.timeout(2400)  # the module's five launches
def test_run_dir_not_shared_between_nodes_is_one_clear_error(multinode):
    for code, log in multinode["unshared"]:
        assert code == 2, log[-4000:]
        assert "Traceback" not in log, log[-4000:]
    rank0 = multinode["unshared"][0][1]
    line = next(l for l in rank0.splitlines() if l.startswith("error: "))
    scratch = multinode["root"] / "scratch" / "run"
    assert f"run_dir {scratch} is not shared by all ranks" in line, line
    assert "rank 0 cannot see the probe files of rank 1" in line, line
    # nothing was trained: no checkpoint on either node
    for node in (0, 1):
        assert not (multinode["root"] / f"node{node}_local" / "run" / "checkpoints").exists()


@pytest.mark.extended
@pytest.mark.timeout(2400)  # the module's five launches
def test_each_node_streamed_from_s3_into_its_own_cache(multinode):
    for node in (0, 1):
        cache = multinode["root"] / f"node{node}_local" / "cache"
        assert list((cache / "train").glob("shard.*.mds")), node
    assert not list((multinode["root"] / "scratch").iterdir())  # only ever mounted over


def _probe(rank, world, dirs):
    from pmp_scale.cluster import SharedFilesystemError, check_shared_run_dir
    try:
        check_shared_run_dir(dirs[rank], wait_s=0.5)
        return None
    except SharedFilesystemError as err:
        return str(err)


def test_shared_run_dir_probe(tmp_path):
    """Without namespaces: ranks given the same / different / an unwritable run_dir."""
    shared = tmp_path / "shared"
    assert run_distributed(_probe, 2, [shared, shared]) == [None, None]
    assert not (shared / ".shared_fs_probe").exists()  # the probe cleans up after itself
    mine, other = tmp_path / "a", tmp_path / "b"
    errors = run_distributed(_probe, 2, [mine, other])
    assert errors[0] == errors[1] and errors[0].startswith(
        f"run_dir {mine} is not shared by all ranks: rank 0 cannot see the probe files of rank 1")
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    errors = run_distributed(_probe, 2, [shared, blocked / "run"])
    assert errors[0] == errors[1] and errors[0].startswith(
        f"run_dir {shared} is not writable by every rank: rank 1 ")
