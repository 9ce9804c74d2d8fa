"""Structured pruning: whole channels and neurons are removed, so the model is really smaller.

The dependency graph (which layers must lose the same channels: residual additions, concatenations,
depthwise convolutions, BatchNorm) comes from torch-pruning; this module chooses what to remove,
validates options loudly, and reports params/FLOPs before and after (edgec.metrics: FLOPs at batch 1,
2 per multiply-accumulate). The model's output layer is never pruned.

Recurrent layers (nn.GRU, nn.LSTM, nn.RNN) are resized by `RecurrentPruner`: their input size follows the layer
that feeds them, and their hidden size is pruned across every gate, layer, direction and the recurrent weights,
unless the layer is given an initial state (a model input, or a fixed-size tensor), returns its state as a model
output, or is an LSTM with a projection: then the hidden size is kept, and the record says why.

Channel regroupings torch-pruning cannot map (ShuffleNet's channel shuffle, pixel shuffle, ...) are traced as
`edgec.regroup.ChannelBarrier` layers that are never pruned: the groups through them keep their channels, and the
record (`regroupings`) names those layers.
"""
from __future__ import annotations

import contextlib
import copy
import os
import signal
import threading
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from edgec.core.errors import EdgecError, ModelError, OptionError, cause_line
from edgec.metrics import count_flops, count_params
from edgec.regroup import ChannelBarrier, Regroupings, barrier_pruner
from edgec.source import require_eager

IMPORTANCE = ("l1", "l2", "bn", "taylor")
MAX_STEPS = 100   # iterative pruning steps: more than there are channels to take in turn is no finer
MAX_LAYER_RATIO = 0.95   # never empty a layer: at least 5% of its channels stay


@dataclass
class PruneConfig:
    ratio: float | None = None            # fraction of channels removed (per layer, or on average when global)
    target_flops: float | None = None     # or: keep this fraction of the FLOPs (search for the ratio)
    target_params: float | None = None    # or: keep this fraction of the parameters
    importance: str = "l2"                # l1 | l2 | bn | taylor (taylor needs data)
    global_pruning: bool = False          # rank channels across layers instead of the same ratio everywhere
    steps: int = 1                        # iterative: re-estimate importance between steps
    round_to: int | None = None           # keep channel counts a multiple of this (fast kernels)
    ignore: tuple = ()                    # module names (and their children) left untouched
    taylor_samples: int = 256             # samples whose gradients rank channels for taylor

    def validate(self) -> None:
        targets = [t for t in (self.ratio, self.target_flops, self.target_params) if t is not None]
        if len(targets) != 1:
            raise OptionError("give exactly one of --ratio, --target-flops, --target-params")
        for name, value in (("--ratio", self.ratio), ("--target-flops", self.target_flops),
                            ("--target-params", self.target_params)):
            if value is not None and not 0.0 < value < 1.0:
                raise OptionError(f"{name} {value} is outside (0, 1); e.g. --ratio 0.5 removes half the channels, "
                                  "--target-flops 0.25 keeps a quarter of the FLOPs")
        if self.ratio is not None and self.ratio > MAX_LAYER_RATIO:
            raise OptionError(f"--ratio {self.ratio} would empty layers; use at most {MAX_LAYER_RATIO}")
        if self.importance not in IMPORTANCE:
            raise OptionError(f"--importance {self.importance!r} is not one of {', '.join(IMPORTANCE)}")
        if not 1 <= self.steps <= MAX_STEPS:   # each step re-ranks and re-traces: 10**5 of them ran for hours
            raise OptionError(f"--steps {self.steps} must be 1 to {MAX_STEPS} (each step re-ranks the channels "
                              "and removes a slice of them)")
        if self.round_to is not None and self.round_to < 1:
            raise OptionError(f"--round-to {self.round_to} must be a positive channel count, e.g. 8")


# ---------------------------------------------------------------- recurrent layers

