"""Channel regroupings torch-pruning cannot map, seen by it as layers that are never pruned.

A view/reshape that splits or merges the channel axis (ShuffleNet's channel shuffle: view(n, g, c/g, h, w) ->
transpose -> view(n, c, h, w)), pixel (un)shuffle and channel_shuffle move channels to other positions or axes:
torch-pruning reads such a view as a flatten (ZeroDivisionError while it builds its graph) or as an
element-wise op (the wrong channels would go), and the chunks of a shuffled tensor defeat its split sizes.

While torch-pruning traces the model, `Regroupings` runs each of them (and each chunk of a regrouped tensor)
through a `ChannelBarrier`: an nn.Module with the op's real channel counts and a torch-pruning pruner that
never prunes. Passed as ignored layers, the barriers keep the channels of every dependency group that passes
through one (a ShuffleNet's channels between its blocks); every other group is pruned as usual (the channels
inside each branch). A flatten to (N, features), and reshapes that keep axes 0 and 1, are torch-pruning's own.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from edgec.core.errors import ModelError

_RESHAPES = {torch.Tensor.view, torch.Tensor.reshape, torch.reshape, torch.Tensor.unflatten, torch.unflatten,
             torch.Tensor.flatten, torch.flatten}
_CHANNEL_MOVERS = {torch.pixel_shuffle, torch.pixel_unshuffle, torch.channel_shuffle,
                   nn.functional.pixel_shuffle, nn.functional.pixel_unshuffle, nn.functional.channel_shuffle}
_SPLITS = {torch.Tensor.chunk, torch.chunk, torch.Tensor.split, torch.split, torch.Tensor.tensor_split,
           torch.tensor_split, torch.Tensor.unbind, torch.unbind}


def regroups_channels(x: torch.Tensor, out: torch.Tensor) -> bool:
    """True when the reshape x -> out moves x's channels (axis 1) into groups torch-pruning cannot follow."""
    if x.dim() < 3 or out.dim() < 2:
        return False   # (N, F) tensors: torch-pruning's own flatten/unflatten mapping
    if out.shape[:2] == x.shape[:2]:
        return False   # batch and channels kept: (N, C, H, W) -> (N, C, H*W)
    return not (out.dim() == 2 and out.shape[0] == x.shape[0] and out.shape[1] == math.prod(x.shape[1:]))


class _Through(torch.autograd.Function):
    """`out` (computed from x by the real op) as one autograd node fed by x: what torch-pruning traces. Only
    traced, never trained through (its gradient is zero)."""

    @staticmethod
    def forward(ctx, x, out):
        ctx.shape = x.shape
        return out.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad.new_zeros(ctx.shape), None


class ChannelBarrier(nn.Module):
    """One channel regrouping (`op`, called in module `where`), as a layer of torch-pruning's graph."""

    def __init__(self, in_channels: int, out_channels: int, op: str, where: str):
        super().__init__()
        self.in_channels, self.out_channels, self.op, self.where = in_channels, out_channels, op, where

    def forward(self, x, out):
        return _Through.apply(x, out)

    def extra_repr(self):
        return f"{self.op} in {self.where or 'the model'}: {self.in_channels} -> {self.out_channels} channels"


def barrier_pruner():
    """torch-pruning's pruner for ChannelBarrier: known channel counts, nothing to resize (it is ignored)."""
    import torch_pruning as tp

    class BarrierPruner(tp.pruner.function.BasePruningFunc):
        TARGET_MODULES = (ChannelBarrier,)

        def prune_out_channels(self, layer, idxs):
            raise RuntimeError(f"channel regrouping {layer.extra_repr()} cannot be pruned")

        prune_in_channels = prune_out_channels

        def get_out_channels(self, layer):
            return layer.out_channels

        def get_in_channels(self, layer):
            return layer.in_channels

    return BarrierPruner()


class Regroupings(TorchFunctionMode):
    """Within `with Regroupings(model).tracing():` every channel regrouping of the model's forward runs
    through its ChannelBarrier. Found by `find(example)` (one forward) and attached to the model as
    `_edgec_barriers` until `detach()`, so that torch-pruning hooks them like the model's own layers."""

    ATTR = "_edgec_barriers"

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.barriers, self._next = model, None, 0
        self._found: list | None = None   # while finding: the barriers made so far
        self._made: set[int] = set()   # ids of regrouped tensors (kept alive in _keep while a forward runs)
        self._keep: list = []
        self._where: list[str] = []

    def find(self, example: tuple) -> list[ChannelBarrier]:
        found: list[ChannelBarrier] = []
        names = {m: n for n, m in self.model.named_modules()}

        def enter(mod, args):
            self._where.append(names[mod] or type(mod).__name__)

        def leave(mod, args, out):
            self._where.pop()
        hooks = [h for m in names for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))]
        self._found = found
        try:
            with self, torch.enable_grad():
                self.model(*example)
        finally:
            for h in hooks:
                h.remove()
            self._reset()
        self.barriers = nn.ModuleList(found)
        if found:
            setattr(self.model, self.ATTR, self.barriers)
        return found

    def tracing(self):
        self._next = 0
        self._found = None
        return self

    def detach(self) -> None:
        if hasattr(self.model, self.ATTR):
            delattr(self.model, self.ATTR)

    def _reset(self):
        self._made.clear()
        self._keep.clear()
        self._where.clear()

    def __exit__(self, *exc):
        self._reset()
        return super().__exit__(*exc)

    def _barrier(self, x, out, op: str):
        if self._found is not None:   # finding: one new barrier per call
            b = ChannelBarrier(x.shape[1], out.shape[1] if out.dim() > 1 else 1, op,
                               self._where[-1] if self._where else "")
            self._found.append(b)
            result = b(x, out.detach())
        elif self._next < len(self.barriers):
            result = self.barriers[self._next](x, out.detach())
            self._next += 1
        else:
            raise ModelError(f"the model's forward regroups channels ({op}) more often than on its first run; "
                             "pruning needs a forward that does the same on the same input")
        self._made.add(id(result))
        self._keep.append(result)
        return result

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        x = args[0] if args else None
        if not (isinstance(x, torch.Tensor) and x.requires_grad) or (self._found is None and self.barriers is None):
            return out
        name = getattr(func, "__name__", str(func))
        if isinstance(out, torch.Tensor) and (func in _CHANNEL_MOVERS or
                                              (func in _RESHAPES and regroups_channels(x, out))):
            return self._barrier(x, out, name)
        if func in _SPLITS and id(x) in self._made and isinstance(out, (tuple, list)):
            # the chunks of a regrouped tensor: torch-pruning's split mapping cannot size them either
            return type(out)(self._barrier(x, o, name) for o in out)
        return out
