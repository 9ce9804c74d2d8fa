"""Loading and saving models without running untrusted code.

Formats read (see README "Model files"):
- edgec model files (`edgec.model/1`, written by `prune`, `distill`, `demo`): architecture spec, input
  shape, module structure (channel counts after pruning) and weights; load with `weights_only=True`.
- checkpoints / state_dicts (bare, `{"state_dict": ...}`, `{"model": ...}`, the one tensor dict of a training
  checkpoint, `module.` prefixes) + `--arch`.
- TorchScript (`torch.jit.save`) and `torch.export` programs (`.pt2`).
- a fully pickled nn.Module only with `trust_pickle=True` (`--trust-pickle`).
"""
from __future__ import annotations

import collections
import importlib
import importlib.util
import pickle
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from edgec.core.errors import ModelError
from edgec.core.fsutil import atomic_path

MODEL_FORMAT = "edgec.model/1"
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "weights")
# Attributes that fix a module's shape: recorded so a pruned model is rebuilt from its spec, not unpickled.
_SHAPE_ATTRS = {
    nn.modules.conv._ConvNd: ("in_channels", "out_channels", "groups"),
    nn.modules.batchnorm._BatchNorm: ("num_features",),
    nn.Linear: ("in_features", "out_features"),
    nn.LayerNorm: ("normalized_shape",),
    nn.GroupNorm: ("num_groups", "num_channels"),
    nn.RNNBase: ("input_size", "hidden_size"),   # GRU/LSTM/RNN: every gate's weights follow these two
}


@dataclass
class LoadedModel:
    module: nn.Module
    kind: str                      # "edgec" | "checkpoint" | "torchscript" | "exported" | "pickle"
    path: Path
    arch: str | None = None        # architecture spec, when the model can be rebuilt from it
    input_shape: tuple | None = None
    meta: dict = field(default_factory=dict)  # history (prune/distill records), preprocess, ...

    @property
    def eager(self) -> bool:
        """Pruning and distillation (as student) need a plain eager module."""
        return self.kind in ("edgec", "checkpoint", "pickle")

    def describe(self) -> dict:
        return {"path": str(self.path), "kind": self.kind, "arch": self.arch,
                "input_shape": list(self.input_shape) if self.input_shape else None}


# ---------------------------------------------------------------- architecture specs

def _parse_value(text: str):
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def arch_is_builtin(spec: str) -> bool:
    """torchvision's and edgec's own architectures: building them runs no code from elsewhere."""
    source = spec.partition("?")[0].rpartition(":")[0]
    return source == "torchvision" or source == "edgec.models" or source.startswith("edgec.models.")