_GATES = {nn.GRU: 3, nn.LSTM: 4, nn.RNN: 1}
_LAYERS = (nn.modules.conv._ConvNd, nn.Linear, nn.RNNBase)   # what pruning resizes and hooks by name


def _width(m: nn.Module) -> int:
    return (m.out_channels if isinstance(m, nn.modules.conv._ConvNd) else m.out_features if isinstance(m, nn.Linear)
            else m.hidden_size)


def _recurrent_pruner():
    import torch_pruning as tp

    class RecurrentPruner(tp.pruner.function.BasePruningFunc):
        """torch-pruning's resizer for nn.GRU/LSTM/RNN: every layer and direction, every gate (GRU r,z,n; LSTM
        i,f,g,o: rows g*H + k of weight_ih/weight_hh and the biases), the recurrent columns, and the input
        columns of the layers above the first. (torch-pruning's own LSTMPruner handles one layer only.)"""
        TARGET_MODULES = (nn.RNNBase,)

        @staticmethod
        def _keep(n, idxs):
            return sorted(set(range(n)) - {int(i) for i in idxs})

        def _cut(self, layer, name, keep, dim):
            setattr(layer, name, self._prune_parameter_and_grad(getattr(layer, name), keep, dim))

        def prune_out_channels(self, layer, idxs):
            h = layer.hidden_size
            # bidirectional: the output is [forward H | backward H]; idxs come in pairs k, H + k (channel groups)
            units = {int(i) % h for i in idxs}
            if layer.bidirectional and len(units) * 2 != len(set(int(i) for i in idxs)):
                raise ModelError("a bidirectional recurrent layer loses the same hidden units in both directions; "
                                 "this dependency group asked for others")
            keep = self._keep(h, units)
            rows = [g * h + k for g in range(_GATES[type(layer)]) for k in keep]
            below = keep + [h + k for k in keep] if layer.bidirectional else keep   # layer l-1's output features
            for name, _ in list(layer.named_parameters(recurse=False)):
                self._cut(layer, name, rows, 0)
                if name.startswith("weight_hh"):
                    self._cut(layer, name, keep, 1)
                elif name.startswith("weight_ih") and not name.startswith("weight_ih_l0"):
                    self._cut(layer, name, below, 1)
            layer.hidden_size = len(keep)
            return layer

        def prune_in_channels(self, layer, idxs):
            keep = self._keep(layer.input_size, idxs)
            for name in ("weight_ih_l0", "weight_ih_l0_reverse")[:2 if layer.bidirectional else 1]:
                self._cut(layer, name, keep, 1)
            layer.input_size = len(keep)
            return layer

        def get_out_channels(self, layer):
            return (getattr(layer, "proj_size", 0) or layer.hidden_size) * (2 if layer.bidirectional else 1)

        def get_in_channels(self, layer):
            return layer.input_size

        def get_out_channel_groups(self, layer):
            return 2 if layer.bidirectional else 1   # the same units pruned in both directions

    return RecurrentPruner()


class _OneNode(torch.autograd.Function):
    """A recurrent layer's outputs as one autograd node whose only input is the layer's input: what torch-pruning's
    graph traces instead of the gate arithmetic (on CPU GRU gates are chunked matmuls it misreads: IndexError)."""

    @staticmethod
    def forward(ctx, x, *outs):
        ctx.shape = x.shape
        return tuple(o.clone() for o in outs)

    @staticmethod
    def backward(ctx, *grads):
        return (grads[0].new_zeros(ctx.shape), *[None] * len(grads))


def _one_node(module, inputs, output):
    out, state = output
    if not isinstance(out, torch.Tensor) or not isinstance(inputs[0], torch.Tensor):
        return None   # a PackedSequence: traced as it is
    states = state if isinstance(state, tuple) else (state,)
    flat = _OneNode.apply(inputs[0], *(t.detach() for t in (out, *states)))
    return flat[0], (tuple(flat[1:]) if isinstance(state, tuple) else flat[1])


