"""The model's inputs as it declares them: names, dtypes, ranks, dynamic axes (edgec.core.feeds.InputSpec).

Read from, in order: the edgec model file's record, the torch.export signature (names, dtypes, shapes with
symbolic axes), the TorchScript schema (names, optional inputs), the eager forward signature (names, optional
inputs). What the model does not say (an eager model's dtypes and ranks) comes from the data; the user can
override any input with `--input-shape NAME=DIMS` (DIMS: integers or names; a name marks a dynamic axis,
`batch` the batch axis, e.g. `state=2,batch,128` or `ids=batch,seq`).
"""
from __future__ import annotations

import inspect
import re
from typing import Sequence

from edgec.core.errors import DataError, ModelError, OptionError
from edgec.core.feeds import BATCH, InputSpec

DTYPE_NAMES = {"torch.float32": "float32", "torch.float16": "float16", "torch.float64": "float64",
               "torch.int64": "int64", "torch.int32": "int32", "torch.bool": "bool", "torch.uint8": "uint8",
               "torch.int8": "int8", "torch.bfloat16": "bfloat16"}


# ---------------------------------------------------------------- --input-shape

def parse_input_shape(text: str) -> tuple[str | None, list]:
    """'1,3,224,224' -> (None, [1,3,224,224]); 'state=2,batch,128' -> ('state', [2,'batch',128]). Without an
    axis named `batch`, the first axis is the batch (its number is only the example's)."""
    name, sep, dims = text.rpartition("=")
    name = name.strip() if sep else None
    if sep and not name:
        raise OptionError(f"--input-shape {text!r}: write NAME=DIMS, e.g. input=1,3,224,224")
    if re.fullmatch(r"[\d\sx,]+", dims):   # the old 1x3x224x224 form
        dims = dims.replace("x", ",")
    tokens = [t.strip() for t in dims.split(",")]
    if len(tokens) < 2:
        raise OptionError(f"--input-shape {text!r}: expected a batch and at least one dimension, e.g. 1,3,224,224")
    shape: list = []
    for t in tokens:
        if t.lstrip("-").isdigit():
            if int(t) <= 0:
                raise OptionError(f"--input-shape {text!r}: dimensions must be positive (or a name for a "
                                  "dynamic axis, e.g. batch,time)")
            shape.append(int(t))
        elif t.isidentifier():
            shape.append(t)
        else:
            raise OptionError(f"--input-shape {text!r}: expected integers like 1,3,224,224 (or names for dynamic "
                              "axes, e.g. batch,time)")
    return name, shape


def parse_input_shapes(values) -> dict | tuple | None:
    """The --input-shape option (repeatable): None, a tuple (one unnamed shape, the old form) or a dict
    {name: shape}. An unnamed shape is kept as a tuple so that single-input code keeps working."""
    if not values:
        return None
    if isinstance(values, str):
        values = [values]
    parsed = [parse_input_shape(v) for v in values]
    unnamed = [s for n, s in parsed if n is None]
    if unnamed and len(parsed) > 1:
        raise OptionError("--input-shape given several times: name each one (NAME=DIMS)")
    if unnamed:
        return tuple(unnamed[0])
    out: dict = {}
    for name, shape in parsed:
        if name in out:
            raise OptionError(f"--input-shape {name}=... given twice; give each input once")
        out[name] = shape
    return out


def legacy_shape(shape) -> tuple | None:
    """A concrete single-input shape (batch 1) for code that wants one (FLOPs, model files)."""
    if not shape:
        return None
    dims = [1 if d == BATCH else d for d in shape]
    return tuple(dims) if all(isinstance(d, int) for d in dims) else None


# ---------------------------------------------------------------- reading the model

def declared_inputs(loaded) -> list[InputSpec]:
    """One InputSpec per input the model declares (dtype/shape None where it does not say)."""
    record = loaded.meta.get("inputs") if getattr(loaded, "meta", None) else None
    if record:
        return [InputSpec(r["name"], r.get("dtype"), list(r["shape"]) if r.get("shape") else None,
                          int(r.get("batch_axis", 0)), bool(r.get("optional", False)), "file") for r in record]
    module = loaded.module
    if loaded.kind == "exported":
        specs = _from_graph(module)
    elif loaded.kind == "torchscript":
        specs = _from_schema(module)
    else:
        specs = _from_signature(module)
    if loaded.input_shape and len(specs) == 1 and specs[0].shape is None:   # a single-input model file's record
        specs[0].shape = [BATCH, *list(loaded.input_shape)[1:]]
        specs[0].source += "+file"
    return specs


