"""offload: saved activations leave the device and come back bit for bit."""

from __future__ import annotations

import copy
import dataclasses
import warnings

import pytest
import torch
from conftest import phantom_batch, warmed_unet
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from memtrain.loss import MSSSIMLoss
from memtrain.memory.estimate import measure_step
from memtrain.strategies import Environment, Plan
from memtrain.strategies.offload import OffloadSavedTensors

CPU = Environment(device="cpu", native_bf16=False)


def _resolve(spec, env=CPU):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Plan.resolve(spec, env)


def _step(model, plan, x, y):
    with plan.session():
        with plan.forward_context():
            out = model(x)
        plan.wrap_loss(MSSSIMLoss())(out, y).backward()
    return [p.grad.clone() for p in model.parameters()]


@pytest.fixture(scope="module")
def warmed():
    return warmed_unet()


def test_offload_is_exact_and_warns_that_cpu_gains_nothing(warmed):
    with pytest.warns(UserWarning, match="offload has no effect on CPU"):
        Plan.resolve("offload", CPU)
    ref = copy.deepcopy(warmed)
    model = copy.deepcopy(ref)
    x, y = phantom_batch(64, n=2)
    g_ref = _step(ref, _resolve("none"), x, y)
    g_off = _step(model, _resolve("offload"), x, y)
    assert sum(g.abs().sum() for g in g_ref) > 0
    assert max((a - b).abs().max().item() for a, b in zip(g_ref, g_off)) == 0
    for (name, a), (_, b) in zip(ref.named_buffers(), model.named_buffers()):
        assert torch.equal(a, b), name