def build_arch(spec: str, *, sized: bool = False) -> nn.Module:
    """`torchvision:NAME[?k=v&...]`, `path/to/file.py:factory[?k=v]` or `package.module:factory[?k=v]`.

    The last two import (run) the named file or module and call the factory: only for code the user named."""
    if ":" not in spec:
        raise ModelError(f"--arch {spec!r} is not a spec; use torchvision:resnet18?num_classes=10, "
                         "path/to/file.py:factory or package.module:factory")
    target, _, query = spec.partition("?")
    kwargs = {}
    for item in filter(None, query.split("&")):
        key, eq, value = item.partition("=")
        if not eq or not key.isidentifier():
            raise ModelError(f"--arch {spec!r}: option {item!r} needs key=value")
        kwargs[key] = _parse_value(value)
    source, _, name = target.rpartition(":")
    if kwargs and arch_is_builtin(spec) and not sized:   # options read from a model file build without an
        _check_arch_size(spec)                           # opt-in: sized first
    if source == "torchvision":
        import torchvision
        try:
            return torchvision.models.get_model(name, weights=None, **kwargs)
        except ValueError:
            if name not in torchvision.models.list_models():
                known = ", ".join(torchvision.models.list_models()[:8])
                raise ModelError(f"--arch {spec!r}: torchvision has no model {name!r} (e.g. {known}, ...)") from None
            raise ModelError(f"--arch {spec!r}: bad option for {name}") from None
        except (TypeError, RuntimeError, AssertionError) as e:
            raise ModelError(f"--arch {spec!r}: bad option for {name}: {_first_line(e)}") from None
    factory = _load_factory(source, name, spec)
    try:
        model = factory(**kwargs)
    except (Exception, SystemExit) as e:  # noqa: BLE001 - the user's factory: any failure is theirs to fix
        raise ModelError(f"--arch {spec!r}: {name}({query}) raised {type(e).__name__}: {_first_line(e)}") from None
    if not isinstance(model, nn.Module):
        raise ModelError(f"--arch {spec!r}: {name}() returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _check_arch_size(spec: str) -> None:
    """A built-in architecture with options (`digits_cnn?width=20000`, from --arch or a model file's record) is
    built on the meta device first: weights that cannot fit are refused with the reason instead of the kernel
    killing the process mid-allocation."""
    from edgec.core.memory import available_mb
    query = spec.partition("?")[2]
    try:
        with torch.device("meta"):
            meta = build_arch(spec, sized=True)
    except Exception:  # noqa: BLE001 - a bad option: the real build gives the error
        return
    need = sum(t.numel() * t.element_size() for t in (*meta.parameters(), *meta.buffers()))
    avail, where = available_mb()
    if need > avail * 2 ** 20 / 2:
        raise ModelError(f"--arch {spec!r} builds {need / 1e9:,.1f} GB of weights, more than half of the "
                         f"{avail / 1024:,.1f} GB available ({where}); check its options ({query})")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _load_factory(source: str, name: str, spec: str):
    try:
        if source.endswith(".py"):
            path = Path(source)
            if not path.is_file():
                raise ModelError(f"--arch {spec!r}: file {source} not found")
            mod_spec = importlib.util.spec_from_file_location(f"edgec_arch_{path.stem}", path)
            module = importlib.util.module_from_spec(mod_spec)
            mod_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(source)
    except ModelError:
        raise
    except ImportError as e:
        raise ModelError(f"--arch {spec!r}: cannot import {source} ({e}); is it installed or on PYTHONPATH?") from None
    except (Exception, SystemExit) as e:  # noqa: BLE001 - the user's module failed while importing
        raise ModelError(f"--arch {spec!r}: importing {source} raised {type(e).__name__}: {_first_line(e)}") \
            from None
    factory = getattr(module, name, None)
    if not callable(factory):
        raise ModelError(f"--arch {spec!r}: {source} has no callable {name!r}")
    return factory


# ---------------------------------------------------------------- structure (pruned shapes)

def record_structure(model: nn.Module) -> dict:
    """Shape attributes of every module, so a pruned model can be rebuilt from its arch spec."""
    out = {}
    for name, module in model.named_modules():
        for cls, attrs in _SHAPE_ATTRS.items():
            if isinstance(module, cls):
                out[name] = {a: (list(v) if isinstance(v, tuple) else v)
                             for a in attrs for v in [getattr(module, a)]}
    return out


def apply_structure(model: nn.Module, structure: dict, state_dict: dict, path="model file") -> None:
    """Resize modules to the recorded shapes: set their attributes and re-create parameters and
    buffers with the saved tensors' shapes (values are loaded afterwards by load_state_dict).

    Pruning only removes channels, so a recorded shape may only shrink what the architecture builds: a larger
    one is refused before anything is allocated (a file could otherwise ask for gigabytes)."""
    if not isinstance(structure, dict):
        raise ModelError(f"{path}: its structure record is a {type(structure).__name__}, not a mapping; save it again")
    modules = dict(model.named_modules())
    for name, attrs in structure.items():
        module = modules.get(name)
        if module is None:
            raise ModelError(f"model file records module {name!r}, which the architecture does not have; "
                             "was it saved from a different --arch?")
        allowed = next((a for cls, a in _SHAPE_ATTRS.items() if isinstance(module, cls)), ())
        for attr, value in (attrs.items() if isinstance(attrs, dict) else [(None, attrs)]):
            if attr not in allowed or not _fits(value, getattr(module, attr)):
                raise ModelError(f"{path}: structure record {name}.{attr} = {str(value)[:40]} is not a channel "
                                 f"count this architecture can shrink to ({name} is {type(module).__name__}); refused")
        for attr, value in attrs.items():
            setattr(module, attr, tuple(value) if isinstance(value, list) else value)
    # every module's own tensors, not only the recorded layers': pruning also shrinks parameters that belong to no
    # layer (ConvNeXt's layer_scale, a class token) along with their group; the saved shape is their record
    for name, module in modules.items():
        prefix = f"{name}." if name else ""
        for pname, param in list(module.named_parameters(recurse=False)):
            saved = state_dict.get(prefix + pname)
            if saved is not None and saved.shape != param.shape:
                _no_growth(path, prefix + pname, saved, param)
                setattr(module, pname, nn.Parameter(torch.empty_like(saved), requires_grad=param.requires_grad))
        for bname, buf in list(module.named_buffers(recurse=False)):
            saved = state_dict.get(prefix + bname)
            if buf is not None and saved is not None and saved.shape != buf.shape:
                _no_growth(path, prefix + bname, saved, buf)
                module.register_buffer(bname, torch.empty_like(saved))


def _fits(value, built) -> bool:
    """A recorded shape attribute: positive ints, as many as the built one has, none larger."""
    values = value if isinstance(value, list) else [value]
    builts = list(built) if isinstance(built, (tuple, list)) else [built]
    return len(values) == len(builts) and all(
        type(v) is int and 0 < v <= b for v, b in zip(values, builts))


def _no_growth(path, name: str, saved: torch.Tensor, built: torch.Tensor) -> None:
    if saved.dim() != built.dim() or any(s > b for s, b in zip(saved.shape, built.shape)):
        raise ModelError(f"{path}: tensor {name} has shape {tuple(saved.shape)}, larger than the architecture's "
                         f"{tuple(built.shape)}; a pruned model only shrinks; refused")


def check_tensor_sizes(path, tensors: dict) -> None:
    """Every tensor's elements are really stored in the file: a view with more elements than its storage
    (stride 0 expanding one stored value to gigabytes) is refused before anything copies it."""
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor) or t.layout != torch.strided:
            continue
        stored = t.untyped_storage().nbytes() // max(t.element_size(), 1)
        if t.numel() > stored:
            raise ModelError(f"{path}: tensor {name} declares {t.numel():,} elements (shape {tuple(t.shape)}) but "
                             f"stores {stored:,}; the file inflates when loaded; refused")


