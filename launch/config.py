"""Finding, composing and checking the run configuration.

conf/ is found however the project is installed (source checkout, editable, wheel, Docker image); checks on
user-given values raise ConfigError, which the entry points print as one line and exit non-zero.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

CONF_ENV = "SYNCBN_CONF_DIR"


class ConfigError(ValueError):
    """A configuration value a user can fix; printed as one line, never as a traceback."""


def conf_dir() -> Path:
    """The folder holding config.yaml: $SYNCBN_CONF_DIR, the checkout's conf/, or the copy in the wheel."""
    here = Path(__file__).resolve().parent
    # The copy inside the package (wheel, Docker image) first, then the source checkout's conf/.
    candidates = [os.environ.get(CONF_ENV), here / "conf", here.parent / "conf"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "config.yaml").is_file():
            return Path(candidate)
    tried = ", ".join(str(c) for c in candidates if c)
    raise ConfigError(f"cannot find the syncbn config folder (config.yaml); tried {tried}; set {CONF_ENV}")


def compose(overrides: list[str]) -> dict[str, Any]:
    """Compose and resolve the config with Hydra's Compose API (for workers started by torchrun/srun)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=overrides)
    return OmegaConf.to_container(cfg, resolve=True)


def parse_nnodes(value: Any) -> tuple[int, int]:
    """``launcher.nnodes`` as (min, max): an int, or "MIN:MAX" as torchrun and Kubeflow write it."""
    text = str(value)
    try:
        low, _, high = text.partition(":")
        lo, hi = int(low), int(high or low)
    except ValueError:
        raise ConfigError(f"launcher.nnodes must be an integer or MIN:MAX, got {value!r}") from None
    if not 1 <= lo <= hi:
        raise ConfigError(f"launcher.nnodes must satisfy 1 <= min <= max, got {value!r}")
    return lo, hi


def validate(cfg: dict[str, Any], cuda_available: bool) -> None:
    """Check what would otherwise fail late, on every worker, with a worse message."""
    launcher = cfg["launcher"]
    nproc = launcher["nproc_per_node"]
    if not isinstance(nproc, int) or nproc < 1:
        raise ConfigError(f"launcher.nproc_per_node must be an integer >= 1, got {nproc!r}")
    _, max_nodes = parse_nnodes(launcher["nnodes"])
    if max_nodes > 1 and str(launcher["rdzv_endpoint"]).rpartition(":")[2] in ("", "0"):
        raise ConfigError(
            f"launcher.nnodes={launcher['nnodes']} needs a fixed rendezvous port that every node can reach, "
            f"got launcher.rdzv_endpoint={launcher['rdzv_endpoint']!r} (e.g. head-node:29400)"
        )
    if cfg["device"] not in ("cpu", "cuda"):
        raise ConfigError(f"device must be cpu or cuda, got {cfg['device']!r}")
    if cfg["device"] == "cuda" and not cuda_available:
        raise ConfigError("device=cuda but CUDA is not available on this machine; use device=cpu (gloo)")
    if cfg["backend"] not in (None, "gloo", "nccl"):
        raise ConfigError(f"backend must be gloo, nccl or null (= follow device), got {cfg['backend']!r}")
    if cfg["backend"] == "nccl" and cfg["device"] != "cuda":
        raise ConfigError("backend=nccl needs device=cuda; CPU tensors need gloo")
    if float(launcher["timeout_s"]) <= 0:
        raise ConfigError(f"launcher.timeout_s must be > 0, got {launcher['timeout_s']!r}")
    group_size = cfg["syncbn"]["group_size"]
    if group_size is not None and (not isinstance(group_size, int) or group_size < 1):
        raise ConfigError(f"syncbn.group_size must be null or an integer >= 1, got {group_size!r}")
    if cfg["norm"]["name"] not in ("syncbn", "bn"):
        raise ConfigError(f"norm must be syncbn or bn, got {cfg['norm']['name']!r}")


def backend_for(cfg: dict[str, Any]) -> str:
    return cfg["backend"] or ("nccl" if cfg["device"] == "cuda" else "gloo")


def save_config(cfg: dict[str, Any], run_dir: Path) -> Path:
    """Write the resolved config as run_dir/config.yaml (the job's one snapshot)."""
    import yaml

    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path
