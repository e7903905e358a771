"""``rpc``: the U-Net split across processes over torch.distributed.rpc (TensorPipe).

Three ranks, by ``RANK``: 0 the **master** (data, loss, logging, checkpoints — it holds no
model), 1 the **encoder** worker, 2 the **decoder** worker (decoder and segmentation head).
One training step, inside a distributed-autograd context:

1. the master sends the batch to the encoder (``remote``: it gets back a reference to the
   encoder's skip features, which stay on the encoder);
2. the decoder fetches the skip features straight from the encoder (``RRef.to_here``:
   worker to worker, not through the master), runs, and returns the output image;
3. the master computes 1 − MS-SSIM and runs the distributed backward: gradients flow back
   to the decoder and from the decoder to the encoder over RPC;
4. each shard takes its gradients out of the context and steps its own Adam at the
   learning rate of the run's one schedule (Lightning's, on the master).
   ``DistributedOptimizer`` cannot carry a scheduler and its state cannot be
   checkpointed; per-shard optimizers can.

The master runs the same Lightning loop as single-process ``memtrain fit``
(:mod:`memtrain.distributed.sharded`): this module only supplies the engine behind it.

BatchNorm layers live on their shard and update their statistics there. Train/eval mode,
checkpoints (the shards' states merge into one checkpoint with the plain model's keys
and a single-process optimizer layout) and resume all go through RPC to each shard.

TensorPipe uses TCP by default on CPU (``--rpc-transport tcp``; its shared-memory
transport busy-polls a core per idle process); on CUDA each rank uses GPU ``LOCAL_RANK``
and device maps let tensors travel GPU to GPU.

Memory saved: each GPU holds one shard — its parameters, gradients, optimizer state and
activations — instead of the whole model (the paper measured ~70 % less per GPU).
Time paid: the shards run one after the other (no overlap: that is what ``pipeline``
adds), plus serialising skip features, the output and gradients between processes.
Accuracy risk: none — the same arithmetic as single-process training, in other processes.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.distributed.autograd as dist_autograd
import torch.distributed.rpc as rpc
from torch.distributed.rpc import PyRRef  # (RRef's base: what a reference passed over RPC arrives as)

from memtrain.config import FitConfig, from_plain, to_dict
from memtrain.distributed.heartbeat import Heartbeat
from memtrain.distributed.launch import DistEnv, announce, quiet_distributed_warnings, rank_device, rendezvous_store
from memtrain.distributed.memory import RankRecords, rank_memory
from memtrain.distributed.shard import Shard, on_backward_threads
from memtrain.distributed.sharded import ShardedRunner
from memtrain.distributed.split import DECODER, ENCODER, check_splittable, merge_optimizer_states, merge_state_dicts, split_optimizer_state, split_state_dict
from memtrain.strategies import Environment, Plan

NAME = "rpc"
MASTER = "master"
ROLES = (MASTER, ENCODER, DECODER)
TRANSPORTS = {"auto": ["uv"], "tcp": ["uv"], "shm": ["shm", "uv"]}


class RemoteShard:
    """A :class:`Shard` living on a worker, driven by the master over RPC."""

    def __init__(self, cfg: dict, specs: list[str], part: str) -> None:
        self.cfg = from_plain(cfg)
        env = Environment.detect(self.cfg.train.device)
        device = torch.device("cuda", torch.cuda.current_device()) if env.device == "cuda" else torch.device("cpu")
        self.memory = rank_memory(device, self.cfg.memory.track)
        self.shard = Shard(self.cfg, Plan.resolve(specs, env), part, device, self.memory, NAME)
        self.device = device

    def _inputs(self, inputs) -> tuple[torch.Tensor, ...]:
        # The encoder gets the batch, the decoder a reference to the encoder's features.
        value = inputs.to_here() if isinstance(inputs, PyRRef) else inputs
        tensors = tuple(value) if isinstance(value, (tuple, list)) else (value,)
        tensors = tuple(t.to(self.device) for t in tensors)
        self.memory.track(*tensors)
        return tensors

    def forward(self, inputs, step: int, training: bool):
        shard = self.shard
        if not training:
            with shard.work(), shard.eval_forward():
                return shard.module(*self._inputs(inputs))
        self.memory.start_step(step, shard.module, shard.optimizer)
        self.memory.begin("forward")
        with shard.work():
            xs = self._inputs(inputs)
            with shard.train_forward():
                out = shard.module(*xs)
        # This shard's part of the distributed backward runs on an engine thread, later.
        self.memory.begin("backward")
        on_backward_threads(out if isinstance(out, tuple) else (out,), shard.work)
        return out

    def step(self, context_id: int, lr: float) -> None:
        """Take this shard's gradients out of the distributed-autograd context and step its optimizer at ``lr``."""
        self.memory.begin("optimizer")
        with self.shard.work():
            grads = dist_autograd.get_gradients(context_id)
            for p in self.shard.module.parameters():
                p.grad = grads.get(p)
            self.shard.optimizer_step(lr)
        self.memory.end_step()

    def set_training(self, mode: bool) -> None:
        self.shard.set_training(mode)

    def state(self, part: str) -> dict:
        return self.shard.state(part)

    def load(self, state: dict) -> None:
        self.shard.load(state)

    def n_params(self) -> int:
        return self.shard.n_params()

    def memory_records(self) -> list:
        return list(self.memory.records)


