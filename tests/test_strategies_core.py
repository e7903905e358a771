"""Strategy registry and plans, and the precision strategies (amp, tf32)."""

from __future__ import annotations

import ast
import re
import warnings
from pathlib import Path

import pytest
import torch
from conftest import phantom_batch, warmed_unet

from memtrain.errors import StrategyError
from memtrain.loss import MSSSIMLoss
from memtrain.strategies import Environment, Plan, Stage, Strategy, available, create, register
from memtrain.strategies.registry import _REGISTRY

CPU = Environment(device="cpu", native_bf16=False)


def test_registry_rejects_duplicates_and_lists_available_on_a_miss():
    class Twin(Strategy):
        name = "amp"
        stage = Stage.PRECISION
        summary = "a second amp"

    with pytest.raises(ValueError, match="already registered"):
        register(Twin)
    assert _REGISTRY["amp"] is not Twin
    with pytest.raises(StrategyError, match=r"unknown strategy 'turbo' \(available: .*amp.*none.*tf32"):
        create("turbo")
    with pytest.raises(StrategyError, match=r"available: amp:auto, amp:bf16, amp:fp16"):
        create("amp:int4")
    with pytest.raises(StrategyError, match="takes no ':variant'"):
        create("tf32:fast")
    assert {"none", "amp", "tf32"} <= set(available())


def test_plan_rejects_bad_combinations_up_front():
    with pytest.raises(StrategyError, match="'amp' given more than once"):
        Plan.resolve("amp,amp:bf16", CPU)
    with pytest.raises(StrategyError, match="'none' means the plain model"):
        Plan.resolve("none,amp", CPU)
    with pytest.raises(StrategyError, match="at least one"):
        Plan.resolve(" , ", CPU)


def test_plan_orders_by_stage_and_resolves_amp():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = Plan.resolve("tf32,amp", CPU)
    assert [s.stage for s in plan.strategies] == sorted(s.stage for s in plan.strategies)
    assert plan.get("amp").spec == "amp:bf16"  # CPU autocast is bf16
    assert Plan.resolve("amp", Environment(device="cuda", native_bf16=False)).get("amp").spec == "amp:fp16"
    assert Plan.resolve("amp", Environment(device="cuda", native_bf16=True)).get("amp").spec == "amp:bf16"
    with pytest.raises(StrategyError, match="no native bf16"):
        Plan.resolve("amp:bf16", Environment(device="cuda", native_bf16=False))
    assert Plan.resolve("none", CPU).specs == ["none"]


def test_disabled_strategies_are_no_op_objects():
    plan = Plan.resolve("none", CPU)
    model = torch.nn.Conv2d(1, 1, 3)
    assert plan.apply(model) is model
    precision = plan.precision()
    assert precision.dtype is None and precision.grad_scaler() is None and precision.name == "fp32"
    with precision.autocast():
        assert not torch.is_autocast_enabled("cpu")
    with plan.forward_context(), plan.session():
        pass


def test_amp_fp16_has_a_grad_scaler_and_bf16_has_none():
    """The declared precision, and the Lightning plugin the loop makes of it."""
    from memtrain.loop.precision import lightning_plugins

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fp16 = Plan.resolve("amp:fp16", CPU).precision()
        bf16 = Plan.resolve("amp:bf16", CPU).precision()
    assert (fp16.dtype, fp16.loss_scaling, bf16.dtype, bf16.loss_scaling) == (torch.float16, True, torch.bfloat16, False)
    assert isinstance(fp16.grad_scaler(), torch.amp.GradScaler) and bf16.grad_scaler() is None
    [p16], [pbf16] = lightning_plugins(fp16), lightning_plugins(bf16)
    assert p16.precision == "16-mixed" and isinstance(p16.scaler, torch.amp.GradScaler)
    assert pbf16.precision == "bf16-mixed" and pbf16.scaler is None
    assert lightning_plugins(Plan.resolve("none", CPU).precision()) == []
    with bf16.autocast(), pbf16.forward_context():  # the same autocast inside and outside Lightning
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16 and not torch.is_autocast_cache_enabled()


