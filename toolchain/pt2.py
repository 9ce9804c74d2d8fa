"""Read a `torch.export` archive (.pt2) without running anything from it.

`torch.export.load` unpickles the sample inputs and any weight flagged `use_pickle` with
`weights_only=False`, loads AOTInductor shared libraries, `sympify`s (evals) symbolic-shape strings and
resolves node targets by attribute lookup. Here the archive is inspected first and rebuilt through the same
deserializer with only safe pieces: raw tensors read from their records (sizes checked against the
record), pickled tensors and sample inputs through `torch.load(weights_only=True)`, expression strings and
node targets checked against allowlists before deserialization and the graph checked again after.
Anything else is refused; `--trust-pickle` falls back to `torch.export.load`.
"""
from __future__ import annotations

import io
import json
import math
import operator
import re
from pathlib import PurePosixPath

import torch

from edgec.core.errors import ModelError

TRUST = "pass --trust-pickle only if you trust this file"
# entries of a plain torch.export.save archive below its top folder; anything else (AOTInductor or
# ExecuTorch payloads, legacy pickled state) is not read without --trust-pickle
_KNOWN = re.compile(r"(archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id|"
                    r"models/[^/]+\.json|data/(weights|constants)/[^/]+|data/sample_inputs/[^/]+\.pt|extra/.+)")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_EXPR_CHARS = re.compile(r"[A-Za-z0-9_ +\-*/%().,<>=!&|~^]*")
_EXPR_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SYMBOL = re.compile(r"[a-z]+[0-9]+")   # shape symbols: s0, u3, zuf0, ...
_QUOTED_SYMBOL = re.compile(r"'[a-z]+[0-9]+'")  # Symbol('s31', positive=True, integer=True)
_EXPR_WORDS = {"Integer", "Rational", "Float", "Symbol", "oo", "zoo", "nan", "true", "false", "True", "False",
               "Max", "Min", "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "And", "Or", "Not", "Abs", "sqrt", "floor",
               "ceiling", "Mod", "Piecewise", "ITE", "int_oo",
               # sympy assumptions, as keyword arguments of Symbol(...)
               "positive", "negative", "nonnegative", "nonpositive", "integer", "real", "finite", "zero",
               "nonzero", "even", "odd", "rational", "commutative", "extended_real"}


def refuse(path, what: str) -> ModelError:
    return ModelError(f"{path} is a torch.export archive whose {what} could run code when loaded; "
                      f"re-export it with torch.export.save from plain tensors, or {TRUST}")


def load_exported_program(path, trust_pickle: bool = False):
    """The archive's ExportedProgram; never unpickles or imports anything from the file unless trust_pickle."""
    if trust_pickle:
        return torch.export.load(str(path))
    from torch.export.pt2_archive._package import PT2ArchiveReader
    try:
        reader = PT2ArchiveReader(str(path))
        names = reader.get_file_names()
    except Exception as e:  # noqa: BLE001 - torch's reader raises RuntimeError/AssertionError for bad archives
        raise ModelError(f"{path} is not a readable torch.export archive ({_first_line(e)})") from None
    for name in names:
        if not _KNOWN.fullmatch(name):
            raise refuse(path, f"entry {name!r} (not a plain torch.export.save entry)")
    try:
        version = reader.read_string("archive_version")
    except Exception:  # noqa: BLE001
        raise refuse(path, "layout (an old archive without archive_version, stored as pickles)") from None
    from torch.export.pt2_archive._package import ARCHIVE_VERSION_VALUE
    if version != ARCHIVE_VERSION_VALUE:
        raise ModelError(f"{path}: archive version {version!r}, this torch reads {ARCHIVE_VERSION_VALUE!r}; "
                         "re-export it with this torch version")
    if "models/model.json" not in names:
        raise ModelError(f"{path} has no models/model.json; save it with torch.export.save(program, path)")
    return _deserialize(path, reader, "model", names)


