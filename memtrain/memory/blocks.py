"""Per-block attribution: which block of the model holds how much memory.

A model is cut into *blocks*: its modules two levels down, with module lists expanded
(their members run, the list does not). Wrappers are looked through first: while a
module has no parameters of its own and exactly one child with parameters (a
LightningModule holding the network and a loss), the blocks are counted from that child. For the smp U-Net that gives
``encoder.conv1``, ``encoder.bn1``, ..., ``encoder.layer1`` .. ``encoder.layer4``,
``decoder.blocks.0`` .. ``decoder.blocks.4`` and the segmentation head's layers — the
granularity at which strategies act (checkpoint regions, momentum stages). A strategy
that wraps a block (e.g. a checkpoint wrapper) keeps its name.

Forward pre/post hooks on the blocks tell the tensor counter which block is running,
so every new storage is labelled with the innermost running block (or
``(outside blocks)``: the loss, the optimizer). At the end of the forward phase the
``tensor`` backend sums the live activation storages per label: the bytes each block
still holds for the backward pass — what checkpointing or saved-tensor compression of
that block would act on.
"""

from __future__ import annotations

from torch import nn

from memtrain.memory.tensor import OUTSIDE, LiveTensorBytes

DEPTH = 2


def model_blocks(model: nn.Module, depth: int = DEPTH) -> dict[str, nn.Module]:
    """Named blocks of ``model``: modules ``depth`` levels down, module lists/dicts expanded."""
    out: dict[str, nn.Module] = {}
    model = network(model)

    def walk(module: nn.Module, prefix: str, level: int) -> None:
        for name, child in module.named_children():
            full = f"{prefix}{name}"
            container = isinstance(child, (nn.ModuleList, nn.ModuleDict))
            if container or (level < depth and any(True for _ in child.children())):
                walk(child, full + ".", level + (0 if container else 1))
            else:
                out[full] = child

    walk(model, "", 1)
    return out


def network(model: nn.Module) -> nn.Module:
    """``model`` with parameterless wrappers removed (see the module docstring)."""
    while True:
        with_params = [c for c in model.children() if any(True for _ in c.parameters())]
        if len(with_params) != 1 or any(True for _ in model.parameters(recurse=False)):
            return model
        model = with_params[0]


class BlockHooks:
    """Forward hooks that set ``counter.owner`` to the running block's name."""

    def __init__(self, model: nn.Module, counter: LiveTensorBytes) -> None:
        self.counter = counter
        self.names = list(model_blocks(model))
        self._stack: list[str] = []
        self._handles = []
        for name, block in model_blocks(model).items():
            self._handles.append(block.register_forward_pre_hook(self._enter(name)))
            self._handles.append(block.register_forward_hook(self._exit, always_call=True))

    def _enter(self, name: str):
        def hook(module, args):
            self._stack.append(self.counter.owner)
            self.counter.owner = name

        return hook

    def _exit(self, module, args, output):
        self.counter.owner = self._stack.pop() if self._stack else OUTSIDE

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def block_parameters(model: nn.Module) -> dict[str, int]:
    """Bytes of parameters and buffers per block (each storage counted once)."""
    out: dict[str, int] = {}
    seen: set[int] = set()
    for name, block in model_blocks(model).items():
        total = 0
        for t in [*block.parameters(), *block.buffers()]:
            try:
                key = t.untyped_storage()._cdata
            except (RuntimeError, NotImplementedError):
                continue
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()
        out[name] = total
    return out


def block_table(held: dict[str, int], params: dict[str, int] | None = None, order: list[str] | None = None) -> list[dict[str, object]]:
    """Rows ``{block, parameters, activations_held}`` (bytes), in model order, blocks holding nothing left out."""
    params = params or {}
    names = [*(order or []), *sorted(set(held) | set(params))]
    names = [n for n in dict.fromkeys(names) if n != OUTSIDE] + [OUTSIDE]
    rows = []
    for name in names:
        p, a = params.get(name, 0), held.get(name, 0)
        if p or a:
            rows.append({"block": name, "parameters": p, "activations_held": a})
    return rows
