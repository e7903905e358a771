"""Multi-process strategies (rpc, pipeline, ddp) in real processes on localhost.

Every rank is a real `python -m memtrain fit` process (started with the variables torchrun
sets, or by real `torchrun` invocations), talking over real gloo / TensorPipe on
127.0.0.1, with OMP_NUM_THREADS=1. Where a single-process run computes the same thing
(rpc, pipeline with one microbatch), results are compared with `memtrain fit` through the
CLI; where none does (microbatches = gradient accumulation, ddp replicas), with that
computation written out here, step by step in one process, on the same batches.

The reference runs under a tensor-counting dispatch mode, as the distributed runs do
(memory tracking is on): under any Python dispatch mode PyTorch takes the
subclass-safe formula for ``prod``'s backward (used by MS-SSIM), which differs from the
plain one by float rounding — the comparisons below are exact to ≤ 1e-6 only when both
sides take the same formula.
"""

from __future__ import annotations

import contextlib
import csv
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, cli_env, phantom_batch, run_cli, warmed_unet

from memtrain import config as C
from memtrain.errors import StrategyError

TINY = ["--config", str(ROOT / "configs" / "ci-tiny.yaml")]
TOL = 1e-6
LAUNCH_TIMEOUT = 240  # a hang fails the test instead of blocking CI


# --------------------------------------------------------------------------- helpers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill(procs) -> None:
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
    for p in procs:
        with contextlib.suppress(Exception):
            p.wait(timeout=30)


def start_ranks(world: int, *args: str, logs: Path | None = None) -> list[subprocess.Popen]:
    """`python -m memtrain fit ARGS` as ``world`` ranks with torchrun's variables (static rendezvous on 127.0.0.1).

    Output goes to pipes, or with ``logs`` to ``logs/rank<R>.out`` and ``.err``. Each rank is its own process group."""
    port = free_port()
    procs = []
    try:
        for rank in range(world):
            env = cli_env(
                OMP_NUM_THREADS="1",
                RANK=str(rank),
                LOCAL_RANK=str(rank),
                WORLD_SIZE=str(world),
                LOCAL_WORLD_SIZE=str(world),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
            )
            with contextlib.ExitStack() as files:
                out = err = subprocess.PIPE
                if logs is not None:  # the child keeps its own descriptors; ours close after the start
                    out, err = (files.enter_context((logs / f"rank{rank}.{kind}").open("w")) for kind in ("out", "err"))
                cmd = [sys.executable, "-m", "memtrain", "fit", *args]
                procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=err, text=True, start_new_session=True))
    except BaseException:
        _kill(procs)
        raise
    return procs


def run_ranks(world: int, *args: str, timeout: float = LAUNCH_TIMEOUT) -> list[subprocess.CompletedProcess]:
    """The ranks of :func:`start_ranks`, waited for (killed after ``timeout``)."""
    procs = start_ranks(world, *args)
    try:
        results = []
        deadline = time.time() + timeout
        for p in procs:
            out, err = p.communicate(timeout=max(1.0, deadline - time.time()))
            results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
        return results
    finally:
        _kill(procs)


def assert_ok(results) -> None:
    for rank, r in enumerate(results):
        assert r.returncode == 0, f"rank {rank} exit {r.returncode}\nstdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-3000:]}"


def rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def reference(run_dir: Path, *, microbatches: int = 1, strategies: str = "none") -> dict:
    """Single-process training of the run's configuration on the run's batches, in this process."""
    from memtrain.data.module import build_datasets, epoch_order
    from memtrain.distributed.launch import seed_all
    from memtrain.loop.optim import build_optimizer
    from memtrain.loss import MSSSIMLoss
    from memtrain.memory.tensor import LiveTensorBytes, TensorBytesMode
    from memtrain.model import build_model
    from memtrain.strategies import Environment, Plan

    cfg = C.load_yaml(run_dir / "config.yaml")
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    plan = Plan.resolve(strategies, Environment.detect("cpu"))  # the environment the run's processes detect
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        seed_all(cfg.train.seed)
        model = plan.apply(build_model(cfg.model))
        optimizer, scheduler = build_optimizer(model.parameters(), cfg.train)
        train_set, _ = build_datasets(cfg.data)
        loss_fn = MSSSIMLoss()
        losses, lrs, step = [], [], 0
        with plan.session(), TensorBytesMode(LiveTensorBytes()):
            for epoch in range(int(ckpt["epoch"])):
                order = epoch_order(len(train_set), cfg.train.seed, epoch)
                epoch_losses = []
                for i in range(0, len(order), cfg.train.batch_size):
                    x, y = (torch.stack(t) for t in zip(*(train_set[j] for j in order[i : i + cfg.train.batch_size])))
                    total = 0.0
                    for xm, ym in zip(x.chunk(microbatches), y.chunk(microbatches)):
                        with plan.precision().autocast(), plan.forward_context():
                            out = model(xm)
                        loss = loss_fn(out, ym)
                        (loss / microbatches).backward()
                        total += float(loss.detach()) / microbatches
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    epoch_losses.append(total)
                    step += 1
                losses.append(sum(epoch_losses) / len(epoch_losses))
                lrs.append(optimizer.param_groups[0]["lr"])
                if scheduler is not None:
                    scheduler.step()
    finally:
        torch.set_num_threads(threads)
    return {"losses": losses, "lrs": lrs, "steps": step, "state": model.state_dict(), "optimizer": optimizer.state_dict(), "ckpt": ckpt}


