"""python -m launch.run: compose the config once, then start the workers with torch's elastic agent.

python -m launch.run                                   # train: 2 gloo workers on this machine
python -m launch.run task=check launcher.nproc_per_node=4
python -m launch.run -m experiment=small_batch         # Hydra multirun: norm=bn,syncbn
python -m launch.run launcher=multinode launcher.nnodes=2 launcher.rdzv_endpoint=<head-ip>:29400  # every node
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from . import network, waits
from .config import ConfigError, conf_dir, parse_nnodes, validate
from .loopback import is_loopback, loopback_only

# Set by torchrun / the elastic agent in every worker it starts.
_ELASTIC_ENV = ("TORCHELASTIC_RUN_ID", "LOCAL_RANK", "GROUP_RANK")


def _launch_config(cfg: dict, run_dir: Path, net: network.NodeNetwork | None = None):
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, Std
    from torch.distributed.launcher.api import LaunchConfig

    launcher = cfg["launcher"]
    min_nodes, max_nodes = parse_nnodes(launcher["nnodes"])
    nproc = launcher["nproc_per_node"]
    rdzv_configs = {"join_timeout": int(launcher["join_timeout_s"])}
    # c10d guesses whether this node hosts the rendezvous store from its hostname, which fails behind
    # NAT, in containers and in network namespaces; multi-node agents work it out from their addresses.
    is_host = net.is_host if net else launcher.get("is_host")
    if is_host is not None:
        rdzv_configs["is_host"] = bool(is_host)
    if net is not None:
        rdzv_configs |= waits.rdzv_timeouts(launcher)
    return LaunchConfig(
        min_nodes=min_nodes,
        max_nodes=max_nodes,
        nproc_per_node=nproc,
        run_id=str(launcher["run_id"]),
        rdzv_backend="c10d",
        rdzv_endpoint=str(launcher["rdzv_endpoint"]),
        rdzv_configs=rdzv_configs,
        max_restarts=int(launcher["max_restarts"]),
        monitor_interval=float(launcher["monitor_interval_s"]),
        start_method="spawn",
        # The address other nodes reach this agent's workers at (rank 0's becomes the workers' MASTER_ADDR).
        local_addr=net.local_addr if net else launcher.get("local_addr"),
        # Local rank 0 keeps the console (and its progress bar); the others write only to files.
        logs_specs=DefaultLogsSpecs(
            log_dir=str(run_dir / "elastic"), redirects={r: Std.ALL for r in range(1, nproc)}
        ),
    )


def _report_failure(error, run_dir: Path, launcher: dict | None = None) -> None:
    """Print the failing rank's own exception, not just 'child failed' (with a hint when multi-node)."""
    failures = getattr(error, "failures", {}) or {}
    print(f"error: {len(failures) or 'some'} worker(s) failed; logs: {run_dir / 'logs'}", file=sys.stderr)
    hints = set()
    for rank, failure in sorted(failures.items())[:4]:
        message = failure.message
        if isinstance(message, dict):
            message = message.get("message", message)
        print(f"  rank {rank} (exit code {failure.exitcode}): {waits.one_line(message)}", file=sys.stderr)
        if launcher is not None:
            hints.add(waits.hint(str(message), launcher))
    for line in sorted(h for h in hints if h):
        print(line, file=sys.stderr)


def launch(cfg: DictConfig) -> None:
    """The Hydra task function: runs once per job (once per sweep point under --multirun)."""
    with waits.quiet_agent():  # the agent's C++ store code would warn about every socket hiccup
        import torch
        from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
        from torch.distributed.launcher.api import elastic_launch

    from .worker import run_worker

    found = [name for name in _ELASTIC_ENV if name in os.environ]
    if found:
        raise ConfigError(
            "launch.run starts its own workers and cannot run inside an elastic job "
            f"(found {', '.join(found)}); under torchrun/srun use: torchrun ... -m launch.worker <overrides>"
        )
    resolved = OmegaConf.to_container(cfg, resolve=True)
    validate(resolved, torch.cuda.is_available())
    launcher = resolved["launcher"]
    min_nodes, max_nodes = parse_nnodes(launcher["nnodes"])
    group_size = resolved["syncbn"]["group_size"]
    world = launcher["nproc_per_node"] * max_nodes
    if group_size is not None and min_nodes == max_nodes and world % group_size:
        raise ConfigError(f"syncbn.group_size={group_size} does not divide the world size {world}")

    host = str(launcher["rdzv_endpoint"]).rpartition(":")[0]
    if max_nodes > 1 and host in ("localhost", "127.0.0.1", "::1"):
        print(
            f"warning: launcher.rdzv_endpoint={launcher['rdzv_endpoint']} with {max_nodes} nodes only works "
            "when all agents run on this machine; on a cluster give the head node's address",
            file=sys.stderr,
        )
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    local = max_nodes == 1 and is_loopback(host) and is_loopback(launcher.get("local_addr"))
    net = None if local else network.prepare(launcher)
    try:
        with loopback_only() if local else waits.bounded_agent(launcher):
            elastic_launch(_launch_config(resolved, run_dir, net), run_worker)(resolved, str(run_dir))
    except ChildFailedError as e:
        _report_failure(e, run_dir, launcher if net else None)
        raise SystemExit(1) from None
    except Exception as e:  # rendezvous and store failures: one line naming the wait, not a C++ traceback
        explained = waits.explain(e, net, launcher)
        if explained is None:
            raise
        raise explained from None
    print(f"outputs: {run_dir}")


def _task(cfg: DictConfig) -> None:
    try:
        launch(cfg)
    except ConfigError as e:  # one clear line, no traceback wall
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except network.NetworkError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None


def main() -> None:
    try:
        config_path = str(conf_dir())
    except ConfigError as e:
        sys.exit(f"error: {e}")
    network.register_resolvers()
    hydra.main(config_path=config_path, config_name="config", version_base="1.3")(_task)()


if __name__ == "__main__":
    main()
