"""One shard of the U-Net on this process: its module, optimizer, schedule and the contexts its work runs in."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from memtrain.config import FitConfig
from memtrain.distributed.launch import seed_all
from memtrain.distributed.split import shard_of
from memtrain.loop.optim import build_optimizer
from memtrain.model import build_model


class Shard:
    """The encoder or the decoder (with the head) of the plan-transformed U-Net, and what trains it.

    Every shard builds the whole model with the run's seed — exactly the initialisation a
    single process makes — applies the plan's single-process transforms (momentum, qat,
    checkpoint, ...), keeps its part and drops the rest. Its optimizer is the single-process
    one over its own parameters; the learning rate of every step comes from rank 0, where
    Lightning runs the run's one schedule (:mod:`memtrain.distributed.sharded`).
    """

    def __init__(self, cfg: FitConfig, plan, part: str, device: torch.device, memory, strategy: str) -> None:
        self.cfg, self.plan, self.part, self.device, self.memory = cfg, plan, part, device, memory
        seed_all(cfg.train.seed)
        model = plan.apply(build_model(cfg.model))
        self.module: nn.Module = shard_of(model, part, strategy)
        if any(t.device != device for t in (*self.module.parameters(), *self.module.buffers())):
            self.module.to(device)  # (only when needed: fake-tensor estimates cannot swap their parameters)
        del model
        self.optimizer, _ = build_optimizer(self.module.parameters(), cfg.train)

    # -- contexts -------------------------------------------------------------------
    def work(self) -> contextlib.ExitStack:
        """Thread-local state of every piece of this shard's work: the plan's session and the memory counter.

        Entered on whichever thread runs the work (RPC threads, autograd engine threads).
        """
        stack = contextlib.ExitStack()
        stack.enter_context(self.plan.session())
        stack.enter_context(self.memory.counting())
        return stack

    def train_forward(self) -> contextlib.ExitStack:
        """Around a training forward: autocast and the plan's forward context (as EnhancementModule.training_step)."""
        stack = contextlib.ExitStack()
        stack.enter_context(self.plan.precision().autocast())
        stack.enter_context(self.plan.forward_context())
        return stack

    def eval_forward(self) -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        stack.enter_context(torch.no_grad())
        stack.enter_context(self.plan.precision().autocast())
        return stack

    # -- training -------------------------------------------------------------------
    def optimizer_step(self, lr: float | None = None) -> None:
        """One Adam step (at ``lr`` when given: the schedule's rate rank 0 sends), then the gradients go."""
        if lr is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def set_training(self, mode: bool) -> None:
        self.module.train(mode)

    # -- state ----------------------------------------------------------------------
    def state(self, part: str) -> dict[str, Any]:
        """The ``"module"`` or the ``"optimizer"`` state dict, on the CPU (a checkpoint asks for each once)."""
        if part == "module":
            return {k: v.detach().cpu() for k, v in self.module.state_dict().items()}
        return _to_cpu(self.optimizer.state_dict())

    def load(self, state: dict[str, Any]) -> None:
        """Load ``state``'s ``module`` and/or ``optimizer`` (either may be None)."""
        if state.get("module") is not None:
            self.module.load_state_dict(state["module"])
        if state.get("optimizer") is not None:
            self.optimizer.load_state_dict(state["optimizer"])

    def n_params(self) -> int:
        return sum(1 for _ in self.module.parameters())


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    return obj


def on_backward_threads(roots: Iterable[torch.Tensor], make_context: Callable[[], contextlib.AbstractContextManager]) -> None:
    """Enter ``make_context()`` around every autograd node behind ``roots`` when the backward runs it.

    Thread-local state (dispatch modes: the memory counter, amp's CPU convolution mode)
    does not follow a distributed backward, which runs each process's part of the graph
    on an engine thread. A pre-hook enters the context on that thread just before a node
    runs and its post-hook leaves it right after, so the backward of a shard runs under
    the same modes as its forward. Nodes of one graph task run one after another on one
    thread; the hooks go away with the graph.
    """
    entered: list[contextlib.AbstractContextManager] = []

    def pre(grad_outputs):
        ctx = make_context()
        ctx.__enter__()
        entered.append(ctx)

    def post(grad_inputs, grad_outputs):
        if entered:
            entered.pop().__exit__(None, None, None)

    seen: set = set()
    stack = [t.grad_fn for t in roots if isinstance(t, torch.Tensor) and t.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        node.register_prehook(pre)
        node.register_hook(post)
        stack.extend(n for n, _ in node.next_functions)
