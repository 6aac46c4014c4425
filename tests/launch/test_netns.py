"""Tier 3: a real two-host job. Two Linux network namespaces joined by a veth pair, one elastic agent in each,
c10d rendezvous across them, gloo over the veth interface. Needs root and iproute2; skipped elsewhere.

All traffic stays inside the namespaces this test creates, and it always removes them.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.multiprocess

ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, text=True, timeout=30)


def _netns_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if not shutil.which("ip"):
        return "needs iproute2's `ip`"
    probe = f"sbnprobe{os.getpid()}"
    try:
        _run("ip", "netns", "add", probe)
    except (subprocess.CalledProcessError, OSError) as e:
        return f"`ip netns add` failed here: {getattr(e, 'stderr', e)}"
    _run("ip", "netns", "del", probe)
    return None


@pytest.fixture
def two_hosts():
    reason = _netns_unavailable()
    if reason:
        pytest.skip(reason)
    tag = f"{os.getpid() % 100000}"
    subnet = f"10.213.{random.randint(1, 250)}"  # only ever configured inside our own namespaces
    hosts = [
        {"ns": f"sbn{tag}a", "ifname": f"sbn{tag}a", "ip": f"{subnet}.1"},
        {"ns": f"sbn{tag}b", "ifname": f"sbn{tag}b", "ip": f"{subnet}.2"},
    ]
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


def _bytes_sent(host: dict) -> int:
    out = subprocess.run(
        ["ip", "netns", "exec", host["ns"], "cat", f"/sys/class/net/{host['ifname']}/statistics/tx_bytes"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return int(out)


def _job(hosts: list[dict], run_dir: Path, run_id: str, extra: list[str]) -> None:
    port = random.randint(20000, 40000)  # free by construction: fresh namespaces have no listeners
    procs = []
    for i, h in enumerate(hosts):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHELASTIC", "PET_", "SLURM_"))}
        env |= {"GLOO_SOCKET_IFNAME": h["ifname"], "PYTHONPATH": str(ROOT)}
        overrides = [
            "launcher.nnodes=2",
            "launcher.nproc_per_node=2",
            f"launcher.rdzv_endpoint={hosts[0]['ip']}:{port}",
            f"launcher.run_id={run_id}",
            f"launcher.is_host={'true' if i == 0 else 'false'}",
            f"launcher.local_addr={h['ip']}",
            "launcher.join_timeout_s=60",
            "timeout_s=60",
            f"hydra.run.dir={run_dir}",
            *([] if i == 0 else ["hydra.output_subdir=null"]),
            *extra,
        ]
        cmd = ["ip", "netns", "exec", h["ns"], sys.executable, "-m", "launch.run", *overrides]
        procs.append(
            subprocess.Popen(
                cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    try:
        outputs = [p.communicate(timeout=150) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for h, p, (_, err) in zip(hosts, procs, outputs, strict=True):
        assert p.returncode == 0, f"agent in {h['ns']} failed:\n{err[-3000:]}"


def test_two_network_hosts_form_one_job(two_hosts, tmp_path):
    before = [_bytes_sent(h) for h in two_hosts]
    _job(two_hosts, tmp_path / "check", "netns-check", ["task=check"])
    result = json.loads((tmp_path / "check" / "check.json").read_text())
    assert result["passed"] and result["world_size"] == 4 and result["backend"] == "gloo"

    _job(two_hosts, tmp_path / "train", "netns-train", ["experiment=smoke", "task.epochs=1"])
    summary = json.loads((tmp_path / "train" / "summary.json").read_text())
    assert summary["world_size"] == 4 and summary["steps"] > 0
    assert sorted(p.name for p in (tmp_path / "train" / "logs").iterdir()) == [
        f"rank{r}.log" for r in range(4)
    ]
    # The collectives really crossed the veth link, in both directions.
    after = [_bytes_sent(h) for h in two_hosts]
    assert all(a - b > 50_000 for a, b in zip(after, before, strict=True)), (before, after)