def test_tf32_session_sets_and_restores_precision():
    conv = torch.backends.cudnn.conv
    before = conv.fp32_precision
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tf32 = Plan.resolve("tf32", CPU)
    with tf32.session():
        assert conv.fp32_precision == "tf32"
    with Plan.resolve("none", CPU).session():
        assert conv.fp32_precision == "ieee"  # the reference is true float32
    assert conv.fp32_precision == before


def _saved_bytes(model, x, ctx):
    total = 0

    def pack(t):
        nonlocal total
        total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), ctx:
        out = model(x)
    return out, total


def test_amp_bf16_matches_fp32_and_saves_half_the_activations():
    """Faithfulness (cosine ≥ 0.99, BN buffers within bf16 tolerance) and mechanism (saved bytes)."""
    x, y = phantom_batch(64)
    ref = warmed_unet()
    amp = warmed_unet()
    out32, saved32 = _saved_bytes(ref, x, torch.autocast("cpu", enabled=False))
    MSSSIMLoss()(out32, y).backward()
    plan = Plan.resolve("amp", CPU)
    with plan.session():  # on this CPU: 16-bit convs computed by float32 kernels
        out16, saved16 = _saved_bytes(amp, x, plan.precision().autocast())
        assert out16.dtype == torch.bfloat16
        MSSSIMLoss()(out16, y).backward()
    # Mechanism: what autograd keeps for backward is mostly 16-bit.
    assert saved16 < 0.6 * saved32, (saved16, saved32)
    # Faithfulness: gradients point the same way, parameter by parameter group.
    g32 = torch.cat([p.grad.flatten() for p in ref.parameters()])
    g16 = torch.cat([p.grad.float().flatten() for p in amp.parameters()])
    assert g32.abs().sum() > 0 and (g16 != 0).float().mean() > 0.5
    assert torch.nn.functional.cosine_similarity(g32, g16, dim=0) > 0.99
    for (name, b32), (_, b16) in zip(ref.named_buffers(), amp.named_buffers()):
        if b32.dtype.is_floating_point:
            assert torch.allclose(b32, b16.float(), rtol=0.05, atol=0.02), name
        else:
            assert torch.equal(b32, b16), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_16_bit_convolution_on_float32_kernels_equals_native(dtype):
    from memtrain.strategies.amp import LowPrecisionConvOnFloat32

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(8, 16, 3, padding=1)
    x = torch.randn(2, 8, 24, 24)
    results = []
    for emulate in (False, True):
        conv.zero_grad()
        xi = x.clone().requires_grad_(True)
        ctx = LowPrecisionConvOnFloat32() if emulate else torch.autocast("cpu", enabled=False)
        with ctx:
            with torch.autocast("cpu", dtype=dtype):
                out = conv(xi)
            (out.float() ** 2).sum().backward()
        results.append((out, xi.grad, conv.weight.grad.clone(), conv.bias.grad.clone()))
    (o_n, gx_n, gw_n, gb_n), (o_e, gx_e, gw_e, gb_e) = results
    assert o_e.dtype == o_n.dtype == dtype and gx_e.dtype == gx_n.dtype == torch.float32
    eps = torch.finfo(dtype).eps
    for native, emulated in ((o_n, o_e), (gx_n, gx_e), (gw_n, gw_e), (gb_n, gb_e)):
        # Both accumulate in float32 from the same 16-bit inputs: they differ by output rounding only.
        scale = native.float().abs().max()
        assert (native.float() - emulated.float()).abs().max() <= 4 * eps * scale