def recurrent_layers(model: nn.Module, example: tuple) -> dict[str, dict]:
    """{name: {"hidden": "pruned"|"kept", "why": ...}} for every recurrent layer the example runs through."""
    seen: dict = {}

    def hook(mod, args, kwargs, output, name):
        out, state = output
        states = state if isinstance(state, tuple) else (state,)
        given = (args[1] if len(args) > 1 else kwargs.get("hx")) is not None
        seen[name] = (mod, given, {id(t) for t in (out, *states)})
    outs = _run_hooked(model, example, [m.register_forward_hook(
        lambda mod, a, k, o, name=name: hook(mod, a, k, o, name), with_kwargs=True)
        for name, m in model.named_modules() if isinstance(m, nn.RNNBase)])
    returned = {id(t) for t in outs}
    plan = {}
    for name, (m, given_state, made) in seen.items():
        why = ("it is given an initial state (a model input, or a tensor of fixed size)" if given_state
               else "its output or state is a model output" if made & returned
               else "an LSTM with a projection (proj_size)" if getattr(m, "proj_size", 0)
               else "recurrent layers are pruned by nn.GRU/LSTM/RNN only" if type(m) not in _GATES else None)
        plan[name] = {"type": type(m).__name__, "hidden": "kept" if why else "pruned",
                      **({"why": why} if why else {})}
    return plan


# ---------------------------------------------------------------- helpers

def output_layers(model: nn.Module, example: tuple) -> list[nn.Module]:
    """The layer(s) producing the model's outputs (the classifier, every head of a multi-output model): the last
    Conv/Linear whose output has the output's shape, else the last one with the output's channel count (a head
    pooled after its layer). Their output channels are the classes, so never pruned.
    Recurrent layers whose hidden size is kept (`recurrent_layers`) count as such too."""
    order = []
    layers = [m for m in model.modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]
    outs = _run_hooked(model, example, [m.register_forward_hook(lambda mod, i, o: order.append((mod, tuple(o.shape))))
                                        for m in layers])
    found = []
    for o in outs:
        hit = next((m for m, shape in reversed(order) if shape == tuple(o.shape)), None)
        if hit is None and o.ndim > 1:  # a head pooled after its layer (SqueezeNet's conv classifier): match channels
            hit = next((m for m, shape in reversed(order) if _channels(m, shape) == o.shape[1]), None)
        if hit is not None and hit not in found:
            found.append(hit)
    modules = dict(model.named_modules())
    return found + [modules[n] for n, r in recurrent_layers(model, example).items() if r["hidden"] == "kept"]


def _run_hooked(model: nn.Module, example: tuple, hooks: list) -> list:
    """Run the model once with `hooks` (forward-hook handles) registered, then remove them; its outputs, flat."""
    from edgec.kdloss import flatten
    try:
        with torch.no_grad():
            out = model(*example)
    finally:
        for h in hooks:
            h.remove()
    return list(flatten(out).values())


def _channels(module: nn.Module, shape: tuple) -> int | None:
    """The size of a layer's output-channel axis in its output: last for Linear, 1 for convolutions."""
    return shape[-1] if isinstance(module, nn.Linear) else shape[1] if len(shape) > 1 else None


def _ignored(model: nn.Module, names) -> list[nn.Module]:
    modules = dict(model.named_modules())
    out = []
    for name in names:
        hits = [m for n, m in modules.items() if n == name or n.startswith(name + ".")]
        if not hits:
            similar = [n for n in modules if name.split(".")[-1] in n][:3]
            hint = f" (similar: {', '.join(similar)})" if similar else " (see `edgec prune --dry-run` for names)"
            raise OptionError(f"--ignore {name!r} matches no layer of the model{hint}")
        out += [m for m in hits if isinstance(m, _LAYERS)]
    return out


