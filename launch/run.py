"""python -m launch.run: check the config, let Hydra compose it, then start this node's elastic agent.

python -m launch.run                                   # train: 2 gloo workers on this machine
python -m launch.run task=check launcher.nproc_per_node=4
python -m launch.run -m experiment=small_batch         # Hydra multirun: norm=bn,syncbn
python -m launch.run launcher=multinode launcher.nnodes=2 launcher.rdzv_endpoint=<head-ip>:29400  # every node
python -m launch.run --cfg job                         # print the composed config, start nothing

Flow: preflight (every job's config composed and validated: bad ones exit 2 with one line, before Hydra
makes a run directory) -> launch/rundir.py claims the run directory -> Hydra composes and resolves ->
launch/agent.py -> launch/worker.py on each rank.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from . import waits
from .config import ConfigError, conf_dir, fixed_world_size, resolve
from .validate import validate


def launch(cfg) -> None:
    """The Hydra task function: runs once per job (once per sweep point under --multirun)."""
    from hydra.core.hydra_config import HydraConfig

    with waits.quiet_agent():  # torch's C++ store code would warn about every socket hiccup of the agent
        from . import agent

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    resolved = resolve(cfg)
    try:  # preflight has checked this already, unless a flag it leaves to Hydra (-cd, -cn) was given
        validate(resolved, world_size=fixed_world_size(resolved))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    # The directory Hydra made (hydra.run.dir, or a sweep's subdir) is the one the workers write to.
    resolved["launcher"]["run_dir"] = str(run_dir)
    agent.start(resolved, run_dir)
    print(f"outputs: {run_dir}")


def main() -> None:
    import hydra

    from . import network, rundir, schema
    from .preflight import preflight, split_argv, starts_jobs

    flags, overrides = split_argv(sys.argv[1:])
    claimed = None
    try:
        config_path = str(conf_dir())
        with waits.quiet_agent():  # preflight imports torch for device=cuda: then it is the agent's torch
            preflight(sys.argv[1:])
        if starts_jobs(flags):  # this job's own run directory, before Hydra writes anything into it
            claimed, hydra_dir = rundir.prepare(overrides, multirun=bool(flags & {"-m", "--multirun"}))
            sys.argv.append(hydra_dir)
            os.environ[rundir.JOB_ENV] = claimed.token  # the workers inherit it
    except ConfigError as e:  # one clear line, no traceback wall, no run directory left behind
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    schema.register()
    network.register_resolvers()  # ${syncbn.node:}: each node's own folder in a shared run directory
    try:
        hydra.main(config_path=config_path, config_name="config", version_base="1.3")(launch)()
    except KeyboardInterrupt:  # Ctrl-C before the agent started (it reports its own, launch/agent.py)
        print("interrupted by SIGINT", file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        if claimed is not None:
            rundir.finish(claimed)


if __name__ == "__main__":
    main()
