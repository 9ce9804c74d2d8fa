"""Model size figures shared by every stage: parameter count and FLOPs (torch.utils.flop_counter).

FLOPs are counted as torch counts them: 2 per multiply-accumulate, for one sample (batch 1). torch's counter has no
formula for the fused LSTM kernel (aten._lstm counts 0: Resemblyzer's 3-layer LSTM read as 131 kFLOPs, its Linear
alone), so a recurrent module inside which torch counted nothing adds its gate matmuls: 2 x gates x hidden x
(input + hidden) per step, layer and direction.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def set_eval(model: nn.Module) -> bool | None:
    """Put a module in eval mode; returns its previous mode, or None where the mode is fixed
    (a torch.export program's module refuses train()/eval())."""
    was_training = getattr(model, "training", None)
    try:
        model.eval()
    except NotImplementedError:
        return None
    return was_training


_GATES = {nn.LSTM: 4, nn.GRU: 3, nn.RNN: 1, nn.LSTMCell: 4, nn.GRUCell: 3, nn.RNNCell: 1}


def _recurrent_flops(module: nn.Module, x) -> int:
    """The gate matmuls of one call of a recurrent module on input `x` (a tensor; packed sequences are not counted)."""
    if not isinstance(x, torch.Tensor):
        return 0
    gates = next(g for t, g in _GATES.items() if isinstance(module, t))
    hidden = module.hidden_size
    if isinstance(module, nn.RNNBase):
        steps = x.shape[1 if module.batch_first else 0] if x.dim() == 3 else x.shape[0]
        batch = (x.shape[0 if module.batch_first else 1]) if x.dim() == 3 else 1
        dirs = 2 if module.bidirectional else 1
        out = module.proj_size or hidden
        total = 0
        for layer in range(module.num_layers):
            width = module.input_size if layer == 0 else out * dirs
            total += 2 * gates * hidden * (width + out) * dirs + (2 * hidden * out * dirs if module.proj_size else 0)
        return total * steps * batch
    batch = x.shape[0] if x.dim() == 2 else 1
    return 2 * gates * hidden * (module.input_size + hidden) * batch


@torch.no_grad()
def count_flops(model: nn.Module, input_shape) -> int | None:
    """FLOPs of one forward pass at batch 1; None when the model cannot be traced by the counter.
    `input_shape`: a single input's shape, or the example arguments (tensors at batch 1) of any model."""
    if not input_shape:
        return None
    if isinstance(input_shape[0], torch.Tensor):
        args = tuple(input_shape)
    else:
        args = (torch.zeros((1, *tuple(input_shape)[1:])),)
    was_training = set_eval(model)
    counter = FlopCounterMode(display=False)
    extra, before, hooks = [0], {}, []

    def pre(mod, inp):
        before[mod] = counter.get_total_flops()

    def post(mod, inp, out):   # only where torch counted nothing inside (aten._lstm): GRU/RNN/cells it counts
        if counter.get_total_flops() == before.pop(mod, None):
            extra[0] += _recurrent_flops(mod, inp[0] if inp else None)
    if isinstance(model, nn.Module):
        for m in model.modules():
            if isinstance(m, tuple(_GATES)):
                hooks += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    try:
        with counter:
            model(*args)
        return int(counter.get_total_flops()) + extra[0]
    except Exception:  # noqa: BLE001 - e.g. TorchScript ops without a flop formula: report unknown, not fail
        return None
    finally:
        for h in hooks:
            h.remove()
        if was_training:
            model.train()
