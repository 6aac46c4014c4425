"""Tier 3: the README's "Many nodes by hand" commands on two real network hosts.

Each host is a Linux network namespace (one veth pair between them) with its own UTS namespace, whose
hostname resolves to 127.0.0.1 only (a bind-mounted /etc/hosts), as on many machines and containers: so
nothing can be guessed from hostnames. Both nodes type the README's command verbatim, only its
<head-ip>, <port> and <id> placeholders filled in, into one shared working directory. Needs root and
iproute2's `ip`; skipped elsewhere. All traffic stays inside the namespaces this test creates, and it
always removes them and every process it started.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.multiprocess

ROOT = Path(__file__).resolve().parents[2]


def readme_commands() -> list[str]:
    """The commands of the README's "Many nodes by hand" code block, one string each."""
    text = (ROOT / "README.md").read_text()
    section = text.split("### Many nodes by hand", 1)[1].split("\n### ", 1)[0]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    return [" ".join(line.split()) for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def _run(*args: str) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True, timeout=30).stdout


def _netns_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if not (shutil.which("ip") and shutil.which("unshare")):
        return "needs iproute2's `ip` and util-linux's `unshare`"
    probe = f"sbnprobe{os.getpid()}"
    try:
        _run("ip", "netns", "add", probe)
    except (subprocess.CalledProcessError, OSError) as e:
        return f"`ip netns add` failed here: {getattr(e, 'stderr', e)}"
    _run("ip", "netns", "del", probe)
    return None


@pytest.fixture
def two_hosts(tmp_path):
    """Two hosts joined by a veth pair; each host's name resolves to 127.0.0.1, not to its veth address."""
    reason = _netns_unavailable()
    if reason:
        pytest.skip(reason)
    tag = f"{os.getpid() % 100000}"
    subnet = f"10.213.{random.randint(1, 250)}"  # only ever configured inside our own namespaces
    hosts = []
    for i, name in enumerate(("node-a", "node-b")):
        etc_hosts = tmp_path / f"hosts-{name}"
        etc_hosts.write_text(f"127.0.0.1 localhost {name}\n")
        hosts.append(
            {"name": name, "ns": f"sbn{tag}{i}", "ifname": f"sbn{tag}v{i}", "ip": f"{subnet}.{i + 1}"}
            | {"etc_hosts": str(etc_hosts)}
        )
    try:
        for h in hosts:
            _run("ip", "netns", "add", h["ns"])
        a, b = hosts
        _run("ip", "link", "add", a["ifname"], "type", "veth", "peer", "name", b["ifname"])
        for h in hosts:
            _run("ip", "link", "set", h["ifname"], "netns", h["ns"])
            _run("ip", "-n", h["ns"], "addr", "add", f"{h['ip']}/24", "dev", h["ifname"])
            _run("ip", "-n", h["ns"], "link", "set", h["ifname"], "up")
            _run("ip", "-n", h["ns"], "link", "set", "lo", "up")
        yield hosts
    finally:
        for h in hosts:  # deleting a namespace also removes its end of the veth pair
            subprocess.run(["ip", "netns", "del", h["ns"]], capture_output=True, timeout=30)


def _env() -> dict:
    """The user's shell: our venv's python first on PATH, no launcher or interface settings inherited."""
    drop = ("TORCHELASTIC", "PET_", "SLURM_", "MASTER_", "GLOO_", "NCCL_", "HYDRA_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "GROUP_RANK"):
        env.pop(name, None)
    return env | {
        "PATH": f"{Path(sys.executable).parent}:{env.get('PATH', '/usr/bin:/bin')}",
        "PYTHONPATH": str(ROOT),
    }


class Node:
    """One user command on one host, typed into a shell there; its own process group, killed at the end."""

    def __init__(self, host: dict, command: str, cwd: Path):
        self.host, self.started = host, time.monotonic()
        # A new UTS + mount namespace inside the network namespace: this host's own name and /etc/hosts.
        setup = 'mount --bind "$1" /etc/hosts && hostname "$2" && exec sh -c "$3"'
        argv = ["ip", "netns", "exec", host["ns"], "unshare", "--uts", "--mount", "sh", "-c", setup]
        self.proc = subprocess.Popen(
            [*argv, "sh", host["etc_hosts"], host["name"], command],
            cwd=cwd,
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )

    def wait(self, timeout: float) -> tuple[int, str, str, float]:
        """(exit code, stdout, stderr, seconds since start); kills the whole process group on timeout."""
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            out, err = self.proc.communicate()
            pytest.fail(f"{self.host['name']} still running after {timeout} s:\n{err[-3000:]}")
        return self.proc.returncode, out, err, time.monotonic() - self.started

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)