def _deserialize(path, reader, model: str, names: list[str]):
    from torch._export.serde import schema
    from torch._export.serde.serialize import ExportedProgramDeserializer, _bytes_to_dataclass
    raw = reader.read_bytes(f"models/{model}.json")
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"{path}: models/{model}.json is not JSON ({e})") from None
    check_program_json(path, doc)
    state_dict = _tensors(path, reader, f"data/weights/{model}_weights_config.json", "data/weights/", names)
    constants = _tensors(path, reader, f"data/constants/{model}_constants_config.json", "data/constants/", names)
    sample = f"data/sample_inputs/{model}.pt"
    example_inputs = _safe_torch_load(path, reader.read_bytes(sample), "sample inputs") if sample in names else None
    if example_inputs is not None and not isinstance(example_inputs, (tuple, dict)):
        raise ModelError(f"{path}: sample inputs are a {type(example_inputs).__name__}, expected (args, kwargs)")
    try:
        serialized = _bytes_to_dataclass(schema.ExportedProgram, raw)
        program = ExportedProgramDeserializer().deserialize(serialized, state_dict, constants,
                                                            example_inputs or None)
    except ModelError:
        raise
    except Exception as e:  # noqa: BLE001 - the deserializer raises many types for a malformed program
        raise ModelError(f"{path}: the exported program does not deserialize ({_first_line(e)}); "
                         "re-export it with this torch version") from None
    check_graph_targets(path, program.graph_module)
    return program


# ---------------------------------------------------------------- checks before deserialization

def check_program_json(path, doc) -> None:
    """Every string the deserializer would evaluate or resolve is checked first: expressions (sympify
    evals them), node targets (resolved by getattr, then called by the graph) and argument names (they
    become keyword names in the Python code FX generates)."""
    if isinstance(doc, dict):
        for name in doc.get("range_constraints") or {}:
            check_expr(path, name)
    stack = [doc]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, dict):
            if "expr_str" in node:
                check_expr(path, node["expr_str"])
            if isinstance(node.get("target"), str) and isinstance(node.get("inputs"), list):  # a graph node
                check_target(path, node["target"])
                for arg in node["inputs"]:
                    name = arg.get("name") if isinstance(arg, dict) else None
                    if name and not (isinstance(name, str) and _NAME.fullmatch(name)):
                        raise ModelError(f"{path}: exported program names the argument {str(name)[:60]!r}, "
                                         "which is not an identifier; refused")
            stack.extend(node.values())


def check_expr(path, text) -> None:
    bare = _QUOTED_SYMBOL.sub("s0", text) if isinstance(text, str) else ""
    ok = isinstance(text, str) and "__" not in text and _EXPR_CHARS.fullmatch(bare) is not None
    if ok:
        for word in _EXPR_WORD.findall(bare):
            if not (_SYMBOL.fullmatch(word) or word in _EXPR_WORDS or word in _sympy_names()):
                ok = False
                break
    if not ok:
        raise ModelError(f"{path}: the exported program holds the shape expression {str(text)[:60]!r}, which "
                         "is not arithmetic on shape symbols (it would be evaluated as Python); refused")


def check_target(path, target: str) -> None:
    head = target.split(".")[0]
    if "__" in target or head not in ("torch", "_operator", "math") or \
            (head == "torch" and not target.startswith(("torch.ops.", "torch.sym_", "torch._sym_"))):
        raise ModelError(f"{path}: the exported program calls {target[:80]!r}, which is not a torch operator; "
                         "refused")


def _sympy_names() -> set[str]:
    """sympy's expression classes and torch's shape functions: symbolic, they compute nothing outside sympy."""
    import sympy
    import torch.utils._sympy.functions as fns
    names = {n for n in dir(fns) if n[:1].isupper()}
    names |= {n for n, v in vars(sympy).items() if isinstance(v, type) and issubclass(v, sympy.Basic)}
    return names


# ---------------------------------------------------------------- checks after

def check_graph_targets(path, graph_module) -> None:
    """What the graph will call: torch operators and the symbolic-shape helpers torch serializes, nothing else."""
    from torch._export.serde.serialize import _SYM_OPS
    from torch._ops import HigherOrderOperator, OpOverload, OpOverloadPacket
    allowed = set(_SYM_OPS) | {operator.getitem, math.trunc}
    for module in graph_module.modules():
        graph = getattr(module, "graph", None)
        for node in (graph.nodes if graph is not None else ()):
            if node.op in ("call_module", "call_method"):
                raise ModelError(f"{path}: exported graph has a {node.op} node {node.name!r}; refused")
            if node.op == "call_function" and not (
                    isinstance(node.target, (OpOverload, OpOverloadPacket, HigherOrderOperator))
                    or node.target in allowed):
                raise ModelError(f"{path}: the exported program calls {node.target!r}, which is not a torch "
                                 "operator; refused")


