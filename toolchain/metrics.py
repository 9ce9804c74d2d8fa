"""Model size figures shared by every stage: parameter count and FLOPs (torch.utils.flop_counter).

FLOPs are counted as torch counts them: 2 per multiply-accumulate, for one sample (batch 1).
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
    try:
        with FlopCounterMode(display=False) as counter:
            model(*args)
        return int(counter.get_total_flops())
    except Exception:  # noqa: BLE001 - e.g. TorchScript ops without a flop formula: report unknown, not fail
        return None
    finally:
        if was_training:
            model.train()
