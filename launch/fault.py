"""Recovery drills (``task.fault``): break one rank on purpose during a training run's first attempt.

kill: SIGKILL the worker at the step (the elastic agent must restart the group, which resumes);
eval: switch the rank to eval mode from the step on (its SyncBN layers stop syncing; the other ranks must
fail within ``timeout_s`` instead of hanging).
"""

from __future__ import annotations

import logging
import os
import signal
from typing import Any

import torch

from .runtime import Context


def inject_fault(ctx: Context, fault: dict[str, Any], model: torch.nn.Module, step: int) -> None:
    """Break this rank now if ``fault`` names it and this step, on the first attempt only."""
    if not fault["kind"] or ctx.rank != fault["rank"] or step != fault["step"] or ctx.restart_count > 0:
        return
    ctx.log.warning("fault injection: %s on rank %d at step %d", fault["kind"], ctx.rank, step)
    if fault["kind"] == "kill":
        for handler in logging.getLogger("syncbn.launch").handlers:
            handler.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    elif fault["kind"] == "eval":
        model.eval()
    else:  # the schema admits only the kinds above; a new kind needs its branch here
        raise AssertionError(f"unhandled fault.kind {fault['kind']!r}")