def _fill(command: str, head: dict, port: int, run_id: str) -> str:
    return command.replace("<head-ip>", head["ip"]).replace("<port>", str(port)).replace("<id>", run_id)


def _job(hosts: list[dict], command: str, cwd: Path, run_id: str, timeout: float = 120) -> str:
    """Type the same filled-in command on both hosts; both must succeed. Returns the command typed."""
    port = random.randint(20000, 40000)  # free by construction: fresh namespaces have no listeners
    typed = _fill(command, hosts[0], port, run_id)
    nodes = [Node(h, typed, cwd) for h in hosts]
    try:
        results = [n.wait(timeout) for n in nodes]
    finally:
        for n in nodes:
            n.kill()
    for n, (code, _, err, _) in zip(nodes, results, strict=True):
        assert code == 0, f"{n.host['name']} failed:\n{err[-3000:]}"
    for n, (_, out, err, seconds) in zip(nodes, results, strict=True):
        print(f"--- {n.host['name']} ({seconds:.1f} s)\n{out[-2000:]}\n{err[-4000:]}")
    return typed


def _bytes_sent(host: dict) -> int:
    path = f"/sys/class/net/{host['ifname']}/statistics/tx_bytes"
    return int(_run("ip", "netns", "exec", host["ns"], "cat", path))


def test_readme_commands_form_one_job_across_two_hosts(two_hosts, tmp_path):
    check, train = readme_commands()
    assert "task=check" in check and "experiment=smoke" in train
    assert "<head-ip>:<port>" in check and "<id>" in check and "launcher=multinode" in check
    before = [_bytes_sent(h) for h in two_hosts]

    _job(two_hosts, check, tmp_path, "check-job")
    result = json.loads((tmp_path / "outputs" / "check-job" / "check.json").read_text())
    assert result["passed"] and result["world_size"] == 4 and result["backend"] == "gloo"

    typed = _job(two_hosts, train, tmp_path, "train-job")
    run_dir = tmp_path / "outputs" / "train-job"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 4 and summary["steps"] > 0
    # The collectives really crossed the veth link, in both directions.
    after = [_bytes_sent(h) for h in two_hosts]
    assert all(a - b > 50_000 for a, b in zip(after, before, strict=True)), (before, after)

    # One shared run directory, no file written by both nodes: the job's files once, each node's own apart.
    assert sorted(p.name for p in (run_dir / "logs").iterdir()) == [f"rank{r}.log" for r in range(4)]
    for r in range(4):
        assert f"rank {r}/4" in (run_dir / "logs" / f"rank{r}.log").read_text()
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["launcher"]["run_id"] == "train-job"
    assert not (run_dir / ".hydra").exists() and not (run_dir / "run.log").exists()
    nodes = sorted(p.name for p in (run_dir / "nodes").iterdir())
    assert [re.sub(r"-\d+$", "", n) for n in nodes] == ["node-a", "node-b"], nodes
    for host, node in zip(two_hosts, nodes, strict=True):
        node_dir = run_dir / "nodes" / node
        overrides = yaml.safe_load((node_dir / ".hydra" / "overrides.yaml").read_text())
        assert overrides == typed.split()[3:]  # this node's command, intact
        agent_log = (node_dir / "run.log").read_text()
        assert f"this node's address {host['ip']} (interface {host['ifname']})" in agent_log
        other = next(h for h in two_hosts if h is not host)
        assert f"this node's address {other['ip']}" not in agent_log


def _last_line(err: str) -> str:
    return err.strip().splitlines()[-1]