def worst_state_difference(ckpt: dict, state: dict) -> float:
    """Largest |Δ| between a run's checkpointed model state and ``state`` (the plain model's keys)."""
    got = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()}
    assert set(got) == set(state), "checkpoint keys differ from the reference model's"
    return max((got[k].double() - v.double()).abs().max().item() for k, v in state.items())


def assert_same_training(run_dir: Path, ref: dict) -> None:
    ckpt = ref["ckpt"]
    got = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()}
    assert set(got) == set(ref["state"]), "checkpoint keys differ from the plain model's"
    worst = max((got[k].double() - v.double()).abs().max().item() for k, v in ref["state"].items())
    assert worst <= TOL, f"parameters/BatchNorm buffers differ from single-process training by {worst:.3g}"
    bn = [k for k in ref["state"] if k.endswith("running_mean")]
    assert bn and all(
        torch.equal(got[k.replace("running_mean", "num_batches_tracked")], ref["state"][k.replace("running_mean", "num_batches_tracked")]) for k in bn
    )
    opt = ckpt["optimizer_states"][0]
    assert opt["param_groups"][0]["params"] == ref["optimizer"]["param_groups"][0]["params"]
    for i, s in ref["optimizer"]["state"].items():
        for name in ("exp_avg", "exp_avg_sq"):
            assert (opt["state"][i][name] - s[name]).abs().max().item() <= TOL, (i, name)
    metrics = rows(run_dir / "metrics.csv")
    assert [float(r["train_loss"]) for r in metrics] == pytest.approx(ref["losses"], abs=2e-6)
    assert [float(r["lr"]) for r in metrics] == pytest.approx(ref["lrs"], rel=1e-5)
    assert int(ckpt["global_step"]) == ref["steps"]
    # Gradients were alive: the loss moved and stayed below 1 (1 − MS-SSIM is flat at 1).
    assert all(v < 0.999 for v in ref["losses"]) and len(set(ref["losses"])) == len(ref["losses"])


def assert_same_run(plain: Path, placed: Path, *, tol: float = 1e-5) -> None:
    """Two run directories trained the same model: every metrics.csv value but the time, the checkpointed parameters and
    BatchNorm buffers, Adam's state, the schedule and the position, within ``tol`` (relative for metrics)."""
    got, want = rows(placed / "metrics.csv"), rows(plain / "metrics.csv")
    assert [r["epoch"] for r in got] == [r["epoch"] for r in want] and [r["step"] for r in got] == [r["step"] for r in want]
    for g, w in zip(got, want):
        for col in w:
            if col == "epoch_seconds":
                continue
            assert (g[col] == "") == (w[col] == ""), (col, g, w)  # validation ran in the same epochs
            if w[col]:
                assert float(g[col]) == pytest.approx(float(w[col]), rel=tol, abs=1e-6), (col, g, w)
    a, b = (torch.load(d / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True) for d in (plain, placed))
    assert (a["epoch"], a["global_step"]) == (b["epoch"], b["global_step"])
    assert a["state_dict"].keys() == b["state_dict"].keys()
    worst = max((a["state_dict"][k].double() - b["state_dict"][k].double()).abs().max().item() for k in a["state_dict"])
    assert worst <= tol, f"parameters/BatchNorm buffers differ by {worst:.3g}"
    oa, ob = a["optimizer_states"][0], b["optimizer_states"][0]
    assert {k: v for k, v in oa["param_groups"][0].items()} == {k: v for k, v in ob["param_groups"][0].items()}
    assert oa["state"].keys() == ob["state"].keys()
    for i in oa["state"]:
        for name in ("exp_avg", "exp_avg_sq"):
            assert (oa["state"][i][name] - ob["state"][i][name]).abs().max().item() <= tol, (i, name)
    assert a["lr_schedulers"] == b["lr_schedulers"]
    assert sorted(p.name for p in (plain / "samples").glob("*.png")) == sorted(p.name for p in (placed / "samples").glob("*.png"))


def assert_rank_memory(run_dir: Path, roles: list[str]) -> None:
    from memtrain.distributed.memory import summarize_ranks

    summary = summarize_ranks(run_dir, skip_steps=0)
    assert [r.role for r in summary["ranks"]] == roles
    assert all(r.phases.keys() == {"forward", "backward", "optimizer"} for r in summary["ranks"])
    assert summary["max"]["step"] == max(r.step for r in summary["ranks"])
    assert summary["mean"]["step"] == pytest.approx(sum(r.step for r in summary["ranks"]) / len(roles))


# --------------------------------------------------------------------------- in one process