def _from_graph(gm) -> list[InputSpec]:
    """A torch.export program's module: placeholders carry fake tensors with the traced dtype and shape."""
    specs = []
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        val = node.meta.get("val")
        if val is None or not hasattr(val, "dtype"):
            continue
        shape = []
        for axis, d in enumerate(val.shape):
            if axis == 0:
                shape.append(BATCH)
            else:
                shape.append(int(d) if isinstance(d, int) or str(d).isdigit() else f"{node.name}_{axis}")
        specs.append(InputSpec(node.name, DTYPE_NAMES.get(str(val.dtype)), shape, 0, False, "export"))
    if not specs:
        return _from_signature(gm)
    return specs


def _from_schema(module) -> list[InputSpec]:
    try:
        args = module.forward.schema.arguments[1:]
    except (AttributeError, RuntimeError):
        return [InputSpec("input", source="torchscript")]
    specs = []
    for a in args:
        kind = str(a.type)
        optional = a.default_value is not None or kind.startswith("Optional")
        if "Tensor" in kind and kind.replace("Optional[", "").startswith(("Tuple", "List", "Dict", "(")):
            # fed one tensor, such a forward fails deep inside torch with a type error
            raise ModelError(f"the model's input {a.name!r} is a {kind}, several tensors in one argument; edgec "
                             "feeds one tensor per argument: save a module whose forward takes each tensor as its "
                             "own argument and passes them on together (forward(self, a, b): return model((a, b)))")
        if "Tensor" not in kind:
            if optional:
                continue   # a non-tensor setting with a default: left at its default
            raise ModelError(f"the model's input {a.name!r} is a {kind}, not a tensor; edgec feeds tensors only: "
                             f"export a module whose forward takes tensors (its {a.name} fixed)")
        specs.append(InputSpec(a.name, None, None, 0, optional, "torchscript"))
    return specs or [InputSpec("input", source="torchscript")]


def _from_signature(module) -> list[InputSpec]:
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return [InputSpec("input", source="default")]
    specs = []
    for p in params:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            if not specs:
                return [InputSpec("input", source="default")]   # forward(*args): one input, named by edgec
            break
        if p.kind == p.KEYWORD_ONLY:
            break
        specs.append(InputSpec(p.name, None, None, 0, p.default is not p.empty, "signature"))
    return specs or [InputSpec("input", source="default")]


# ---------------------------------------------------------------- the user's overrides

def apply_overrides(specs: list[InputSpec], shapes) -> list[InputSpec]:
    """--input-shape: a tuple for a single-input model, or {name: shape}. Unknown names are an error naming
    the inputs."""
    if not shapes:
        return specs
    if not isinstance(shapes, dict):
        required = [s for s in specs if not s.optional]
        if len(required) != 1:
            raise OptionError(f"--input-shape {','.join(map(str, shapes))} does not name an input; this model takes "
                              f"{', '.join(s.name for s in specs)}: write --input-shape NAME=DIMS")
        shapes = {required[0].name: list(shapes)}
    names = [s.name for s in specs]
    unknown = [n for n in shapes if n not in names]
    if unknown:
        raise OptionError(f"--input-shape names {', '.join(map(repr, unknown))}, which the model does not take; "
                          f"its inputs are {', '.join(names)}")
    out = []
    for s in specs:
        given = shapes.get(s.name)
        if given is None:
            out.append(s)
            continue
        given = list(given)
        given = [BATCH if i == 0 and isinstance(d, int) and BATCH not in given else d for i, d in enumerate(given)]
        if s.shape is not None and len(s.shape) != len(given):
            raise OptionError(f"--input-shape {s.name}={','.join(map(str, given))} has rank {len(given)}, the model "
                              f"declares rank {len(s.shape)} ({','.join(map(str, s.shape))})")
        out.append(InputSpec(s.name, s.dtype, given, given.index(BATCH) if BATCH in given else 0, s.optional,
                             "option"))
    return out


def example_args(feed: dict, specs: Sequence[InputSpec]) -> tuple:
    """Positional torch arguments in the model's order from a dict feed (inputs the data lacks are left out:
    they are trailing optional ones)."""
    import torch
    present = [s.name in feed for s in specs]
    if any(not p and later for p, later in zip(present, [any(present[i + 1:]) for i in range(len(present))])):
        gap = next(s.name for s, p in zip(specs, present) if not p)
        raise DataError(f"the data leaves out input '{gap}' but gives a later one; give '{gap}' too (inputs are "
                        "passed in the model's order)")
    return tuple(torch.from_numpy(feed[s.name]) for s in specs if s.name in feed)


def dynamic_from_data(specs: list[InputSpec], data) -> list[InputSpec]:
    """Axes whose size varies between samples of the data (a data hook's sequences) become dynamic."""
    from edgec.data import varying_axes
    varying = varying_axes(data)
    out = []
    for s in specs:
        shape = list(s.shape) if s.shape else s.shape
        for axis in varying.get(s.name, []):
            if shape and not isinstance(shape[axis], str):
                shape[axis] = f"{s.name}_{axis}"
        out.append(InputSpec(s.name, s.dtype, shape, s.batch_axis, s.optional, s.source))
    return out