def max_ratio(model: nn.Module, cfg: PruneConfig, ignored) -> tuple[float, str]:
    """The largest uniform ratio that leaves every prunable layer at least one channel (or --round-to
    channels): beyond it torch-pruning silently skips the layers it would empty, so the model would *grow*
    again. Layers no wider than that minimum are never pruned at any ratio, so they do not limit it."""
    keep = max(1, cfg.round_to or 1)
    layers = [(n, _width(m)) for n, m in model.named_modules() if isinstance(m, _LAYERS) and m not in ignored]
    layers = [(n, c) for n, c in layers if c > keep]
    if not layers:
        raise OptionError("no layer can be pruned: every Conv/Linear is an output, --ignore'd or no wider than "
                          f"{keep} channels{' (--round-to)' if cfg.round_to else ''}")
    name, smallest = min(layers, key=lambda t: t[1])
    return min(MAX_LAYER_RATIO, 1 - keep / smallest - 1e-6), f"{name} ({smallest} channels)"


def _importance(name: str):
    import torch_pruning as tp
    if name == "l1":
        return tp.importance.GroupMagnitudeImportance(p=1)
    if name == "l2":
        return tp.importance.GroupMagnitudeImportance(p=2)
    if name == "bn":
        return tp.importance.BNScaleImportance()
    return tp.importance.GroupTaylorImportance()


def _accumulate_gradients(model: nn.Module, data, samples: int, batch_size: int = 32) -> None:
    """First-order Taylor needs d(loss)/d(weight): class labels when there are any, else the model's own
    outputs (the loss of changing what the model currently says: its top class for one (N, K) output, else the
    outputs' energy, whose gradient weighs each output by its size). Dict feeds: every input of the model."""
    from edgec.kdloss import flatten
    from edgec.train import _as_tensors
    model.zero_grad(set_to_none=True)
    model.eval()  # BatchNorm statistics stay as trained
    seen = 0
    for i, feed in enumerate(data.batches(batch_size, limit=samples)):
        outs = list(flatten(model(*_as_tensors(feed))).values())
        n = len(outs[0])
        if len(outs) == 1 and outs[0].dim() == 2 and outs[0].shape[1] > 1:
            logits = outs[0]
            y = (torch.from_numpy(data.y[i * batch_size:i * batch_size + n]) if data.class_ids
                 else logits.detach().argmax(1))
            loss = F.cross_entropy(logits, y, reduction="sum")
        else:
            loss = sum(0.5 * (o.float() ** 2).sum() for o in outs)
        (loss / samples).backward()
        seen += n
    if seen == 0:
        raise OptionError("--importance taylor got no samples from --data")


def _shape_of(model) -> dict:
    from edgec.modelio import record_structure
    return record_structure(model)


# ---------------------------------------------------------------- pruning

# torch-pruning's dependency analysis of a graph it cannot map may never end: on Swin-T its index mapping of the
# window partitions grew past 7.8 GB in 3 minutes (benchmarks/ANYMODEL_RESULTS.md). ResNet-50's takes seconds and
# a few hundred MB; past these the analysis is stopped with a model error
ANALYSIS_SECONDS = 600
ANALYSIS_GROWTH_MB = 4096


def _rss_mb() -> float | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
    except (OSError, ValueError, IndexError):
        return None