def check_zip_sizes(path: Path) -> None:
    """torch writes its archives uncompressed: records that decompress far beyond the file's own size are a
    decompression bomb, refused before torch allocates them."""
    try:
        with zipfile.ZipFile(path) as zf:
            declared = sum(i.file_size for i in zf.infolist())
    except (zipfile.BadZipFile, OSError, ValueError):
        return  # not a readable zip: the loaders below give the error
    size = path.stat().st_size
    if declared > 2 * size + 2**20:
        raise ModelError(f"{path}: its records decompress to {declared / 1e6:,.0f} MB from a "
                         f"{size / 1e6:,.1f} MB file (torch saves uncompressed); refused as a decompression bomb")


# ---------------------------------------------------------------- loading

def _zip_names(path: Path) -> list[str] | None:
    try:
        with zipfile.ZipFile(path) as zf:
            return zf.namelist()
    except zipfile.BadZipFile:
        return None
    except OSError as e:
        raise ModelError(f"cannot read {path}: {e.strerror}") from None


def _tensor_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _unwrap_state_dict(obj, path):
    """The state_dict in a checkpoint: the object itself, a known wrapper key, or the one tensor dict among its
    values (a training checkpoint: {"step": .., "model_state": .., "optimizer_state": ..}, as Resemblyzer's)."""
    if isinstance(obj, dict) and not _tensor_dict(obj):
        inner = next((obj[k] for k in _WRAPPER_KEYS if _tensor_dict(obj.get(k))), None)
        if inner is None:
            found = [k for k, v in obj.items() if _tensor_dict(v)]
            if len(found) > 1:
                raise ModelError(f"{path} holds several state_dicts ({', '.join(map(str, found))}); save the one "
                                 f"to build alone: torch.save(ckpt[{found[0]!r}], 'weights.pt')")
            inner = obj[found[0]] if found else None
        obj = inner if inner is not None else obj
    if not _tensor_dict(obj):
        return None
    if all(k.startswith("module.") for k in obj):  # saved from DataParallel / DDP
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def load_weights(model: nn.Module, state_dict: dict, path, arch: str) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    wrong = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
             if k in state_dict and state_dict[k].shape != v.shape]
    loose = [k for k in unexpected if "." not in k]
    if loose and len(loose) == len(unexpected) and not missing and not wrong:
        # top-level tensors of no layer, with every layer's weights there: the training loss's own parameters
        # (Resemblyzer's GE2E similarity_weight/bias), which the model does not use; a layer's weight is never
        # dropped (resnet34's into resnet18 stays an error)
        from edgec.core.progress import note
        note(f"{path}: {len(loose)} tensor(s) that belong to no layer of --arch {arch} left out "
             f"({', '.join(loose[:4])}); every layer's weights loaded")
        state_dict = {k: v for k, v in state_dict.items() if k not in loose}
        unexpected = []
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if wrong:
            parts.append(f"{len(wrong)} with other shapes (e.g. {wrong[0]})")
        raise ModelError(f"{path} does not fit --arch {arch}: " + "; ".join(parts) +
                         "; check the architecture and its options (e.g. ?num_classes=)")
    if getattr(state_dict, "_metadata", None) is None:
        # a plain dict (as edgec files store it) has no module versions: those of the modules just built, or
        # a versioned module (torchvision's MNASNet) refuses to load ("version should be set to 1 or 2")
        state_dict = collections.OrderedDict(state_dict)
        state_dict._metadata = getattr(own, "_metadata", None)
    model.load_state_dict(state_dict)


