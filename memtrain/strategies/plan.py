"""A plan: the strategies of one run, validated together and ordered by stage."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch

from memtrain.errors import StrategyError
from memtrain.strategies.base import Environment, Precision, Strategy
from memtrain.strategies.registry import create
from memtrain.strategies.tf32 import fp32_precision

NONE = "none"


class Plan:
    """Resolved strategies in application order. Build it with :meth:`Plan.resolve`."""

    def __init__(self, strategies: list[Strategy], env: Environment) -> None:
        self.env = env
        # Stable sort: strategies of the same stage keep the user's order.
        self.strategies = sorted((s for s in strategies if s.name != NONE), key=lambda s: s.stage)

    @classmethod
    def resolve(cls, specs: Iterable[str] | str, env: Environment | None = None) -> Plan:
        """Parse ``specs`` ('amp,checkpoint' or a list), bind to ``env`` and reject bad combinations up front."""
        env = env or Environment.detect()
        if isinstance(specs, str):
            specs = specs.split(",")
        specs = [s.strip() for s in specs if s.strip()]
        if not specs:
            raise StrategyError("--strategies: expected at least one strategy name (use 'none' for the plain model)")
        strategies = [create(s) for s in specs]
        names = [s.name for s in strategies]
        for name in set(names):
            if names.count(name) > 1:
                given = ", ".join(s.spec for s in strategies if s.name == name)
                raise StrategyError(f"--strategies: '{name}' given more than once ({given}); pick one variant")
        if NONE in names and len(names) > 1:
            raise StrategyError("--strategies: 'none' means the plain model and cannot be combined with other strategies")
        for s in strategies:
            s.bind(env)
        plan = cls(strategies, env)
        for s in plan.strategies:
            s.check(plan)
        return plan

    # -- queries ---------------------------------------------------------------------
    def get(self, name: str) -> Strategy | None:
        return next((s for s in self.strategies if s.name == name), None)

    def __contains__(self, name: str) -> bool:
        return self.get(name) is not None

    @property
    def specs(self) -> list[str]:
        return [s.spec for s in self.strategies] or [NONE]

    @property
    def label(self) -> str:
        return ",".join(self.specs)

    def __repr__(self) -> str:
        return f"Plan({self.label})"

    @property
    def time_cost(self) -> float:
        """Expected step time relative to the plain model: the product of the strategies' ``relative_time()``."""
        cost = 1.0
        for s in self.strategies:
            cost *= s.relative_time()
        return cost

    # -- application -------------------------------------------------------------------
    def apply(self, model: torch.nn.Module) -> torch.nn.Module:
        """Run every model transform in stage order."""
        for s in self.strategies:
            model = s.transform(model)
        return model

    def wrap_loss(self, loss_fn):
        for s in self.strategies:
            loss_fn = s.transform_loss(loss_fn)
        return loss_fn

    def forward_context(self) -> contextlib.ExitStack:
        """Contexts of every strategy around one training forward of the model (not the loss)."""
        stack = contextlib.ExitStack()
        for s in self.strategies:
            stack.enter_context(s.forward_context())
        return stack

    def session(self) -> contextlib.ExitStack:
        """Process-wide settings for the run; restored when the block exits."""
        stack = contextlib.ExitStack()
        # The reference is true IEEE float32: PyTorch lets cuDNN convolutions use TF32 by
        # default, which memtrain turns off unless the `tf32` strategy turns it back on.
        stack.enter_context(fp32_precision("ieee"))
        for s in self.strategies:
            stack.enter_context(s.session())
        return stack

    def precision(self) -> Precision:
        """The step's numeric precision: the one strategy that sets it, else float32 (a no-op :class:`Precision`)."""
        declared = [p for p in (s.precision() for s in self.strategies) if p is not None]
        if len(declared) > 1:
            raise StrategyError(f"--strategies {self.label}: more than one strategy sets the numeric precision")
        return declared[0] if declared else Precision(device=self.env.device)

    @property
    def runner_name(self) -> str | None:
        """The runner the placement strategy names (a key of memtrain.loop.runners.RUNNERS), or None: one process."""
        names = [s.runner_name for s in self.strategies if s.runner_name is not None]
        if len(names) > 1:
            raise StrategyError(f"--strategies {self.label}: more than one strategy decides which processes run the model")
        return names[0] if names else None
