"""Runners by name: which code executes a `memtrain fit` run, for the runner a plan's placement strategy names.

Strategies only name their runner (:attr:`Strategy.runner_name`); this table maps the name to
the :class:`~memtrain.strategies.base.Runner` implementation. Entries are ``module:attribute``
strings imported when a run needs them: the distributed runners import torch's RPC and
pipelining machinery (and build on this loop package), which a single-process run does not
load.
"""

from __future__ import annotations

import importlib

from memtrain.strategies.base import Runner

SINGLE_PROCESS = "single-process"

RUNNERS: dict[str, str] = {
    SINGLE_PROCESS: "memtrain.loop.fit:LightningRunner",
    "rpc": "memtrain.distributed.rpc:RPCRunner",
    "pipeline": "memtrain.distributed.pipeline:PipelineRunner",
    "ddp": "memtrain.distributed.ddp:DDPRunner",
}


def runner_class(name: str) -> type:
    """The runner class registered under ``name``; KeyError naming the known ones on a miss."""
    if name not in RUNNERS:
        raise KeyError(f"no runner named {name!r} (known: {', '.join(sorted(RUNNERS))})")
    module, _, attr = RUNNERS[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def runner_for(plan) -> Runner:
    """A new runner for ``plan``: the one its placement strategy names, else one Lightning process."""
    return runner_class(plan.runner_name or SINGLE_PROCESS)()