def load_model(path, arch: str | None = None, *, trust_pickle: bool = False,
               input_shape: tuple | None = None) -> LoadedModel:
    """Load any supported model file; never unpickles arbitrary objects unless trust_pickle. torch's loaders warn
    about their own deprecations and a file's pickle protocol: not the user's to act on, and a second line on
    stderr in front of the one error line; silenced while loading."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = _load_model(Path(path), arch, trust_pickle, input_shape)
    check_finite_weights(loaded.path, loaded.module)
    return loaded


def check_finite_weights(path, module: nn.Module) -> None:
    """NaN or Inf in a weight (a diverged training, a corrupt file) is refused at load: such a model exported,
    quantized and was scored as if fine, or failed later as "ONNX Runtime disagrees with torch". Buffers may
    hold -inf on purpose (attention masks): only NaN counts there."""
    for kind, tensors, bad in (("weight", module.named_parameters(), lambda t: ~torch.isfinite(t)),
                               ("buffer", module.named_buffers(), torch.isnan)):
        for name, t in tensors:
            if t.is_floating_point() and t.layout == torch.strided and t.numel():
                count = int(bad(t.detach()).sum())
                if count:
                    raise ModelError(f"{path}: {kind} {name} holds {count:,} NaN/Inf value(s) of {t.numel():,}; "
                                     "the model is corrupt or its training diverged: retrain or restore it")


def _load_model(path: Path, arch: str | None, trust_pickle: bool, input_shape: tuple | None) -> LoadedModel:
    if not path.exists():
        raise ModelError(f"model file {path} not found")
    if path.is_dir():
        raise ModelError(f"{path} is a folder; pass a model file (.pt, .pth, .pt2)")
    if path.stat().st_size == 0:
        raise ModelError(f"{path} is empty; re-save the model")
    names = _zip_names(path)
    if names is not None:
        check_zip_sizes(path)
        if any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names):
            _no_arch(path, arch, "TorchScript")
            return _load_torchscript(path, input_shape)
        if any(n.endswith("serialized_exported_program.json") or "/models/" in n and n.endswith(".json")
               for n in names):
            _no_arch(path, arch, "torch.export")
            return _load_exported(path, input_shape, trust_pickle)
    elif zipfile.is_zipfile(path) is False and _looks_truncated_zip(path):
        raise ModelError(f"{path} is truncated or corrupt (incomplete zip archive); copy or save it again")
    else:
        _refuse_onnx(path)
    obj = _torch_load(path, trust_pickle)
    if isinstance(obj, nn.Module):  # only reachable with trust_pickle
        return LoadedModel(obj.eval(), "pickle", path, arch=arch, input_shape=input_shape)
    if isinstance(obj, dict) and obj.get("format") == MODEL_FORMAT:
        return _from_edgec_dict(obj, path, input_shape, arch)
    state_dict = _unwrap_state_dict(obj, path)
    if state_dict is None:
        keys = f" (keys: {', '.join(map(str, list(obj)[:8]))})" if isinstance(obj, dict) and obj else ""
        raise ModelError(f"{path} holds a {type(obj).__name__}{keys}, not a model, checkpoint or state_dict")
    check_tensor_sizes(path, state_dict)
    if arch is None:
        raise ModelError(f"{path} is a state_dict (weights only); pass --arch, e.g. "
                         "--arch torchvision:resnet18?num_classes=10 or --arch my_model.py:build")
    model = build_arch(arch)
    load_weights(model, state_dict, path, arch)
    return LoadedModel(model.eval(), "checkpoint", path, arch=arch, input_shape=input_shape)


def _no_arch(path: Path, arch: str | None, kind: str) -> None:
    if arch is not None:
        raise ModelError(f"{path} is a {kind} file, which carries its own architecture; drop --arch {arch!r} "
                         "(--arch is for checkpoints and state_dicts)")


def _weights_only_reason(e: Exception) -> str:
    """torch's weights-only refusal is a paragraph of advice around one line that says what it met."""
    lines = [s.strip() for s in str(e).splitlines() if s.strip()]
    told = [s for s in lines if s.startswith(("Unsupported", "invalid", "Trying to load"))]
    return (told or lines or [type(e).__name__])[0][:200]