def test_shards_compose_to_the_whole_unet_and_merge_back():
    """Encoder shard then decoder shard = the U-Net (outputs, gradients); states merge into the plain model's layout."""
    from memtrain.distributed.split import merge_optimizer_states, merge_state_dicts, split_optimizer_state, split_state_dict, split_unet
    from memtrain.loss import MSSSIMLoss

    x, y = phantom_batch(64)
    whole, cut = warmed_unet(), warmed_unet()
    out = whole(x)
    MSSSIMLoss()(out, y).backward()
    encoder, decoder = split_unet(cut)
    features = encoder(x)
    received = [f.detach().requires_grad_() for f in features]  # as another process receives them
    out_split = decoder(*received)
    assert torch.equal(out_split, out)
    MSSSIMLoss()(out_split, y).backward()
    assert all(r.grad.is_contiguous() for r in received)  # gloo can send them
    torch.autograd.backward(features, [r.grad for r in received])
    for (name, p), q in zip(whole.named_parameters(), cut.parameters()):
        assert torch.equal(p.grad, q.grad), name
    # States: the shards' state dicts and Adam states are the whole model's.
    opts = [torch.optim.Adam(m.parameters(), lr=1e-3) for m in (whole, encoder, decoder)]
    for o in opts:
        o.step()
    merged = merge_state_dicts(encoder.state_dict(), decoder.state_dict())
    assert list(merged) == list(whole.state_dict())
    assert split_state_dict(merged)["encoder"].keys() == encoder.state_dict().keys()
    state = merge_optimizer_states(opts[1].state_dict(), opts[2].state_dict())
    ref = opts[0].state_dict()
    assert state["param_groups"] == ref["param_groups"] and state["state"].keys() == ref["state"].keys()
    for i in ref["state"]:
        assert torch.equal(state["state"][i]["exp_avg"], ref["state"][i]["exp_avg"])
    back = split_optimizer_state(state, len(list(encoder.parameters())))
    opts[2].load_state_dict(back["decoder"])


def test_gradients_of_concatenated_skips_are_not_contiguous_without_the_fix():
    """The mechanism behind gloo's 'input tensor has to be contiguous' and its fix."""
    from memtrain.distributed.split import ContiguousGrad

    skip = torch.randn(1, 4, 8, 8, requires_grad=True)
    up = torch.randn(1, 4, 8, 8)
    torch.cat([up, skip], dim=1).sum(dim=(0, 2, 3)).mul(torch.arange(8.0)).sum().backward()
    raw = skip.grad
    skip.grad = None
    torch.cat([up, ContiguousGrad.apply(skip)], dim=1).sum(dim=(0, 2, 3)).mul(torch.arange(8.0)).sum().backward()
    assert torch.equal(raw, skip.grad)
    assert skip.grad.is_contiguous()


def test_split_checks_its_input_and_model():
    from memtrain.distributed.split import check_splittable, split_unet

    encoder, _ = split_unet(warmed_unet())
    with pytest.raises(ValueError, match="divisible by 32"):
        encoder(torch.zeros(1, 1, 80, 64))
    with pytest.raises(StrategyError, match=r"supports ResNet encoders .*--encoder efficientnet-b0 is not one"):
        check_splittable("efficientnet-b0", "rpc")
    check_splittable("resnext50_32x4d", "rpc")
    with pytest.raises(StrategyError, match="can only split a U-Net"):
        split_unet(torch.nn.Sequential(torch.nn.Conv2d(1, 1, 3)), "pipeline")


def test_placement_strategies_resolve_exclusively_and_need_torchrun():
    from memtrain.distributed.ddp import DDPRunner
    from memtrain.distributed.launch import DistEnv
    from memtrain.distributed.pipeline import PipelineRunner
    from memtrain.distributed.rpc import RPCRunner
    from memtrain.loop.fit import LightningRunner
    from memtrain.loop.runners import runner_class, runner_for
    from memtrain.strategies import Environment, Plan, registered

    cpu = Environment(device="cpu", native_bf16=False)
    with pytest.raises(StrategyError, match="'rpc' and 'pipeline' both decide"):
        Plan.resolve("rpc,pipeline", cpu)
    with pytest.raises(StrategyError, match="amp:fp16 needs one loss scaler"):
        Plan.resolve("pipeline,amp:fp16", cpu)
    Plan.resolve("ddp,amp:fp16", cpu)  # Lightning's DDP carries the GradScaler
    assert isinstance(runner_for(Plan.resolve("amp,rpc", cpu)), RPCRunner)
    assert isinstance(runner_for(Plan.resolve("pipeline", cpu)), PipelineRunner)
    assert isinstance(runner_for(Plan.resolve("ddp,checkpoint", cpu)), DDPRunner)
    assert type(runner_for(Plan.resolve("amp", cpu))) is LightningRunner
    # Every runner a registered strategy names exists and implements Runner.run.
    named = {cls.runner_name for cls in registered().values()} - {None}
    assert named == {"rpc", "pipeline", "ddp"} and all(callable(runner_class(n).run) for n in named)
    assert [s.name for s in Plan.resolve("rpc,amp", cpu).strategies] == ["amp", "rpc"]  # placement applies last
    with pytest.raises(StrategyError, match=r"started by torchrun \(RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT not set\).*torchrun --nproc-per-node"):
        DistEnv.from_environ("rpc", "3 processes", environ={})
    env = DistEnv.from_environ("rpc", "3 processes", environ={"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"})
    with pytest.raises(StrategyError, match=r"needs 3 processes.*WORLD_SIZE=2"):
        env.require_world("rpc", (3,), "3 processes")