class RPCEngine:
    """The master's handle on the two shards (a :class:`memtrain.distributed.sharded.ShardEngine`).

    One step, as Lightning drives it through :class:`~memtrain.distributed.sharded.ShardOptimizer`:
    :meth:`step_context` opens a distributed-autograd context around Lightning's closure and the
    optimizer step; the closure runs :meth:`forward_loss` (the shards' forwards, the loss here) and
    :meth:`backward`; then :meth:`optimizer_step` has each shard step with the context's gradients.
    """

    label = NAME

    def __init__(self, cfg: FitConfig, plan, device: torch.device, memory) -> None:
        self.device, self.memory = device, memory
        self.step = 0
        self._context_id: int | None = None
        self._features = None  # the encoder's skip features (an RRef), alive until the step ends
        args = (to_dict(cfg), plan.specs)
        self.shards = {part: rpc.remote(part, RemoteShard, args=(*args, part)) for part in (ENCODER, DECODER)}
        # Surface a shard's construction error here, not at the first step.
        self._n_params = {part: rref.rpc_sync().n_params() for part, rref in self.shards.items()}

    def _all(self, method: str, *args) -> list:
        futures = [getattr(rref.rpc_async(), method)(*args) for rref in self.shards.values()]
        return [f.wait() for f in futures]

    def _scatter(self, parts: dict[str, dict]) -> None:
        for f in [rref.rpc_async().load(parts[part]) for part, rref in self.shards.items()]:
            f.wait()

    # -- the step ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def step_context(self):
        with self.memory.counting(), dist_autograd.context() as context_id:
            self._context_id = context_id
            try:
                yield
            finally:
                self._context_id, self._features = None, None

    def forward_loss(self, x: torch.Tensor, y: torch.Tensor, loss_fn) -> torch.Tensor:
        m = self.memory
        m.start_step(self.step, x, y)
        m.begin("forward")
        self._features = self.shards[ENCODER].remote().forward(x, self.step, True)
        out = self.shards[DECODER].rpc_sync().forward(self._features, self.step, True)
        m.track(out)
        return loss_fn(out, y)

    def backward(self, loss: torch.Tensor) -> None:
        self.memory.begin("backward")
        on_backward_threads((loss,), self.memory.counting)
        dist_autograd.backward(self._context_id, [loss])

    def optimizer_step(self, lr: float) -> None:
        self.memory.begin("optimizer")
        self._all("step", self._context_id, lr)
        self._features = None
        self.memory.end_step()

    # -- everything else ----------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        features = self.shards[ENCODER].remote().forward(x, -1, False)
        return self.shards[DECODER].rpc_sync().forward(features, -1, False).float()

    def set_training(self, mode: bool) -> None:
        self._all("set_training", mode)

    def state_dict(self) -> dict:
        return merge_state_dicts(*self._all("state", "module"))

    def load_state_dict(self, state: dict) -> None:
        self._scatter({part: {"module": sd} for part, sd in split_state_dict(state).items()})

    def optimizer_state(self) -> dict:
        return merge_optimizer_states(*self._all("state", "optimizer"))

    def load_optimizer_state(self, state: dict) -> None:
        self._scatter({part: {"optimizer": st} for part, st in split_optimizer_state(state, self._n_params[ENCODER]).items()})

    def memory_records(self) -> list[RankRecords]:
        enc, dec = self._all("memory_records")
        return [RankRecords(0, MASTER, list(self.memory.records)), RankRecords(1, ENCODER, enc), RankRecords(2, DECODER, dec)]

    def close(self) -> None:
        self.shards.clear()


def backend_options(cfg: FitConfig, denv: DistEnv, device: torch.device, store):
    """TensorPipe options: transport, time-out, and GPU device maps between the ranks' GPUs."""
    opts = rpc.TensorPipeRpcBackendOptions(
        num_worker_threads=8,
        rpc_timeout=cfg.dist.rpc_timeout,
        init_method="env://",
        _transports=None if device.type == "cuda" and cfg.dist.rpc_transport == "auto" else TRANSPORTS[cfg.dist.rpc_transport],
    )
    if device.type == "cuda":
        store.set(f"device/{denv.rank}", str(device.index))
        indices = {r: int(store.get(f"device/{r}")) for r in range(denv.world_size)}
        for r, name in enumerate(ROLES):
            if r != denv.rank:
                opts.set_device_map(name, {device.index: indices[r]})
    return opts


class RPCRunner:
    """Starts this process's role of an rpc run: the master trains, the workers serve until it is done."""

    def run(self, cfg: FitConfig, plan, env, *, resume: Path | None) -> Path | None:
        denv = DistEnv.from_environ(NAME, "3 processes (master, encoder, decoder)")
        denv.require_world(NAME, (3,), "3 processes: the master (data, loss, logging), the encoder and the decoder")
        check_splittable(cfg.model.encoder, NAME)
        quiet_distributed_warnings()
        role = ROLES[denv.rank]
        device = rank_device(denv, env.device)
        announce(denv, role, device)
        store = rendezvous_store(denv)
        heartbeat = Heartbeat(store, rank=denv.rank, timeout=cfg.dist.master_timeout, label=f"rank {denv.rank} ({role})").start()
        graceful = False
        try:
            rpc.init_rpc(role, rank=denv.rank, world_size=denv.world_size, rpc_backend_options=backend_options(cfg, denv, device, store))
            if not denv.is_master:
                # Serve the master's calls; returns once every rank has called shutdown.
                with heartbeat.verdict():
                    rpc.shutdown()
                graceful = True
                return None
            try:
                engine = RPCEngine(cfg, plan, device, rank_memory(device, cfg.memory.track))
                run_dir = ShardedRunner(engine, device).run(cfg, plan, env, resume=resume)
                graceful = True
                return run_dir
            finally:
                with contextlib.suppress(Exception):
                    rpc.shutdown(graceful=graceful)
        finally:
            if graceful:
                heartbeat.finish()
            else:  # a failed master just stops beating: the workers notice and exit
                heartbeat.stop()