def test_strategies_listing_shows_the_time_costs_the_planner_uses():
    """`memtrain strategies` and the planner read one declared time cost, per variant and per device (checkpoint: x1.44, not x1.00)."""
    import re

    from conftest import run_cli

    from memtrain.strategies import registered

    proc = run_cli("strategies")
    assert proc.returncode == 0, proc.stderr
    listed = {m[1]: m[2] for m in re.finditer(r"^  (\S+)\s+\[[a-z]+; time ([^\]]+)\]", proc.stdout, re.M)}
    assert set(listed) == set(registered())
    for name, cls in registered().items():
        for variant in cls.variants or (None,):
            spec = f"{name}:{variant}" if variant else name
            planned = {}
            for device in ("cuda", "cpu"):
                env = Environment(device=device, native_bf16=True)
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")  # offload/tf32: no effect on CPU
                        planned[device] = Plan.resolve(spec, env).time_cost  # what `memtrain plan` orders by
                except StrategyError:  # a spec this environment rejects has no planned cost: use the bound strategy's
                    s = create(spec)
                    s.bind(env)
                    planned[device] = s.relative_time()
            shown = f"x{planned['cuda']:.2f} GPU, x{planned['cpu']:.2f} CPU"
            per_variant = ";" in listed[name]
            assert (f"{spec} {shown}" if per_variant else shown) in listed[name], (spec, planned, listed[name])
    assert Plan.resolve("checkpoint", CPU).time_cost == 1.44 and "checkpoint:blocks x1.44 GPU, x1.44 CPU" in listed["checkpoint"]


# -- the import boundary: strategies declare, the layers above run ----------------------------------------
PACKAGE = Path(__file__).resolve().parents[1] / "memtrain"
FORBIDDEN = ("memtrain.loop", "memtrain.distributed", "memtrain.cli", "lightning", "lightning_fabric", "pytorch_lightning")