def test_microbatches_must_divide_the_batch():
    from memtrain.errors import ConfigError

    with pytest.raises(ConfigError, match="--microbatches 3: expected a divisor of --batch-size 2"):
        C.from_dict({"train": {"batch_size": 2}, "dist": {"microbatches": 3}}, "x").validate()


def test_fit_with_rpc_outside_torchrun_is_a_one_line_error(tmp_path):
    from memtrain.loop.fit import fit

    cfg = C.load_yaml(ROOT / "configs" / "ci-tiny.yaml")
    cfg.strategies = ["rpc"]
    cfg.run.out = str(tmp_path / "run")
    with pytest.raises(StrategyError, match="torchrun"):
        fit(cfg)
    assert not (tmp_path / "run").exists()


def test_rank_memory_files_summarize_per_rank_mean_and_max(tmp_path):
    from memtrain.distributed.memory import RankRecords, format_rank_table, rank_peaks, summarize_ranks, write_rank_files
    from memtrain.memory.tracker import MIB, PhaseRecord

    def records(scale):
        return [
            PhaseRecord(s, p, {"tensor_peak": int(scale * (s + 1 + i) * MIB), "tensor_increase": 0})
            for s in range(3)
            for i, p in enumerate(("forward", "backward", "optimizer"))
        ]

    write_rank_files(tmp_path, [RankRecords(0, "master", records(1)), RankRecords(1, "encoder", records(10)), RankRecords(2, "decoder", records(4))])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["memory.csv", "memory.rank1.csv", "memory.rank2.csv"]
    assert rows(tmp_path / "memory.rank1.csv")[0]["role"] == "encoder"
    peaks = rank_peaks(tmp_path, skip_steps=1)
    assert [(p.rank, p.role, p.step) for p in peaks] == [(0, "master", 5.0), (1, "encoder", 50.0), (2, "decoder", 20.0)]
    summary = summarize_ranks(tmp_path)
    assert summary["max"] == {"forward": 30.0, "backward": 40.0, "optimizer": 50.0, "step": 50.0}
    assert summary["mean"]["step"] == pytest.approx(25.0)
    assert "encoder" in format_rank_table(summary)