def test_unreachable_head_fails_within_connect_timeout(two_hosts, tmp_path):
    """A node whose head never answers (no host at that address) gives up after launcher.connect_timeout_s."""
    check = readme_commands()[0]
    nobody = two_hosts[0] | {"ip": two_hosts[0]["ip"].rsplit(".", 1)[0] + ".99"}
    typed = _fill(check, nobody, 29400, "lonely") + " launcher.connect_timeout_s=5"
    code, _, err, seconds = Node(two_hosts[1], typed, tmp_path).wait(timeout=60)
    print(f"unreachable head: exit {code} after {seconds:.1f} s (start-up included)")
    assert code == 1 and 5 <= seconds <= 5 + 15, (seconds, err[-3000:])
    line = _last_line(err)
    assert line.startswith(f"error: cannot reach the rendezvous store at {nobody['ip']}:29400 from this node "
                           f"{two_hosts[1]['ip']} (interface {two_hosts[1]['ifname']}) within "
                           "launcher.connect_timeout_s=5 s"), err[-3000:]  # fmt: skip
    assert "Traceback" not in err and "HYDRA_FULL_ERROR" not in err


def _training_traffic(host: dict, timeout: float = 90) -> None:
    """Return once `host` sends steadily over its link: the job is past start-up and training."""
    deadline = time.monotonic() + timeout
    last = _bytes_sent(host)
    while time.monotonic() < deadline:
        time.sleep(1)
        now = _bytes_sent(host)
        if now - last > 100_000:
            return
        last = now
    pytest.fail("the job never started training")


def _running_in_group(pgid: int) -> list[str]:
    """Processes of process group `pgid` that still run (zombies, already dead, do not count)."""
    running = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        name, fields = text[text.index("(") : text.rindex(")") + 1], text[text.rindex(")") + 2 :].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            running.append(f"{stat.parent.name} {name} {fields[0]}")
    return running


def test_lost_node_ends_every_process_within_timeout(two_hosts, tmp_path):
    """Link down mid-training: both nodes, the cut-off one included, end within timeout_s."""
    timeout_s, slack = 6, 20  # slack: the workers and agents exiting (CPU work, slow on a loaded machine)
    train = readme_commands()[1]
    typed = _fill(train, two_hosts[0], random.randint(20000, 40000), "lost")
    typed += f" timeout_s={timeout_s} data.train.size=100000"
    nodes = [Node(h, typed, tmp_path) for h in two_hosts]
    try:
        _training_traffic(two_hosts[1])
        _run("ip", "-n", two_hosts[1]["ns"], "link", "set", two_hosts[1]["ifname"], "down")
        cut = time.monotonic()
        for n in nodes:
            code, _, err, _ = n.wait(timeout=timeout_s + 60)
            seconds = time.monotonic() - cut
            print(f"lost node, {n.host['name']}: exit {code} {seconds:.1f} s after the link went down")
            assert code == 1 and seconds <= timeout_s + slack, (seconds, err[-3000:])
            time.sleep(1)  # the agent's own children end with it
            assert not _running_in_group(n.proc.pid), f"left running on {n.host['name']}"
            assert "HYDRA_FULL_ERROR" not in err and "Exception raised from" not in err, err[-3000:]
            # multiprocessing's resource tracker may add its leaked-semaphore warning (2 lines) at exit
            tail = [line for line in err.strip().splitlines() if "resource_tracker" not in line][-3:]
            if n.host is two_hosts[0]:  # the head: its workers' collective failed
                # Which rank the agent reports first varies: one whose gloo wait timed out, or one whose
                # SyncBN all-reduce failed (its peer on this node had already exited on the timeout).
                failed = ("Timed out", "SyncBatchNorm: all-reduce of")
                reported = [line for line in tail if line.startswith("  rank ")]
                assert any(f in line for line in reported for f in failed), tail
                assert tail[-1].startswith("hint: a collective waited up to timeout_s=6 s"), tail
            else:  # cut off: its workers time out too, or its agent loses the head's store first
                signs = (
                    "hint: a collective waited",
                    "error: no reply from the rendezvous",
                    "error: lost the rend",
                )
                assert tail[-1].startswith(signs), tail
    finally:
        for n in nodes:
            n.kill()