def _refuse_onnx(path: Path) -> None:
    """An ONNX file given where a PyTorch model is needed: say which command takes it. Only a file that starts as
    a ModelProto does (field 1, ir_version, a varint: byte 0x08) is parsed: a pickle is never read twice."""
    with open(path, "rb") as f:
        if f.read(1) != b"\x08":
            return
    try:
        import onnx
        proto = onnx.load_model(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - not ONNX either: the torch loader gives the error
        return
    if len(proto.graph.node):
        raise ModelError(f"{path} is an ONNX model, not a PyTorch one; pruning, distillation and export need the "
                         f"PyTorch model, so pass that, or INT8-package the ONNX file with `edgec quantize {path} "
                         "--data DATA`")


def _looks_truncated_zip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def _torch_load(path: Path, trust_pickle: bool):
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as e:
        # torch says "Weights only load failed" for any byte stream it refuses; only a refused GLOBAL (a class
        # or function to import) is a pickle that could run code. Other bytes are simply not a torch file.
        if "GLOBAL" in str(e) or "global" in str(e):
            raise ModelError(
                f"{path} contains pickled Python objects (e.g. a whole nn.Module), which could run code; "
                "save model.state_dict() and pass --arch, or pass --trust-pickle if you trust this file") from None
        raise ModelError(f"{path} is not a PyTorch model file ({_weights_only_reason(e)}); expected a file from "
                         "torch.save, torch.jit.save or torch.export.save") from None
    except Exception as e:  # noqa: BLE001 - torch.load raises many types for a file that is not its own
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "zip" in first.lower() or "central directory" in first.lower() or isinstance(e, EOFError):
            raise ModelError(f"{path} is truncated or corrupt ({first}); copy or save it again") from None
        raise ModelError(f"{path} is not a PyTorch model file ({type(e).__name__}: {first}); expected a file "
                         "from torch.save, torch.jit.save or torch.export.save") from None


def _load_torchscript(path: Path, input_shape) -> LoadedModel:
    try:
        module = torch.jit.load(str(path), map_location="cpu")
    except Exception as e:  # noqa: BLE001 - torch raises many types for a bad archive
        # the first line of torch's message is often empty ("\nUnknown type name 'posix.system':\n...")
        why = " ".join(str(e).split())[:200] or type(e).__name__
        raise ModelError(f"{path} looks like TorchScript but does not load ({why}); save it again with "
                         "torch.jit.save, or pass a state_dict with --arch") from None
    return LoadedModel(module.eval(), "torchscript", path, input_shape=input_shape)


def _load_exported(path: Path, input_shape, trust_pickle: bool) -> LoadedModel:
    from edgec.pt2 import load_exported_program
    try:
        program = load_exported_program(path, trust_pickle)
    except ModelError:
        raise
    except Exception as e:  # noqa: BLE001 - only with --trust-pickle: torch.export.load's own errors
        raise ModelError(f"{path} looks like a torch.export program but does not load "
                         f"({' '.join(str(e).split())[:200] or type(e).__name__})") from None
    if input_shape is None:
        args = program.example_inputs[0] if program.example_inputs else ()
        if args and isinstance(args[0], torch.Tensor):
            input_shape = (1, *args[0].shape[1:])
    return LoadedModel(program.module(), "exported", path, input_shape=input_shape)


def _from_edgec_dict(obj: dict, path: Path, input_shape, given_arch: str | None = None) -> LoadedModel:
    arch = obj.get("arch")
    if not isinstance(arch, str):
        raise ModelError(f"{path} is an edgec model file without an architecture spec; save it again")
    if given_arch is not None and given_arch != arch:
        raise ModelError(f"{path} records its own architecture {arch!r}; drop --arch {given_arch!r} "
                         "(an edgec model file is rebuilt from its own spec)")
    if given_arch is None and not arch_is_builtin(arch):
        raise ModelError(f"{path} records the architecture {arch!r}, which imports and runs code from outside "
                         f"torchvision and edgec; if you trust it, pass --arch '{arch}' to allow it")
    state_dict = obj.get("state_dict")
    if not (isinstance(state_dict, dict) and all(isinstance(v, torch.Tensor) for v in state_dict.values())):
        raise ModelError(f"{path} is an edgec model file without a state_dict of tensors; save it again")
    check_tensor_sizes(path, state_dict)
    model = build_arch(arch)
    apply_structure(model, obj.get("structure", {}), state_dict, path)
    load_weights(model, state_dict, path, arch)
    stored = obj.get("input_shape")
    if stored is not None and not (isinstance(stored, list) and 2 <= len(stored) <= 8 and
                                   all(type(d) is int and 0 < d <= 2**20 for d in stored)):
        raise ModelError(f"{path}: its input_shape {str(stored)[:40]} is not a list of positive sizes; "
                         "pass --input-shape or save it again")
    shape = input_shape or (tuple(stored) if stored else None)
    return LoadedModel(model.eval(), "edgec", path, arch=arch, input_shape=shape,
                       meta={k: obj[k] for k in ("history", "preprocess", "metrics") if k in obj})


def save_model(path, model: nn.Module, arch: str, input_shape, *, history=(), preprocess=None,
               metrics=None, force: bool = False) -> Path:
    """Write an `edgec.model/1` file: rebuildable from `arch` + structure, loadable with weights_only=True."""
    obj = {
        "format": MODEL_FORMAT,
        "arch": arch,
        "input_shape": [int(d) for d in input_shape] if input_shape else None,
        "structure": record_structure(model),
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "history": list(history),
    }
    if preprocess:
        obj["preprocess"] = preprocess
    if metrics:
        obj["metrics"] = metrics
    with atomic_path(path, force=force) as tmp:
        torch.save(obj, tmp)
    return Path(path)