def test_heartbeat_ends_a_worker_when_rank_0_stops_beating():
    """A real TCPStore here, a watching process there: it exits (code 1, one line) once the beats stop."""
    from datetime import timedelta

    from memtrain.distributed.heartbeat import Heartbeat

    store = torch.distributed.TCPStore("127.0.0.1", 0, 2, is_master=True, timeout=timedelta(seconds=30), wait_for_workers=False)
    beat = Heartbeat(store, rank=0, timeout=2.0, interval=0.2).start()
    code = (
        "import sys, time, torch; from datetime import timedelta; from memtrain.distributed.heartbeat import Heartbeat\n"
        f"store = torch.distributed.TCPStore('127.0.0.1', {store.port}, 2, is_master=False, timeout=timedelta(seconds=30))\n"
        "Heartbeat(store, rank=1, timeout=2.0, interval=0.2, label='rank 1 (test)').start()\n"
        "print('watching', flush=True); time.sleep(60)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], cwd=ROOT, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        assert proc.stdout.readline().strip() == "watching"
        time.sleep(4.0)
        assert proc.poll() is None, "the worker exited while rank 0 was beating"
        beat.stop()
        stopped = time.monotonic()
        proc.wait(timeout=20)
        assert proc.returncode == 1 and time.monotonic() - stopped < 10
        assert "rank 1 (test): no heartbeat from rank 0" in proc.stderr.read()
    finally:
        _kill([proc])


def test_heartbeat_stop_and_finish_wait_for_their_threads():
    """After ``stop``/``finish`` no heartbeat thread runs, and rank 0's ``done`` is the store's last word."""
    from datetime import timedelta

    from memtrain.distributed.heartbeat import DONE, KEY, Heartbeat

    def running() -> list[str]:
        return [t.name for t in threading.enumerate() if t.name.startswith("memtrain-heartbeat")]

    store = torch.distributed.TCPStore("127.0.0.1", 0, 1, is_master=True, timeout=timedelta(seconds=30), wait_for_workers=False)
    beat = Heartbeat(store, rank=0, timeout=60.0, interval=1e-4).start()
    watch = Heartbeat(store, rank=1, timeout=60.0, interval=1e-4).start()
    time.sleep(0.3)
    assert sorted(running()) == ["memtrain-heartbeat-beat", "memtrain-heartbeat-poll", "memtrain-heartbeat-watch"]
    watch.stop()
    assert sorted(running()) == ["memtrain-heartbeat-beat"]
    beat.finish()
    assert running() == []
    time.sleep(0.1)
    assert store.get(KEY) == DONE.encode()


def test_a_process_exits_cleanly_when_its_heartbeat_was_inside_a_store_call():
    """The CI failure this guards against: a worker that had trained exited -6 ("terminate called without an active
    exception"): its heartbeat thread was inside a TCPStore call, and the call returned while the interpreter finalized.

    Made to happen every time here: the store's server process is paused (SIGSTOP) while the watcher polls it
    without pause, so a call is in flight when the worker stops its heartbeat; the server resumes while the
    worker's interpreter finalizes (an object's ``__del__`` holds the finalization open for 2 s)."""
    server = subprocess.Popen(
        [sys.executable, "-c", "import time, torch; from datetime import timedelta\n"
         "s = torch.distributed.TCPStore('127.0.0.1', 0, 2, is_master=True, timeout=timedelta(seconds=60), wait_for_workers=False)\n"
         "print(s.port, flush=True); time.sleep(120)\n"],
        cwd=ROOT, env=cli_env(), stdout=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    worker = None
    try:
        port = int(server.stdout.readline())
        code = (
            "import sys, time, torch; from datetime import timedelta; from memtrain.distributed.heartbeat import Heartbeat\n"
            f"store = torch.distributed.TCPStore('127.0.0.1', {port}, 2, is_master=False, timeout=timedelta(seconds=60))\n"
            "class SlowExit:\n    def __del__(self): time.sleep(2.0)\n"
            "slow = SlowExit()  # a module global: deleted while the interpreter finalizes\n"
            "h = Heartbeat(store, rank=1, timeout=60.0, interval=1e-5).start()\n"
            "print('polling', flush=True); sys.stdin.readline(); h.stop()\n"
        )
        worker = subprocess.Popen(
            [sys.executable, "-c", code], cwd=ROOT, env=cli_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, start_new_session=True,
        )  # fmt: skip
        assert worker.stdout.readline().strip() == "polling"
        server.send_signal(signal.SIGSTOP)
        time.sleep(0.3)  # the poll thread now waits in a store call
        worker.stdin.write("\n")
        worker.stdin.flush()
        time.sleep(1.0)  # before: the worker is finalizing by now; after: its stop() is waiting for the thread
        server.send_signal(signal.SIGCONT)
        _, err = worker.communicate(timeout=60)
        assert worker.returncode == 0, f"exit {worker.returncode}: {err[-2000:]}"
    finally:
        server.send_signal(signal.SIGCONT)
        _kill([p for p in (server, worker) if p is not None])


# --------------------------------------------------------------------------- real processes

SMALL_RUN = [*TINY, "--train-images", "2", "--val-images", "1", "--lr", "1e-4", "--samples", "1"]


def encoder_forward_increase(strategies: str, size: int = 64, batch: int = 2) -> float:
    """MiB the encoder shard's training forward adds (what it keeps for its backward), in this process."""
    from memtrain.distributed.split import shard_of
    from memtrain.memory.tensor import LiveTensorBytes, TensorBytesMode, module_tensors
    from memtrain.model import build_model
    from memtrain.strategies import Environment, Plan

    cfg = C.load_yaml(ROOT / "configs" / "ci-tiny.yaml")
    plan = Plan.resolve(strategies, Environment(device="cpu", native_bf16=False))
    encoder = shard_of(plan.apply(build_model(cfg.model)), "encoder")
    counter = LiveTensorBytes()
    counter.track_all(module_tensors(encoder))
    start = counter.current
    x = torch.zeros(batch, 1, size, size)
    with plan.session(), TensorBytesMode(counter):
        counter.track_all([x])
        with plan.precision().autocast(), plan.forward_context():
            features = encoder(x)
    del features
    return (counter.peak - start) / 2**20


#: The end-to-end equality runs: 2 epochs of 2 steps with a step schedule; --max-steps 3 stops in the second epoch.
SAME_SEED = [*TINY, "--train-images", "4", "--val-images", "1", "--epochs", "2", "--max-steps", "3", "--seed", "7", "--samples", "1"]
SAME_SEED += ["--scheduler", "step", "--step-size", "1", "--gamma", "0.5"]


@pytest.fixture(scope="module")
def plain_fit(tmp_path_factory) -> Path:
    """`memtrain fit SAME_SEED` in one process, through the CLI."""
    out = tmp_path_factory.mktemp("plain") / "run"
    r = run_cli("fit", *SAME_SEED, "--out", str(out), OMP_NUM_THREADS="1")
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("placement, world", [("rpc", 3), ("pipeline", 2)])
def test_torchrun_placement_trains_the_model_plain_memtrain_fit_trains(tmp_path, plain_fit, placement, world):
    """Same seed, same model, through the CLI on both sides: `torchrun --nproc-per-node N -m memtrain fit ARGS
    --strategies rpc|pipeline` (one microbatch) and `memtrain fit ARGS` give the same metrics.csv (per-epoch losses,
    validation metrics, lr), parameters, BatchNorm buffers, Adam state and schedule, float32, within 1e-5; --max-steps
    stops both in the same place, and neither validates the epoch it cut short."""
    out = tmp_path / placement
    log = tmp_path / "torchrun.log"
    proc = _torchrun("--standalone", "--nproc-per-node", str(world), "-m", "memtrain", "fit", *SAME_SEED, "--strategies", placement, "--out", str(out), log=log)
    try:
        _wait([proc], LAUNCH_TIMEOUT)
    finally:
        _kill([proc])
    assert proc.returncode == 0, log.read_text()[-4000:]
    assert_same_run(plain_fit, out)
    metrics = rows(out / "metrics.csv")
    assert [(r["epoch"], r["step"], bool(r["val_loss"])) for r in metrics] == [("0", "2", True), ("1", "3", False)]
    assert len({r["train_loss"] for r in metrics}) == 2 and all(float(r["train_loss"]) < 0.999 for r in metrics)  # gradients were alive


def ddp_reference(run_dir: Path, strategies: str = "none", replicas: int = 2) -> dict:
    """What DDP computes, in this process: ``replicas`` copies of the run's model, each on its DistributedSampler
    share of every step (batch --batch-size), gradients averaged, one Adam step; before every forward the replicas
    take rank 0's parameters and buffers (DDP broadcasts rank 0's BatchNorm buffers). Rank 0's final state."""
    from torch.utils.data import DistributedSampler

    from memtrain.data.module import build_datasets
    from memtrain.distributed.launch import seed_all
    from memtrain.loop.optim import build_optimizer
    from memtrain.loss import MSSSIMLoss
    from memtrain.memory.tensor import LiveTensorBytes, TensorBytesMode
    from memtrain.model import build_model
    from memtrain.strategies import Environment, Plan

    cfg = C.load_yaml(run_dir / "config.yaml")
    plan = Plan.resolve(strategies, Environment.detect("cpu"))  # the environment the run's processes detect
    train_set, _ = build_datasets(cfg.data)
    orders = []
    for rank in range(replicas):
        sampler = DistributedSampler(train_set, num_replicas=replicas, rank=rank, shuffle=True, seed=cfg.train.seed)
        sampler.set_epoch(0)
        orders.append(list(sampler))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        seed_all(cfg.train.seed)
        models = [plan.apply(build_model(cfg.model)) for _ in range(replicas)]
        optimizer, _ = build_optimizer(models[0].parameters(), cfg.train)
        loss_fn = plan.wrap_loss(MSSSIMLoss())
        losses = []
        with plan.session(), TensorBytesMode(LiveTensorBytes()):
            for step in range(len(orders[0])):
                for rank, model in enumerate(models):
                    if rank:
                        model.load_state_dict(models[0].state_dict())  # DDP: same parameters, rank 0's buffers
                    x, y = (t[None] for t in train_set[orders[rank][step]])
                    with plan.precision().autocast():  # Lightning's precision plugin wraps the whole training_step
                        with plan.forward_context():
                            out = model(x)
                        loss = loss_fn(out, y)
                    loss.backward()
                    losses.append(float(loss.detach()))
                for p, *qs in zip(*(m.parameters() for m in models)):
                    p.grad = (p.grad + sum(q.grad for q in qs)) / replicas
                    for q in qs:
                        q.grad = None
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
    finally:
        torch.set_num_threads(threads)
    return {"state": models[0].state_dict(), "steps": len(orders[0]), "losses": losses}


@pytest.mark.slow
def test_ddp_replicas_average_gradients_and_rank_0_writes(tmp_path):
    """ddp: 2 replicas × batch 1 = one step over both images with averaged gradients; rank 0's BatchNorm statistics."""
    out = tmp_path / "ddp"
    results = run_ranks(2, *TINY, "--strategies", "ddp", "--batch-size", "1", "--lr", "1e-4", "--val-images", "1", "--out", str(out))
    assert_ok(results)
    assert "2 replicas × --batch-size 1 = 2 images per step" in results[0].stdout
    ref = ddp_reference(out)
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    worst = worst_state_difference(ckpt, ref["state"])
    assert worst <= TOL, worst
    assert ckpt["global_step"] == ref["steps"] == 2
    assert_rank_memory(out, ["replica", "replica"])
    assert [r["epoch"] for r in rows(out / "metrics.csv")] == ["0"]


@pytest.mark.slow
def test_ddp_with_amp_checkpoint_quant_momentum_trains_like_its_replicas_in_one_process(tmp_path):
    """ddp,amp,checkpoint,quant,momentum (2 replicas × batch 1): every replica runs the whole single-process plan, DDP
    averages their gradients — the checkpoint equals the same plan's replicas stepped in one process (parameters,
    BatchNorm buffers within 1e-6). Not compared with one process at batch 2: BatchNorm normalises per replica.
    The comparison can tell: the same run without quant's 8-bit saved activations is measurably different."""
    out = tmp_path / "ddp-all"
    plan = "amp,checkpoint,quant,momentum"
    results = run_ranks(2, *TINY, "--strategies", f"ddp,{plan}", "--batch-size", "1", "--lr", "1e-3", "--val-images", "1", "--out", str(out))
    assert_ok(results)
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    ref = ddp_reference(out, plan)
    worst = worst_state_difference(ckpt, ref["state"])  # momentum's keys: the run applied MomentumNet
    assert worst <= TOL, worst
    assert ckpt["global_step"] == ref["steps"] == 2
    bn = [k for k in ref["state"] if k.endswith("num_batches_tracked")]
    assert bn and all(int(ckpt["state_dict"][f"model.{k}"]) == 2 for k in bn)  # checkpoint's and momentum's recomputes replay BatchNorm
    train_loss = float(rows(out / "metrics.csv")[0]["train_loss"])
    assert train_loss == pytest.approx(sum(ref["losses"]) / len(ref["losses"]), abs=1e-5) and train_loss < 0.999
    assert worst_state_difference(ckpt, ddp_reference(out, "amp,checkpoint,momentum")["state"]) > 10 * TOL


@pytest.mark.slow
def test_pipeline_gpipe_two_microbatches_with_momentum_and_quant_equals_gradient_accumulation(tmp_path):
    """pipeline,momentum,quant under GPipe with 2 microbatches (both forwards in flight before either backward): each
    stage runs MomentumNet and 8-bit saved activations on its own shard; equals one process accumulating the same plan's
    gradients over the 2 microbatches (loss, parameters, BatchNorm buffers, Adam state within 1e-6)."""
    out = tmp_path / "gpipe"
    args = [*SMALL_RUN, "--strategies", "pipeline,momentum,quant", "--microbatches", "2", "--pipeline-schedule", "gpipe", "--epochs", "2", "--out", str(out)]
    assert_ok(run_ranks(2, *args))
    ref = reference(out, microbatches=2, strategies="momentum,quant")
    assert_same_training(out, ref)
    assert worst_state_difference(ref["ckpt"], reference(out, microbatches=2, strategies="momentum")["state"]) > 10 * TOL  # quant ran on the shards


@pytest.mark.slow
def test_rpc_with_momentum_and_quant_trains_exactly_like_one_process(tmp_path):
    """rpc,momentum,quant: the encoder shard runs invertible MomentumNet stages and both shards keep 8-bit saved
    activations; equals `memtrain fit --strategies momentum,quant` (through the CLI, within 1e-5)."""
    out = tmp_path / "rpc-mq"
    assert_ok(run_ranks(3, *SMALL_RUN, "--strategies", "rpc,momentum,quant", "--epochs", "2", "--out", str(out)))
    plain = run_cli("fit", *SMALL_RUN, "--strategies", "momentum,quant", "--epochs", "2", "--out", str(tmp_path / "plain"), OMP_NUM_THREADS="1")
    assert plain.returncode == 0, plain.stderr[-3000:]
    assert_same_run(tmp_path / "plain", out)
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert worst_state_difference(ckpt, reference(out, strategies="momentum")["state"]) > 10 * TOL  # quant ran on the shards
    # The one-process fake-tensor estimate of every rank's step (benchmarks/distributed.py --shards) is what the ranks recorded.
    from memtrain.distributed.estimate import measure_shard_steps

    estimate = measure_shard_steps("rpc,momentum,quant", size=64, batch_size=2, encoder="resnet18")
    for rr in estimate:
        recorded = {
            r["phase"]: float(r["tensor_peak_mib"]) for r in rows(out / ("memory.csv" if rr.rank == 0 else f"memory.rank{rr.rank}.csv")) if r["step"] == "1"
        }
        estimated = {r.phase: r.metrics["tensor_peak"] / 2**20 for r in rr.records if r.step == 1}
        assert recorded.keys() == estimated.keys() == {"forward", "backward", "optimizer"}
        for phase, mib in recorded.items():
            assert estimated[phase] == pytest.approx(mib, rel=0.03, abs=0.2), (rr.role, phase, estimated, recorded)


@pytest.mark.slow
def test_pipeline_rank_1_exits_with_one_line_when_rank_0_dies(tmp_path):
    """Kill rank 0 of a pipeline run mid-training: rank 1, waiting in a gloo collective, gets gloo's error at once and
    holds it until the heartbeat decides — exit code 1 and one line on stderr, no Python traceback, no C++ stack."""
    out = tmp_path / "pipe-death"
    args = [*SMALL_RUN, "--strategies", "pipeline", "--epochs", "100", "--master-timeout", "2", "--out", str(out)]
    procs = start_ranks(2, *args, logs=tmp_path)
    try:
        deadline = time.time() + LAUNCH_TIMEOUT
        while time.time() < deadline and all(p.poll() is None for p in procs) and not (out / "checkpoints" / "last.ckpt").exists():
            time.sleep(0.2)
        assert all(p.poll() is None for p in procs), (tmp_path / "rank0.err").read_text()[-3000:] + (tmp_path / "rank1.err").read_text()[-3000:]
        os.killpg(procs[0].pid, signal.SIGKILL)
        killed = time.monotonic()
        procs[1].wait(timeout=60)
        waited = time.monotonic() - killed
    finally:
        _kill(procs)
    err = (tmp_path / "rank1.err").read_text()
    assert procs[1].returncode == 1, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and re.fullmatch(
        r"memtrain: error: rank 1 \(decoder stage\): no heartbeat from rank 0 for \d+ s \(it died or hangs\); exiting", lines[0]
    ), err
    assert waited < 20


def _torchrun(*args: str, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=cli_env(OMP_NUM_THREADS="1"), stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def _wait(procs, timeout: float) -> None:
    deadline = time.time() + timeout
    for p in procs:
        p.wait(timeout=max(1.0, deadline - time.time()))


@pytest.mark.slow
def test_pipeline_microbatches_on_two_torchrun_nodes_equal_gradient_accumulation(tmp_path):
    """Two torchrun invocations as two nodes (c10d rendezvous on 127.0.0.1): 2 microbatches under 1F1B = accumulation over them."""
    out = tmp_path / "pipe2"
    endpoint = f"127.0.0.1:{free_port()}"
    args = ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "pipe2", "-m", "memtrain", "fit"]
    fit_args = [*SMALL_RUN, "--strategies", "pipeline", "--microbatches", "2", "--pipeline-schedule", "1f1b", "--epochs", "2", "--out", str(out)]
    logs = [tmp_path / f"node{i}.log" for i in range(2)]
    procs = [_torchrun(*args, *fit_args, log=logs[i]) for i in range(2)]
    try:
        _wait(procs, LAUNCH_TIMEOUT)
    finally:
        _kill(procs)
    text = "".join(p.read_text() for p in logs)
    assert all(p.returncode == 0 for p in procs), text[-4000:]
    assert "(encoder stage)" in text and "(decoder stage)" in text
    assert_same_training(out, reference(out, microbatches=2))


@pytest.mark.slow
def test_rpc_amp_checkpoint_trains_like_one_process_survives_master_death_and_resumes(tmp_path):
    """rpc,amp,checkpoint on two torchrun 'nodes' (1 + 2 processes, c10d on 127.0.0.1): kill the master → every
    process exits within 60 s; resume with one torchrun → the finished run equals uninterrupted
    `memtrain fit --strategies amp,checkpoint` (metrics, parameters, BatchNorm buffers, Adam state, StepLR per epoch),
    and the encoder shard kept what a checkpointed encoder keeps."""
    from memtrain.distributed.memory import rank_peaks

    out = tmp_path / "rpc"
    endpoint = f"127.0.0.1:{free_port()}"
    fit_args = [*TINY, "--strategies", "rpc,amp,checkpoint", "--train-images", "8", "--val-images", "1", "--lr", "1e-4", "--epochs", "2", "--samples", "1"]
    fit_args += ["--scheduler", "step", "--step-size", "1", "--gamma", "0.5", "--checkpoint-every-steps", "1", "--master-timeout", "5", "--out", str(out)]
    common = ["--nnodes", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "rpcamp", "-m", "memtrain", "fit", *fit_args]
    logs = [tmp_path / "nodeA.log", tmp_path / "nodeB.log"]
    procs = [_torchrun("--nproc-per-node", "1", *common, log=logs[0]), _torchrun("--nproc-per-node", "2", *common, log=logs[1])]
    try:
        deadline = time.time() + LAUNCH_TIMEOUT
        master_pid = None
        while time.time() < deadline and all(p.poll() is None for p in procs):
            found = re.search(r"rank 0/3 \(master\) pid (\d+)", "".join(p.read_text() for p in logs))
            master_pid = int(found.group(1)) if found else None
            ckpt = out / "checkpoints" / "last.ckpt"
            if master_pid and ckpt.exists() and torch.load(ckpt, weights_only=True)["global_step"] >= 2:
                break
            time.sleep(0.5)
        text = "".join(p.read_text() for p in logs)
        assert master_pid and all(p.poll() is None for p in procs), text[-4000:]
        assert "rank 1/3 (encoder)" in text and "rank 2/3 (decoder)" in text
        os.kill(master_pid, signal.SIGKILL)
        killed = time.monotonic()
        _wait(procs, 60)
        assert time.monotonic() - killed < 60
        assert all(p.returncode != 0 for p in procs)
    finally:
        _kill(procs)
    done = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert 2 <= done < 8
    log = tmp_path / "resume.log"
    resume = _torchrun("--standalone", "--nproc-per-node", "3", "-m", "memtrain", "fit", "--resume", str(out), log=log)
    try:
        _wait([resume], LAUNCH_TIMEOUT)
    finally:
        _kill([resume])
    assert resume.returncode == 0, log.read_text()[-4000:]
    assert f"at step {done}" in log.read_text()
    swap = {"rpc,amp,checkpoint": "amp,checkpoint", str(out): str(tmp_path / "plain")}  # the same run in one process, uninterrupted
    plain = run_cli("fit", *[swap.get(a, a) for a in fit_args], OMP_NUM_THREADS="1")
    assert plain.returncode == 0, plain.stderr[-3000:]
    assert_same_run(tmp_path / "plain", out)
    metrics = rows(out / "metrics.csv")
    assert [float(r["lr"]) for r in metrics] == pytest.approx([1e-4, 5e-5]) and metrics[-1]["step"] == "8"
    assert_rank_memory(out, ["master", "encoder", "decoder"])
    mem = rows(out / "memory.rank1.csv")
    assert sorted({int(r["step"]) for r in mem}) == list(range(8))  # rows kept across the resume
    assert all(r["val_loss"] and r["identity_psnr"] for r in rows(out / "metrics.csv"))  # validation ran in eval mode through RPC
    assert (out / "samples" / "epoch_1.png").exists() and (out / "checkpoints" / "best.ckpt").exists()
    # The shards hold the model; the master holds a batch and the output.
    peaks = {r.role: r.step for r in rank_peaks(out)}
    assert peaks["master"] < 0.05 * peaks["encoder"]
    # Checkpointing ran on the encoder shard: its forward kept what a checkpointed encoder keeps, well under a plain one's.
    forward = [float(r["tensor_increase_mib"]) for r in mem if r["phase"] == "forward"]
    plain, checkpointed = encoder_forward_increase("amp"), encoder_forward_increase("amp,checkpoint")
    # (Under amp both also hold autocast's 16-bit copies of the weights, which checkpointing does not touch.)
    assert checkpointed < plain - 0.5
    assert abs(max(forward) - checkpointed) < 0.25 * (plain - checkpointed), (forward, checkpointed, plain)