# ---------------------------------------------------------------- tensors

def _tensors(path, reader, config_name: str, folder: str, names: list[str]) -> dict:
    """FQN -> tensor, raw records as flat storages viewed with the recorded sizes and strides; a view
    larger than its record (a stride-0 weight that expands) is refused before anything is allocated."""
    from torch._export.serde.serialize import deserialize_scalar_type
    if config_name not in names:
        raise ModelError(f"{path}: {config_name} is missing; save the program with torch.export.save")
    try:
        config = json.loads(reader.read_bytes(config_name))["config"]
        items = config.items()
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ModelError(f"{path}: {config_name} is not a payload config") from None
    flat: dict[str, torch.Tensor] = {}
    out = {}
    for fqn, meta in items:
        try:
            record = folder + meta["path_name"]
            pickled = bool(meta.get("use_pickle"))
        except (TypeError, KeyError):
            raise ModelError(f"{path}: {config_name} entry {fqn!r} is malformed") from None
        if PurePosixPath(meta["path_name"]).name != meta["path_name"] or record not in names:
            raise ModelError(f"{path}: {config_name} names a missing record {meta['path_name']!r}")
        base = PurePosixPath(meta["path_name"]).name
        if not (base.startswith("weight_") or base.startswith("tensor_")):
            raise refuse(path, f"constant {fqn!r} ({base}: a pickled Python object, not a tensor)")
        if pickled:
            tensor = _safe_torch_load(path, reader.read_bytes(record), f"tensor {fqn!r}")
            if not isinstance(tensor, torch.Tensor):
                raise refuse(path, f"tensor {fqn!r} (a pickled {type(tensor).__name__})")
        else:
            tensor = _raw_tensor(path, reader, record, meta, flat, deserialize_scalar_type)
        if meta.get("is_param"):
            tensor = torch.nn.Parameter(tensor, requires_grad=bool(meta["tensor_meta"].get("requires_grad")))
        out[fqn] = tensor
    return out


def _ints(values) -> list[int]:
    return [int(v["as_int"]) for v in values]


def _raw_tensor(path, reader, record: str, meta: dict, flat: dict, scalar_type):
    try:
        tm = meta["tensor_meta"]
        dtype = scalar_type(tm["dtype"])
        sizes, strides = _ints(tm["sizes"]), _ints(tm["strides"])
        offset = int(tm["storage_offset"]["as_int"])
    except (TypeError, KeyError, ValueError):
        raise ModelError(f"{path}: tensor record {record} has no plain sizes/strides (symbolic or malformed)") \
            from None
    nbytes = reader.archive_file.get_record_size(record)
    elem = torch._utils._element_size(dtype)
    stored = nbytes // elem
    numel = math.prod(sizes)
    reach = offset + sum((s - 1) * st for s, st in zip(sizes, strides)) + 1 if numel else 0
    if nbytes % elem or min(sizes + strides + [offset], default=0) < 0 or reach > stored or numel > stored:
        raise ModelError(f"{path}: tensor record {record} declares {numel:,} elements of {dtype} "
                         f"(shape {sizes}) but stores {stored:,}; the file is corrupt or inflates; refused")
    if record not in flat:
        if nbytes:
            storage = reader.archive_file.get_storage_from_record(record, stored, dtype)
            flat[record] = torch.empty(0, dtype=dtype).set_(storage.untyped_storage(), 0, (stored,), (1,))
        else:
            flat[record] = torch.empty(0, dtype=dtype)
    return torch.as_strided(flat[record], sizes, strides, offset)


def _safe_torch_load(path, data: bytes, what: str):
    if not data:
        return None
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - weights_only refuses with UnpicklingError; anything else is bad data
        raise refuse(path, f"{what} ({_first_line(e)[:80] if 'eights only' not in str(e) else 'pickled objects'})") \
            from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
