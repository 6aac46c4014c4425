"""Check a launch.run command line before Hydra makes any output directory.

Composes every job the command would run (each point of a --multirun sweep, including the sweeper's params
from the config) with the Compose API, then validate()s it, so a rejected config prints one line, exits 2
and leaves nothing behind. Hydra composes again for the real run; that costs a fraction of a second.
"""

from __future__ import annotations

import itertools
import os
from typing import Any

from .config import ConfigError, compose, compose_raw, fixed_world_size, one_line
from .validate import validate

# Set by torchrun / the elastic agent in every worker it starts.
ELASTIC_ENV = ("TORCHELASTIC_RUN_ID", "LOCAL_RANK", "GROUP_RANK")
# Hydra flags that change which config is composed, or print instead of running: leave those to Hydra.
_HANDS_OFF = {"-h", "--help", "--hydra-help", "--version", "-sc", "--shell-completion"}
_HANDS_OFF |= {"-cp", "--config-path", "-cn", "--config-name", "-cd", "--config-dir", "--experimental-rerun"}
_PRINT_ONLY = {"-c", "--cfg", "-i", "--info", "-p", "--package", "--resolve"}


def preflight(argv: list[str], cuda_available: bool | None = None) -> None:
    """Raise ConfigError if any job of ``launch.run <argv>`` has a config it cannot run with."""
    found = [name for name in ELASTIC_ENV if name in os.environ]
    if found:
        raise ConfigError(
            "launch.run starts its own workers and cannot run inside an elastic job "
            f"(found {', '.join(found)}); under torchrun/srun use: torchrun ... -m launch.worker <overrides>"
        )
    flags, overrides = split_argv(argv)
    if flags & _HANDS_OFF:
        return
    multirun = bool(flags & {"-m", "--multirun"})
    for job in sweep_points(overrides) if multirun else [overrides]:
        cfg = compose(job)
        if not flags & _PRINT_ONLY:
            validate(cfg, cuda_available=cuda_available, world_size=fixed_world_size(cfg))


def split_argv(argv: list[str]) -> tuple[set[str], list[str]]:
    """(Hydra flags, config overrides) of a launch.run command line."""
    flags = {arg.partition("=")[0] for arg in argv if arg.startswith("-")}
    overrides = [arg for arg in argv if not arg.startswith("-") and ("=" in arg or arg.startswith("~"))]
    return flags, overrides


def starts_jobs(flags: set[str]) -> bool:
    """Whether launch.run with these flags runs jobs (not: prints, or leaves the config to Hydra)."""
    return not flags & (_HANDS_OFF | _PRINT_ONLY)


def sweep_points(overrides: list[str]) -> list[list[str]]:
    """The override list of every job a --multirun would start, as Hydra's basic sweeper expands them.

    Sweeper params from the config (``hydra.sweeper.params``, e.g. set by an experiment) come first and
    command-line overrides of the same key replace them; the cartesian product of all sweeps follows.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException
    from omegaconf import OmegaConf

    parser = OverridesParser.create()
    try:
        first = [_first_value(o) for o in parser.parse_overrides(overrides)]
    except OverrideParseException as e:
        raise ConfigError(one_line(e, overrides)) from None
    params = compose_raw(first, hydra_keys=True).hydra.sweeper.get("params")
    params: dict[str, Any] = OmegaConf.to_container(params, resolve=True) if params else {}
    axes: dict[str, list[str]] = {}
    for override in parser.parse_overrides([*(f"{k}={v}" for k, v in params.items()), *overrides]):
        key = override.get_key_element()
        if override.is_sweep_override():
            axes[key] = [f"{key}={value}" for value in override.sweep_string_iterator()]
        else:
            axes[key] = [override.input_line]
    return [list(point) for point in itertools.product(*axes.values())]


def _first_value(override) -> str:
    if not override.is_sweep_override():
        return override.input_line
    return f"{override.get_key_element()}={next(iter(override.sweep_string_iterator()))}"
