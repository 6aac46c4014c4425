"""Finding, composing and saving the run configuration; Hydra's errors as one line.

conf/ is found however the project is installed (source checkout, editable, wheel, Docker image). Everything
a user can get wrong raises ConfigError, which the entry points print as one ``error:`` line and exit 2.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

CONF_ENV = "SYNCBN_CONF_DIR"

# Keys this project used to have, and where they live now: named in the error for the old spelling.
MOVED = {
    "train.*": "task.*",
    "fault.*": "task.fault.*",
    "check.*": "task.*",
    "bench.*": "task.*",
    "syncbn.group_size": "norm.group_size",
    "launcher.timeout_s": "timeout_s",
    "run_dir": "launcher.run_dir",
}


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


def one_line(error: Exception, overrides: list[str] = ()) -> str:
    """Hydra's and OmegaConf's multi-line errors as one line: what failed, then why."""
    from hydra.errors import MissingConfigException, OverrideParseException

    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    message = lines[0].rstrip(".") if lines else type(error).__name__
    if isinstance(error, OverrideParseException):
        message = f"cannot parse override {error.override!r}: {message.split(': See ')[0]}"
    elif isinstance(error, MissingConfigException) and error.options:
        message += f" (options: {', '.join(sorted(error.options))})"
    elif error.__cause__ is not None and str(error.__cause__).strip():
        message += ": " + str(error.__cause__).strip().splitlines()[0]
    elif len(lines) > 1 and not isinstance(error, MissingConfigException):
        message += ": " + lines[1]
    for override in overrides:
        key = override.lstrip("+~").partition("=")[0]
        for old, new in MOVED.items():
            if key == old or (old.endswith("*") and key.startswith(old[:-1])):
                return f"{message} ({old} is now {new}; see the README's configuration keys)"
    return message


def compose(overrides: list[str]) -> dict[str, Any]:
    """Compose and resolve the config with Hydra's Compose API (no run directory, no logging set up).

    Type errors, unknown keys and unknown options raise ConfigError with Hydra's reason on one line.
    """
    return resolve(compose_raw(overrides), overrides)


def compose_raw(overrides: list[str], *, hydra_keys: bool = False):
    """The composed DictConfig, unresolved; ``hydra_keys`` keeps the ``hydra`` node (sweeper settings)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from . import network, schema

    schema.register()
    network.register_resolvers()  # ${syncbn.node:} in launcher/multinode.yaml
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            return hydra_compose(config_name="config", overrides=overrides, return_hydra_config=hydra_keys)
    except Exception as e:  # Hydra and OmegaConf errors: a user's typo, never a bug to trace back
        raise ConfigError(one_line(e, overrides)) from None


def resolve(cfg, overrides: list[str] = ()) -> dict[str, Any]:
    """The composed config as a plain dict: interpolations resolved (once), enums as their names."""
    from omegaconf import OmegaConf

    try:
        return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    except Exception as e:  # a missing value, an environment variable of the wrong type, ...
        raise ConfigError(one_line(e, overrides)) from None


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


def fixed_world_size(cfg: dict[str, Any]) -> int | None:
    """The job's world size when the launcher fixes it; None for an elastic MIN:MAX node range."""
    launcher = cfg["launcher"]
    low, high = parse_nnodes(launcher["nnodes"])
    return launcher["nproc_per_node"] * high if low == high else None


def save_config(cfg: dict[str, Any], run_dir: Path) -> Path:
    """Write the resolved config as run_dir/config.yaml (the job's one snapshot)."""
    import yaml

    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path