def test_offload_takes_saved_activations_off_the_device():
    """Mechanism, with fake tensors: the host copies are meta tensors, so what is counted is what a GPU would keep."""
    kw = {"size": 128, "encoder": "resnet18", "fake": True}
    base = measure_step("none", **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        off = measure_step("offload", **kw)
        both = measure_step("checkpoint,offload", **kw)
    kept, kept_off, kept_both = (m.peak("forward", "tensor_increase") for m in (base, off, both))
    assert kept_off < 0.35 * kept, kept_off / kept  # what is left: the working set of the op being computed
    assert kept_both < 0.35 * kept
    assert off.peak("backward") <= base.peak("backward")


def test_quant_with_offload_keeps_no_8bit_copy_on_the_device():
    """quant's dedup cache must not keep the device-side 8-bit copies alive once offload has moved them.

    Measured (ResNet18, 256², forward increase): none 84.2 MB, offload 25.0, quant,offload 35.5 (the rest is
    quantization's float32 slice temporaries); 52.7 before the cache held them weakly.
    """
    kw = {"size": 256, "encoder": "resnet18", "fake": True}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base, off, qoff = (measure_step(c, **kw).peak("forward", "tensor_increase") for c in ("none", "offload", "quant,offload"))
    assert qoff <= off + 0.2 * base, (off / base, qoff / base)


class _MetaAllocations(TorchDispatchMode):
    """Counts host copies made under fake tensors (empty_strided on the meta device)."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten.empty_strided.default and str(kwargs.get("device")) == "meta":
            self.shapes.append(tuple(args[0]))
        return func(*args, **kwargs)


def test_offload_copies_each_activation_once_and_no_parameters():
    with FakeTensorMode():
        w1 = torch.nn.Parameter(torch.randn(8, 3, 3, 3))
        w2 = torch.nn.Parameter(torch.randn(8, 3, 3, 3))
        x = torch.randn(1, 3, 16, 16, requires_grad=True)
        count = _MetaAllocations()
        with count, OffloadSavedTensors("cuda"):
            h = torch.nn.functional.relu(x * 2)  # h is saved by both convolutions below and by relu
            out = torch.nn.functional.conv2d(h, w1) + torch.nn.functional.conv2d(h, w2)
        assert count.shapes.count((1, 3, 16, 16)) == 1  # h once, shared by its three saves
        assert (8, 3, 3, 3) not in count.shapes  # parameters stay where their module keeps them
        out.sum().backward()
        assert w1.grad.shape == w1.shape and x.grad.shape == x.shape


@dataclasses.dataclass
class _Packed:
    data: torch.Tensor
    tag: str


@pytest.mark.parametrize("container", ["tuple", "dataclass"])
def test_offload_composes_with_saved_tensor_hooks_already_active(container):
    """Saved-tensor quantization (or any outer pack hook) runs first; offload moves what it packed and hands it back."""
    packed, unpacked = [], []

    def pack(t):
        packed.append(t.shape)
        new = t * 1  # a new tensor: what offload must move
        return ("outer", new) if container == "tuple" else _Packed(new, "outer")

    def unpack(p):
        tag, data = (p[0], p[1]) if container == "tuple" else (p.tag, p.data)
        assert tag == "outer"
        unpacked.append(data.device)
        return data

    with FakeTensorMode():
        w = torch.nn.Parameter(torch.randn(4, 1, 3, 3))
        x = torch.randn(1, 1, 12, 12)
        count = _MetaAllocations()
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack), count, OffloadSavedTensors("cuda"):
            out = torch.nn.functional.conv2d(torch.sigmoid(x * 3), w).square().sum()
        out.backward()
    assert packed and len(unpacked) == len(packed)
    assert all(d.type == "cpu" for d in unpacked)  # back from the host (meta here) to the device of the forward
    assert len(count.shapes) == len(packed)  # each outer-packed tensor went to the host


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: offload moves saved activations from GPU to pinned CPU memory")
def test_offload_on_cuda_lowers_allocated_memory_and_is_exact():
    env = Environment.detect("cuda")
    ref = warmed_unet().cuda()
    model = copy.deepcopy(ref)
    x, y = (t.cuda() for t in phantom_batch(128, n=2))
    results = []
    for m, spec in ((ref, "none"), (model, "offload")):
        plan = Plan.resolve(spec, env)
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        with plan.session():
            with plan.forward_context():
                out = m(x)
            loss = plan.wrap_loss(MSSSIMLoss())(out, y)
            torch.cuda.synchronize()
            kept = torch.cuda.memory_allocated() - start
            loss.backward()
        results.append((kept, [p.grad for p in m.parameters()]))
    (kept_ref, g_ref), (kept_off, g_off) = results
    assert kept_off < 0.3 * kept_ref
    assert max((a - b).abs().max().item() for a, b in zip(g_ref, g_off)) == 0


# -- quant with offload: quantized first, then offloaded ------------------------------------------------
def _quant_step(spec, base, x, y):
    plan = _resolve(spec)
    model = plan.apply(copy.deepcopy(base))
    with plan.session():
        with plan.forward_context():
            out = model(x)
        plan.wrap_loss(MSSSIMLoss())(out, y).backward()
    return model, out, plan


def test_quant_with_offload_trains_as_quant_alone(warmed):
    """Faithfulness: offload hands quant's 8-bit copies back unchanged, so the step is quant's, bit for bit.

    The tolerance is stricter than quant's own tests (cosine ≥ 0.999 against float32): on a CPU offload keeps
    the tensors where they are, but its pack/unpack still wrap quant's (the composition path); bitwise
    equality also holds on a GPU, where the 8-bit copies go to host memory and back unchanged.
    """
    base = warmed
    x, y = phantom_batch(64, n=2)
    ref, out_ref, plan_ref = _quant_step("quant", base, x, y)
    model, out, plan = _quant_step("quant,offload", base, x, y)
    assert [s.spec for s in plan.strategies] == ["quant:int8", "offload"]
    assert torch.equal(out, out_ref)
    grads, grads_ref = ([p.grad for p in m.parameters()] for m in (model, ref))
    assert sum(g.abs().sum() for g in grads_ref) > 0
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_ref))
    for (name, a), (_, b) in zip(model.named_buffers(), ref.named_buffers()):
        assert torch.equal(a, b), name
    # The quantization happened (the rejected pair's claim was that it silently would not).
    q, q_ref = plan.get("quant").quantizer, plan_ref.get("quant").quantizer
    assert q.quantized_bytes == q_ref.quantized_bytes > 0 and q.quantized_bytes < 0.26 * q.original_bytes


class _HostCopies(TorchDispatchMode):
    """Dtype, elements and bytes of every host copy made under fake tensors (empty_strided on the meta device)."""

    def __init__(self):
        super().__init__()
        self.copies: list[tuple[torch.dtype, int, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is torch.ops.aten.empty_strided.default and str(kwargs.get("device")) == "meta":
            self.copies.append((out.dtype, out.numel(), out.numel() * out.element_size()))
        return out


def test_quant_with_offload_moves_the_8bit_copies_to_the_host():
    """Mechanism, fake tensors for a CUDA target: what leaves the device is quant's int8 data (and scales), ¼ of offload's bytes.

    On this CPU the real move cannot be observed (CPU tensors already are in host memory); the fake host copies
    (meta tensors) are what offload would copy to pinned memory on a GPU.
    """
    from conftest import small_unet

    from memtrain.strategies.quant import MIN_NUMEL

    gpu = Environment(device="cuda", native_bf16=True)
    moved = {}
    for spec in ("offload", "quant,offload"):
        plan = Plan.resolve(spec, gpu)
        with FakeTensorMode():
            model = plan.apply(small_unet("resnet18"))
            x, y = torch.rand(2, 1, 128, 128), torch.rand(2, 1, 128, 128)
            count = _HostCopies()
            with count, plan.forward_context():
                out = model(x)
            plan.wrap_loss(MSSSIMLoss())(out, y).backward()  # unpack: back from the host, dequantized
            assert all(p.grad is not None and p.grad.shape == p.shape for p in model.parameters() if p.requires_grad)
        moved[spec] = count.copies
        if spec == "quant,offload":
            q = plan.get("quant").quantizer
            assert q.quantized_bytes > 0
    # Every large floating-point saved tensor went to the host as int8 (max-pool indices, int64, are left as they are).
    big = {dtype for dtype, numel, _ in moved["quant,offload"] if numel >= MIN_NUMEL}
    assert big == {torch.int8, torch.int64}, big
    assert {dtype for dtype, numel, _ in moved["offload"] if numel >= MIN_NUMEL} == {torch.float32, torch.int64}
    host, host_quant = (sum(nbytes for *_, nbytes in moved[s]) for s in ("offload", "quant,offload"))
    assert host_quant < 0.3 * host, host_quant / host
    assert host_quant >= q.quantized_bytes  # the 8-bit copies and their scales, plus the small tensors quant leaves alone