@contextlib.contextmanager
def _bounded_analysis():
    """Stop torch-pruning's graph analysis (pure Python) when it runs past ANALYSIS_SECONDS or grows the process by
    ANALYSIS_GROWTH_MB (or half the free memory): a once-a-second timer signal checks, in the main thread only."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return
    from edgec.core.memory import available_mb   # cgroup- and ulimit-aware
    started, base = time.monotonic(), _rss_mb()
    limit = min(ANALYSIS_GROWTH_MB, max(512.0, available_mb()[0] / 2))

    def check(signum, frame):
        grown = (_rss_mb() or 0) - (base or 0) if base is not None else 0
        spent = time.monotonic() - started
        if grown > limit or spent > ANALYSIS_SECONDS:
            what = f"grew by {grown / 1024:.1f} GB" if grown > limit else f"ran {spent:.0f} s"
            raise ModelError(f"torch-pruning's dependency analysis of this model {what} without finishing "
                             f"({spent:.0f} s): the graph has an operation it cannot map (e.g. Swin's shifted window "
                             "partitions); --ignore the layers around it, or prune another architecture")
    previous = signal.signal(signal.SIGALRM, check)
    signal.setitimer(signal.ITIMER_REAL, 1.0, 1.0)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)

class _Run:
    """One configured torch-pruning pruner on a model (a copy: the caller's model never changes)."""

    def __init__(self, model: nn.Module, example: tuple, cfg: PruneConfig, ratio: float, data):
        import torch_pruning as tp
        self.model, self.cfg, self.data = model, cfg, data
        ignored = ignored_layers(model, example, cfg)
        recurrent = _recurrent_pruner()
        # the graph is traced once, here: each recurrent layer as one node (the pruner knows its gates)
        hooks = [m.register_forward_hook(_one_node, prepend=True) for m in model.modules() if type(m) in _GATES]
        # channel shuffles and other channel regroupings: layers of the graph whose groups keep their channels
        self.regroupings = Regroupings(model)
        barriers = self.regroupings.find(example)
        try:
            with self.regroupings.tracing(), _bounded_analysis():
                self.pruner = tp.pruner.BasePruner(   # a tuple of example inputs: torch-pruning calls model(*example)
                    model, example, importance=_importance(cfg.importance), global_pruning=cfg.global_pruning,
                    pruning_ratio=ratio, max_pruning_ratio=max(0.9, ratio) if cfg.global_pruning else MAX_LAYER_RATIO,
                    iterative_steps=cfg.steps, round_to=cfg.round_to, ignored_layers=ignored + barriers,
                    customized_pruners={**{t: recurrent for t in _GATES}, ChannelBarrier: barrier_pruner()},
                    root_module_types=list(_LAYERS))
        finally:
            for h in hooks:
                h.remove()
            self.regroupings.detach()

    def kept_by_regroupings(self) -> dict | None:
        """The layers whose output channels stay because their group passes through a channel regrouping."""
        barriers = self.regroupings.barriers
        if not barriers:
            return None
        names = {m: n for n, m in self.model.named_modules()}
        graph, kept = self.pruner.DG, []
        for group in graph.get_all_groups(root_module_types=list(_LAYERS)):
            if any(isinstance(dep.target.module, ChannelBarrier) for dep, _ in group):
                kept += [names[m] for dep, _ in group for m in [dep.target.module]
                         if isinstance(m, _LAYERS) and m in names and graph.is_out_channel_pruning_fn(dep.handler)]
        ops: dict[str, int] = {}
        for b in barriers:
            ops[b.op] = ops.get(b.op, 0) + 1
        return {"ops": ops, "where": list(dict.fromkeys(b.where for b in barriers)),
                "kept": list(dict.fromkeys(kept)),
                "why": "their channels pass through a channel regrouping (a view/reshape of the channel axis, pixel "
                       "or channel shuffle) that torch-pruning cannot map"}

    def groups(self):
        """Dependency groups of one step, without changing anything (importance, then what would go)."""
        self._prepare()
        return list(self.pruner.step(interactive=True))

    def prune(self) -> nn.Module:
        for _ in range(self.cfg.steps):
            self._prepare()
            self.pruner.step()
        self.model.zero_grad(set_to_none=True)
        return self.model

    def _prepare(self):
        if self.cfg.importance == "taylor":
            _accumulate_gradients(self.model, self.data, self.cfg.taylor_samples)


def ignored_layers(model, example, cfg) -> list[nn.Module]:
    return output_layers(model, example) + _ignored(model, cfg.ignore)


def _example(loaded, data) -> tuple:
    """One sample of every model input, as the model's positional arguments: a real one from `data` (dict
    feeds in the model's input order, any dtype), else zeros of the model file's recorded single-input shape."""
    if data is not None and data.specs:
        from edgec.inputspec import example_args
        return example_args(data.head(1), data.specs)
    shape = loaded.input_shape
    if shape is None and data is not None:
        shape = (1, *data.sample_shape)
    if shape is None:
        raise OptionError(f"{loaded.path}: the input shape is unknown; pass --input-shape, e.g. 1,3,224,224, "
                          "or --data")
    return (torch.zeros(tuple(int(d) for d in shape)),)


def _prune_copy(module, example, cfg, ratio, data) -> tuple[nn.Module, dict | None]:
    """A pruned copy, and what channel regroupings kept (`_Run.kept_by_regroupings`)."""
    try:
        run = _Run(copy.deepcopy(module), example, cfg, ratio, data)
        regrouped = run.kept_by_regroupings()   # before pruning: the groups as traced
        pruned = run.prune()
    except EdgecError:
        raise
    except Exception as e:  # noqa: BLE001 - torch-pruning could not trace or group the model
        odd = _unresizable(module)
        if odd:
            raise ModelError(f"torch-pruning cannot prune this model ({cause_line(e)[:120]}): layer {odd[0]} holds "
                             "weights it cannot resize (recurrent layers: nn.GRU, nn.LSTM, nn.RNN only, not their "
                             "cells); use one of those layers, or ship this model unpruned") from e
        raise ModelError(f"torch-pruning cannot prune this model ({cause_line(e)[:200]}); --ignore the layer "
                         "involved or simplify its forward") from e
    _check_runs(module, pruned, example)
    return pruned, regrouped


def _unresizable(model: nn.Module) -> list[str]:
    """'name (Type)' of the recurrent cells (nn.GRUCell, nn.LSTMCell, ...): torch-pruning traces into their gate
    arithmetic and fails, and no pruner here resizes them (a loop over a cell is not one layer)."""
    return [f"{n} ({type(m).__name__})" for n, m in model.named_modules() if isinstance(m, nn.RNNCellBase)]


def _check_runs(original: nn.Module, pruned: nn.Module, example: tuple) -> None:
    """Run the pruned copy once. A forward that hard-codes a shape (x.view(n, 16 * 8 * 8)) fails after the layer
    whose channels changed: name that layer, so that it can be --ignore'd."""
    done: list[str] = []
    hooks = [m.register_forward_hook(lambda mod, i, o, name=name: done.append(name))
             for name, m in pruned.named_modules() if isinstance(m, _LAYERS)]
    try:
        with torch.no_grad():
            pruned.eval()(*example)
    except Exception as e:  # noqa: BLE001
        changed = plan(_shape_of(original), _shape_of(pruned))
        after = done[-1] if done else None
        culprit = next((n for n in reversed(done) if n in changed), after)
        where = (f"after layer {culprit} ({', '.join(f'{k} {a} -> {b}' for k, (a, b) in changed[culprit].items())})"
                 if culprit in changed
                 else f"after layer {after}" if after else "before its first layer")
        raise ModelError(f"the pruned model fails {where}: {cause_line(e)[:200]}; its forward hard-codes a shape "
                         f"(e.g. x.view(n, C*H*W)): use x.flatten(1), or --ignore {culprit or 'that layer'}") from None
    finally:
        for h in hooks:
            h.remove()


def _search_ratio(module, example, cfg, data, measure, target: float, label: str) -> tuple:
    """Bisect the channel ratio until `measure(pruned) / measure(original)` reaches the target fraction:
    (ratio, pruned copy, what channel regroupings kept)."""
    base = measure(module)
    hi, _ = max_ratio(module, cfg, ignored_layers(module, example, cfg))
    lo = 0.0
    top, regrouped = _prune_copy(module, example, cfg, hi, data)
    reached = measure(top) / base
    if reached > target:
        raise OptionError(f"--target-{label} {target} is unreachable: the most that can be removed ({hi:.0%} of "
                          f"the channels) keeps {reached:.3f} of the {label}; ask for at least {reached:.3f}, "
                          "--ignore fewer layers or lower --round-to")
    best = (hi, top)
    for _ in range(10):
        mid = (lo + hi) / 2
        pruned, _ = _prune_copy(module, example, cfg, mid, data)
        if measure(pruned) / base <= target:
            hi, best = mid, (mid, pruned)
        else:
            lo = mid
        if hi - lo < 0.005:
            break
    return (*best, regrouped)


def plan(before: dict, after: dict) -> dict:
    """Per-layer channel plan: {layer: {attribute: [before, after]}} for every shape attribute that changes."""
    out = {}
    for name, attrs in before.items():
        new = after.get(name, attrs)
        changed = {k: [v, new.get(k)] for k, v in attrs.items() if new.get(k) != v}
        if changed:
            out[name] = changed
    return out


def prune_model(loaded, cfg: PruneConfig, data=None) -> tuple[nn.Module, dict]:
    """Prune `loaded.module` (a LoadedModel); returns a pruned copy and the stage record
    (config, resolved ratio, params/FLOPs before and after, per-layer channel plan)."""
    cfg.validate()
    require_eager(loaded, "pruning")
    if cfg.importance == "taylor" and (data is None or len(data) == 0):
        raise OptionError("--importance taylor ranks channels by gradients: it needs --data")
    example = _example(loaded, data)
    module = loaded.module.eval()
    _ignored(module, cfg.ignore)  # loud before any work
    params0, flops0 = count_params(module), count_flops(module, example)
    if cfg.ratio is not None:
        limit, smallest = max_ratio(module, cfg, ignored_layers(module, example, cfg))
        if cfg.ratio > limit + 2e-6:
            raise OptionError(f"--ratio {cfg.ratio} would empty {smallest}"
                              f"{' at --round-to ' + str(cfg.round_to) if cfg.round_to else ''}; "
                              f"use at most {limit:.3f} or --ignore that layer")
        ratio, (pruned, regrouped) = cfg.ratio, _prune_copy(module, example, cfg, cfg.ratio, data)
    elif cfg.target_flops is not None:
        if flops0 is None:
            raise OptionError("--target-flops: this model's FLOPs cannot be counted; use --ratio or --target-params")
        ratio, pruned, regrouped = _search_ratio(module, example, cfg, data, lambda m: count_flops(m, example),
                                                 cfg.target_flops, "flops")
    else:
        ratio, pruned, regrouped = _search_ratio(module, example, cfg, data, count_params, cfg.target_params,
                                                 "params")
    pruned.eval()
    from edgec.kdloss import flatten
    with torch.no_grad():
        out = {k: tuple(v.shape) for k, v in flatten(pruned(*example)).items()}
        ref = {k: tuple(v.shape) for k, v in flatten(module(*example)).items()}
    if out != ref:  # the library's promise, checked: every output keeps its shape
        raise ModelError(f"pruning changed the output shapes {ref} -> {out}")
    params1, flops1 = count_params(pruned), count_flops(pruned, example)
    if params1 >= params0 and regrouped and regrouped["kept"]:
        raise ModelError(f"nothing can be pruned: the channels of {', '.join(regrouped['kept'][:3])} pass through "
                         f"a channel regrouping torch-pruning cannot map ({', '.join(regrouped['ops'])} in "
                         f"{regrouped['where'][0]}); ship this model unpruned, or write that regrouping so that "
                         "it keeps the channel axis (axis 1) where it is")
    if params1 >= params0:
        raise OptionError(f"nothing was pruned with --importance {cfg.importance}: every channel scored the same "
                          "(an untrained model's BatchNorm scales are all 1?); use l1/l2 or a trained model")
    record = {
        "config": asdict(cfg) | {"ignore": list(cfg.ignore)},
        "ratio": round(float(ratio), 4),
        "input_shape": list(example[0].shape) if len(example) == 1 else None,
        "inputs": {s.name: list(t.shape) for s, t in zip(data.specs, example)} if data is not None and data.specs
        else None,
        "params_before": params0, "params_after": params1,
        "flops_before": flops0, "flops_after": flops1,
        "flops_reduction": round(flops0 / flops1, 3) if flops0 and flops1 else None,
        "params_reduction": round(params0 / params1, 3),
        "channels": plan(_shape_of(module), _shape_of(pruned)),
    }
    recurrent = recurrent_layers(module, example)
    if recurrent:
        record["recurrent"] = recurrent
    if regrouped:
        record["regroupings"] = regrouped
    return pruned, record


def describe_groups(loaded, cfg: PruneConfig, data=None) -> list[dict]:
    """The dependency groups of the first pruning step, as data: for `--dry-run`. Changes nothing."""
    cfg.validate()
    example = _example(loaded, data)
    module = copy.deepcopy(loaded.module).eval()
    ratio = cfg.ratio if cfg.ratio is not None else 0.5  # groups do not depend on the ratio
    run = _Run(module, example, cfg, ratio, data)
    names = {m: n for n, m in module.named_modules()}
    out = []
    for group in run.groups():
        members = []
        for dep, _ in group:
            if dep.target.module not in names:  # the graph's own add/concat nodes: not layers
                continue
            fn = getattr(dep.handler, "__name__", str(dep.handler)).replace("prune_", "")
            members.append(f"{names[dep.target.module]} ({fn})")
        root = group[0][0].target.module
        out.append({"root": names.get(root, type(root).__name__), "channels": run.pruner.DG.get_out_channels(root),
                    "members": list(dict.fromkeys(members))})
    return out




def _load(spec):
    """The model and, when --data is given, its samples (for taylor importance and the input shape)."""
    from edgec.data import load_data
    from edgec.modelio import load_model
    from edgec.source import image_size_for
    from edgec.inputspec import apply_overrides, declared_inputs, legacy_shape
    one_shape = legacy_shape(spec.input_shape) if isinstance(spec.input_shape, tuple) else None
    loaded = load_model(spec.model, spec.arch, trust_pickle=spec.trust_pickle, input_shape=one_shape)
    dataset = None
    if spec.data:   # bound to the model's inputs: names, dtypes, ranks (several inputs: one array each)
        dataset = load_data(spec.data, image_size=image_size_for(spec, loaded), mean=spec.mean, std=spec.std)
        dataset.bind(apply_overrides(declared_inputs(loaded), spec.input_shape))
    elif len(declared_inputs(loaded)) > 1:
        raise OptionError(f"{spec.model} takes several inputs; pass --data with one array per input (the example "
                          "inputs pruning traces the model with)")
    return loaded, dataset


def plan_pruning(spec, cfg: PruneConfig) -> tuple[list[dict], dict]:
    """`edgec prune --dry-run`: the dependency groups and the channel plan; the model file is not touched."""
    loaded, dataset = _load(spec)
    groups = describe_groups(loaded, cfg, dataset)
    _, record = prune_model(loaded, cfg, dataset)  # on a copy
    return groups, record


def prune_file(spec, cfg: PruneConfig, output, *, force: bool = False) -> dict:
    """`edgec prune`: prune the model file of `spec` (an edgec.source.SourceSpec) into an edgec model file."""
    from edgec.core.fsutil import check_writable
    from edgec.modelio import save_model
    if not output:
        raise OptionError("-o/--output is required (or --dry-run to only print the plan)")
    check_writable(output, force, inputs=(spec.model, spec.data))  # fail before the work, not after
    loaded, dataset = _load(spec)
    pruned, record = prune_model(loaded, cfg, dataset)
    if loaded.arch is None:
        raise OptionError(f"{spec.model} has no architecture spec to save with; pass --arch")
    save_model(output, pruned, loaded.arch, record["input_shape"], force=force,
               history=[*loaded.meta.get("history", []), {"stage": "prune", **record}],
               preprocess=loaded.meta.get("preprocess") or (dataset.preprocess if dataset else None))
    return record