def _forbidden_imports(source: str, package: str = "memtrain.strategies") -> list[str]:
    """Every import of a FORBIDDEN module in ``source``: module level or in functions, absolute, relative or through importlib."""

    def resolve(module: str | None, level: int) -> str:
        if not level:
            return module or ""
        base = package.split(".")[: len(package.split(".")) - level + 1]
        return ".".join([*base, *([module] if module else [])])

    found = []
    for node in ast.walk(ast.parse(source)):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = resolve(node.module, node.level)
            names = [module] + [f"{module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if called in ("import_module", "__import__"):
                names = [node.args[0].value]
        for name in names:
            if any(name == f or name.startswith(f + ".") for f in FORBIDDEN):
                found.append(f"line {node.lineno}: {name}")
                break
    return found


def test_the_import_scan_finds_every_kind_of_import():
    source = """
import lightning as L
from memtrain.loop.fit import LightningRunner
def f():
    from memtrain.distributed import rpc
    from memtrain import cli
    from ..loop import module
    import importlib
    importlib.import_module("lightning.pytorch")
from memtrain.strategies.base import Strategy
import memtrain.loss
"""
    found = _forbidden_imports(source)
    assert [f.split(": ")[1] for f in found] == [
        "lightning",
        "memtrain.loop.fit",
        "memtrain.distributed",
        "memtrain.cli",
        "memtrain.loop",
        "lightning.pytorch",
    ], found


def test_strategies_import_neither_the_loop_nor_the_runners_nor_lightning():
    """No module of memtrain/strategies/ imports memtrain.loop, memtrain.distributed, memtrain.cli or lightning, anywhere in it."""
    folder = PACKAGE / "strategies"
    files = sorted(folder.glob("*.py"))
    assert len(files) >= 10
    offending = {f.name: found for f in files if (found := _forbidden_imports(f.read_text()))}
    assert not offending, offending


def test_memory_modules_import_lightning_only_in_the_callback_module():
    """memory/* measures steps for the planner too: only memory/lightning.py (the Lightning callback) imports lightning at module level."""
    offending = {}
    for f in sorted((PACKAGE / "memory").glob("*.py")):
        if f.name == "lightning.py":
            continue
        top = [n for n in ast.parse(f.read_text()).body if isinstance(n, (ast.Import, ast.ImportFrom))]
        names = [a.name for n in top if isinstance(n, ast.Import) for a in n.names] + [n.module or "" for n in top if isinstance(n, ast.ImportFrom)]
        if bad := [m for m in names if m.split(".")[0] in ("lightning", "lightning_fabric", "pytorch_lightning")]:
            offending[f.name] = bad
    assert not offending, offending


# -- function-level imports: only where they buy startup time, or for an optional dependency, or a cycle ------------
#: A lazy import is justified by a comment that says which: on its own lines or the line above its run of imports
#: ("# lazy (startup): ...", "# lazy (optional dependency): ...", "# (cycle: a <-> b)"), or, for a whole module, one
#: module-level comment line "# Lazy imports (startup|optional dependency|cycle): ...".
_WHY = re.compile(r"#.*\b(startup|optional|cycle)\b", re.IGNORECASE)
_MODULE_WIDE = re.compile(r"^# Lazy imports \((startup|optional dependency|cycle)\):", re.IGNORECASE | re.MULTILINE)


def _lazy_imports(source: str) -> tuple[int, list[str]]:
    """(how many function-level imports ``source`` holds, those of them without a justification comment, as 'line N: text')."""
    lines = source.splitlines()
    module_wide = bool(_MODULE_WIDE.search(source))
    count, unjustified = 0, []

    def commented(first: int, last: int) -> bool:  # 1-based, inclusive
        return any(_WHY.search(lines[i - 1]) for i in range(max(first - 1, 1), last + 1))

    def visit(body: list[ast.stmt], in_function: bool) -> None:
        run_justified = False  # the run of consecutive import statements this one belongs to is justified
        for stmt in body:
            if in_function and isinstance(stmt, (ast.Import, ast.ImportFrom)):
                nonlocal count
                count += 1
                run_justified = run_justified or module_wide or commented(stmt.lineno, stmt.end_lineno)
                if not run_justified:
                    unjustified.append(f"line {stmt.lineno}: {lines[stmt.lineno - 1].strip()}")
                continue
            run_justified = False
            inner = in_function or isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef))
            for field in ("body", "orelse", "finalbody"):
                if isinstance(getattr(stmt, field, None), list):
                    # a try/if/with whose header line says why covers the imports that open its body
                    visit(getattr(stmt, field), inner)
            for handler in getattr(stmt, "handlers", []):
                visit(handler.body, inner)
            for case in getattr(stmt, "cases", []):
                visit(case.body, inner)

    visit(ast.parse(source).body, False)
    return count, unjustified


def test_the_lazy_import_scan_finds_imports_without_a_reason():
    source = """
import torch
def f():
    import numpy  # lazy (startup): only the plot needs it
    from x import y
    import z
    z.use()
    from w import v
class C:
    def m(self):
        if True:
            # (cycle: a <-> b)
            from a import b
        try:  # lazy (optional dependency): an extra
            import onnx
        except ImportError:
            import json
def g():
    def inner():
        import os
"""
    count, unjustified = _lazy_imports(source)
    assert count == 8
    assert [u.split(": ", 1)[1] for u in unjustified] == ["from w import v", "import json", "import os"], unjustified
    assert _lazy_imports("# Lazy imports (startup): run() loads torch.\ndef run():\n    import torch\n") == (1, [])


def test_function_level_imports_say_why_they_are_not_at_module_level():
    """Every import inside a function of memtrain/ says why it is there: startup time, an optional dependency or a cycle."""
    found = {str(f.relative_to(PACKAGE)): _lazy_imports(f.read_text()) for f in sorted(PACKAGE.rglob("*.py"))}
    assert len(found) >= 60
    unjustified = {name: bad for name, (_, bad) in found.items() if bad}
    total = sum(count for count, _ in found.values())
    assert not unjustified, f"{total} function-level imports; these give no reason (startup / optional dependency / cycle): {unjustified}"
