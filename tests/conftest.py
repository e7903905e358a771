"""Shared test helpers: small real models, real CLI subprocesses, tiny image folders."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

# Torch's intra-op threads follow OMP_NUM_THREADS (the README's command sets it: 1 per xdist worker);
# without it, at most 2, as on the 2-core CI machine.
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or min(2, os.cpu_count() or 1)))


def cli_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "2")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
    """Run `python -m memtrain ARGS` in a fresh process, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "memtrain", *args],
        cwd=cwd or ROOT,
        env=cli_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_user_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit code 2, exactly one line on stderr containing every fragment, no traceback."""
    err = proc.stderr.strip()
    assert proc.returncode == 2, f"exit code {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [ln for ln in err.splitlines() if ln.startswith("memtrain: error:")]
    assert len(errors) == 1, proc.stderr
    for frag in fragments:
        assert frag in errors[0], f"{frag!r} not in {errors[0]!r}"
    return errors[0]


@pytest.fixture
def image_folder(tmp_path: Path):
    """A factory writing n small 16-bit PNG radiographs (phantoms) into a folder."""
    from PIL import Image

    from memtrain.data.phantom import phantom_radiograph

    def make(name: str = "images", n: int = 4, size: int = 96, shape: tuple[int, int] | None = None) -> Path:
        folder = tmp_path / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img = phantom_radiograph(7, i, size)
            if shape is not None:
                img = img[: shape[0], : shape[1]]
            Image.fromarray((img * 65535).astype(np.uint16)).save(folder / f"img{i:02d}.png")
        return folder

    return make


def pydicom_test_file(name: str) -> Path:
    """A DICOM file shipped inside pydicom (never downloaded)."""
    import pydicom

    path = Path(pydicom.__file__).parent / "data" / "test_files" / name
    if not path.exists():
        pytest.skip(f"pydicom does not ship {name} in this version")
    return path


def small_unet(encoder: str = "resnet18", seed: int = 0, *, zero_head: bool = True):
    """The real smp U-Net (random init), small encoder for CPU tests."""
    from memtrain.config import ModelConfig
    from memtrain.model import build_model

    torch.manual_seed(seed)
    return build_model(ModelConfig(encoder=encoder, zero_head=zero_head))


def phantom_batch(size: int = 64, n: int = 2, first: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    from memtrain.data.datasets import PhantomDataset

    ds = PhantomDataset(seed=0, first=first, count=n, size=size)
    xs, ys = zip(*(ds[i] for i in range(n)))
    return torch.stack(xs), torch.stack(ys)


def warmed_unet(encoder: str = "resnet18", seed: int = 0, size: int = 64):
    """A U-Net after one plain SGD step on phantom data, so every parameter has a real gradient.

    At step zero the zero-initialised head blocks gradients to everything before it;
    one step later the whole network is in play, as in real training.
    """
    from memtrain.loss import MSSSIMLoss

    model = small_unet(encoder, seed)
    x, y = phantom_batch(size, first=100)
    MSSSIMLoss()(model(x), y).backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 0.05 * p.grad.sign() * p.abs().mean().clamp_min(1e-3)
                p.grad = None
    return model


@pytest.fixture(scope="session")
def trained_checkpoint(tmp_path_factory) -> Path:
    """A real checkpoint from `memtrain fit` (configs/ci-tiny.yaml, 2 steps), trained once per session.

    ``--no-zero-head`` so the tiny model's output varies with its input (after two steps
    a zero-initialised head still outputs nearly a constant), which is what the
    enhance/export tests compare.
    """
    from memtrain.config import load_yaml
    from memtrain.loop.fit import fit

    cfg = load_yaml(ROOT / "configs" / "ci-tiny.yaml")
    cfg.train.max_steps = 2
    cfg.model.zero_head = False
    cfg.run.samples = 0
    cfg.memory.track = False
    cfg.run.out = str(tmp_path_factory.mktemp("trained") / "run")
    run_dir = fit(cfg)
    return run_dir / "checkpoints" / "best.ckpt"


@pytest.fixture(autouse=True, scope="session")
def _plan_cache(tmp_path_factory):
    """`memtrain plan`'s estimate cache in a temporary folder, never the user's (subprocesses inherit it)."""
    os.environ["MEMTRAIN_CACHE_DIR"] = str(tmp_path_factory.mktemp("memtrain-cache"))
