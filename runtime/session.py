"""Open a model for benchmarking: a plain `.onnx` file or a package folder `NAME.edgec/` (model.onnx + manifest.json).
Input names, shapes and dtypes come from the ONNX Runtime session itself; dynamic dimensions are filled from
--shape, --batch or the package manifest, and every mismatch is a one-line error before anything runs."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edgec.core.errors import DataError, ModelError, OptionError, VerifyError, ort_load_error
from edgec.core.feeds import ORT_DTYPES
from edgec.core.package import MANIFEST_FILE, MODEL_FILE, Manifest, file_record, read_manifest
from edgec.runtime import providers as eps

DTYPES = ORT_DTYPES  # ORT type string -> numpy dtype


@dataclass
class ModelFile:
    label: str                      # what tables and JSON call it: the file or package name
    onnx_path: Path
    package: Path | None = None     # the NAME.edgec folder, when it is one
    manifest: Manifest | None = None

    @property
    def manifest_path(self) -> Path | None:
        return self.package / MANIFEST_FILE if self.package else None


def open_model(path) -> ModelFile:
    p = Path(path)
    if not p.exists():
        raise ModelError(f"model not found: {p}; pass a .onnx file or a NAME.edgec package folder")
    if p.is_dir():
        onnx_path = p / MODEL_FILE
        if onnx_path.is_symlink():   # a package holds its own files: running it reads nothing outside it
            raise ModelError(f"{p}: {MODEL_FILE} is a symlink (to {os.readlink(onnx_path)}); a package holds its "
                             "own files only: bench the target file itself, or rebuild the package")
        if not onnx_path.is_file():
            raise ModelError(f"{p} is a folder without {MODEL_FILE}, so not an edgec package; "
                             f"build one with `edgec build` or pass the .onnx file")
        manifest = None
        if (p / MANIFEST_FILE).exists():
            try:
                manifest = read_manifest(p)
            except VerifyError as e:   # here the package is a model to run: a bad one is a model error
                raise ModelError(str(e)) from None
            _check_listed_model(p, onnx_path, manifest)
        return ModelFile(p.name, onnx_path, p, manifest)
    return ModelFile(p.name, p)


def _check_listed_model(folder: Path, onnx_path: Path, manifest: Manifest) -> None:
    """The model file a package's manifest describes (its shapes, its --record entry) is the one measured: a
    swapped or corrupted model.onnx is refused here (`edgec verify` checks every file and the signature)."""
    expected = manifest.files.get(MODEL_FILE)
    if expected is None:
        return
    try:
        got = file_record(onnx_path, follow_symlinks=False)
    except OSError as e:
        raise ModelError(f"{onnx_path} cannot be read ({e.strerror})") from None
    if got != expected:
        what = "size" if got.bytes != expected.bytes else "sha256"
        raise ModelError(f"{folder}: {MODEL_FILE} does not match its manifest ({what} differs): it was modified or "
                         f"corrupted; rebuild or restore it (`edgec verify {folder}` checks every file)")


@dataclass
class InputInfo:
    name: str
    shape: list            # as the model declares it: ints, or str/None for dynamic dims
    dtype: str             # ORT type string, e.g. tensor(float)


def create_session(model: ModelFile, providers: list[str], options: ort.SessionOptions,
                   provider_options: list[dict] | None = None) -> tuple[ort.InferenceSession, float]:
    """-> (session, load time in ms). Load time covers parsing, graph optimisation and kernel setup."""
    t0 = time.perf_counter()
    try:
        sess = ort.InferenceSession(str(model.onnx_path), sess_options=options, providers=providers,
                                    provider_options=provider_options)
    except Exception as e:  # ORT raises its own pybind types (InvalidProtobuf, Fail, InvalidGraph, ...)
        raise ort_load_error(model.onnx_path, e) from None
    if not sess.get_outputs():
        raise ModelError(f"{model.onnx_path} declares no outputs, so running it computes nothing; export the model "
                         "with its outputs")
    return sess, (time.perf_counter() - t0) * 1e3


def inputs_of(sess: ort.InferenceSession) -> list[InputInfo]:
    return [InputInfo(i.name, list(i.shape), i.type) for i in sess.get_inputs()]


def parse_shape_option(text: str, input_names: list[str]) -> tuple[str, list[int]]:
    """'name=1,3,32,32' (or '1,3,32,32' for a single-input model) -> (name, dims)."""
    name, sep, dims = text.rpartition("=")
    if not sep:
        if len(input_names) != 1:
            raise OptionError(f"--shape {text} does not name an input; this model has {', '.join(input_names)}: "
                              f"write --shape NAME=1,3,224,224")
        name = input_names[0]
    try:
        shape = [int(d) for d in dims.replace("x", ",").split(",")]
    except ValueError:
        raise OptionError(f"--shape {text} is not a list of integers; write e.g. --shape input=1,3,224,224") from None
    if any(d < 1 for d in shape):
        raise OptionError(f"--shape {text} has a dimension below 1; every dimension must be positive")
    return name, shape


def resolve_shapes(model: ModelFile, inputs: list[InputInfo], shapes: dict[str, list[int]] | list[str] | None,
                   batch: int | None) -> dict[str, list[int]]:
    """Concrete shape per input; `shapes` maps name -> dims or is a list of --shape strings. Priority: --shape, then the manifest, then the model; a dynamic leading
    dimension takes --batch (default 1). Fixed dimensions must match exactly."""
    names = [i.name for i in inputs]
    if shapes and not isinstance(shapes, dict):   # raw --shape strings, parsed now that the input names are known
        shapes = dict(parse_shape_option(text, names) for text in shapes)
    shapes = dict(shapes or {})
    unknown = set(shapes) - {i.name for i in inputs}
    if unknown:
        raise OptionError(f"--shape names {', '.join(sorted(unknown))}, which {model.label} does not have; "
                          f"its inputs are {', '.join(i.name for i in inputs)}")
    from_manifest = model.manifest.input_shapes() if model.manifest is not None else {}
    out = {}
    for inp in inputs:
        declared = inp.shape
        given = shapes.get(inp.name)
        if given is not None:
            if len(given) != len(declared):
                raise DataError(f"--shape {inp.name}={','.join(map(str, given))} has {len(given)} dims but input "
                                f"'{inp.name}' of {model.label} has {len(declared)} ({_fmt(declared)})")
            if batch is not None and given and given[0] != batch:
                raise OptionError(f"--batch {batch} contradicts --shape {inp.name}={','.join(map(str, given))}; "
                                  f"give the batch in one place")
        else:
            hint = from_manifest.get(inp.name)
            given = []
            for axis, d in enumerate(declared):
                if isinstance(d, int) and d > 0:
                    given.append(batch if axis == 0 and batch is not None else d)
                elif axis == 0:
                    given.append(batch or 1)
                elif hint and len(hint) == len(declared) and isinstance(hint[axis], int) and hint[axis] > 0:
                    given.append(hint[axis])
                else:   # the sizes it runs at are the user's to say: a detector at 1x1 pixels measures nothing
                    dims = [str(x) if isinstance(x, int) and x > 0 else "1" if i == 0 else (str(x) if x else f"D{i}")
                            for i, x in enumerate(declared)]
                    free = [x for i, x in enumerate(dims) if i and not x.isdigit()]
                    raise DataError(f"input '{inp.name}' of {model.label} has a dynamic dimension '{d}' at axis "
                                    f"{axis} ({_fmt(declared)}); pass --shape {inp.name}={','.join(dims)} with the "
                                    f"size{'s' if len(free) > 1 else ''} it runs at for {', '.join(free)}")
        for axis, (d, g) in enumerate(zip(declared, given)):
            if isinstance(d, int) and d > 0 and d != g:
                raise DataError(f"input '{inp.name}' of {model.label} is {_fmt(declared)} but the requested shape "
                                f"{_fmt(given)} has {g} at axis {axis}; fix --shape/--batch to match the model")
        out[inp.name] = given
    return out


def random_inputs(inputs: list[InputInfo], shapes: dict[str, list[int]], seed: int = 0) -> dict[str, np.ndarray]:
    """Random data of the right dtype and shape. Latency of dense models does not depend on the values; integer
    inputs get 0/1 so that index-like inputs (token ids, gather indices) stay in range."""
    rng = np.random.default_rng(seed)
    feed = {}
    _check_feed_fits(inputs, shapes)
    for inp in inputs:
        dtype = DTYPES.get(inp.dtype)
        if dtype is None:
            raise DataError(f"input '{inp.name}' has type {inp.dtype}, which edgec bench cannot generate data for")
        shape = shapes[inp.name]
        # drawn in the input's own width: via float64/int64 a 4 GB float32 input peaked at 12 GB
        if np.issubdtype(dtype, np.floating):
            wide = dtype if dtype in (np.float32, np.float64) else np.float32
            feed[inp.name] = rng.standard_normal(shape, dtype=wide).astype(dtype, copy=False)
        elif dtype == np.bool_:
            feed[inp.name] = rng.integers(0, 2, size=shape, dtype=np.uint8).astype(np.bool_)
        else:
            feed[inp.name] = rng.integers(0, 2, size=shape, dtype=dtype)
    return feed


def _check_feed_fits(inputs: list[InputInfo], shapes: dict[str, list[int]]) -> None:
    """Inputs (and so activations) scale with --batch/--shape: refuse what cannot fit before allocating it."""
    need = sum(int(np.prod(shapes[i.name], dtype=np.float64)) * np.dtype(DTYPES.get(i.dtype, np.float32)).itemsize
               for i in inputs)
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return  # no figure on this platform: let the allocation decide
    if need > avail / 4:  # the activations of a batch are several times its inputs
        raise OptionError(f"inputs of {need / 1e9:,.1f} GB at shapes {shapes} do not fit in the "
                          f"{avail / 1e9:,.1f} GB of memory available; use a smaller --batch or --shape")


def _fmt(shape) -> str:
    return "[" + ",".join(str(d) if d not in (None, "") else "?" for d in shape) + "]"


@dataclass
class LoadedModel:
    model: ModelFile
    ep: str
    session: ort.InferenceSession
    load_ms: float
    inputs: list[InputInfo]
    feed: dict[str, np.ndarray]

    @property
    def batch(self) -> int:
        first = next(iter(self.feed.values()), None)
        return int(first.shape[0]) if first is not None and first.ndim else 1


def load(model: ModelFile, ep: str, threads: int | None = None, shapes: dict[str, list[int]] | list[str] | None = None,
         batch: int | None = None, opt_level: str = "all", profile_prefix: str | None = None,
         spinning: bool = True) -> LoadedModel:
    """Create the session for `ep` (a short name) and the input feed; check the provider really started."""
    name, chain = eps.resolve(ep)
    sess, load_ms = create_session(model, chain, eps.session_options(threads, opt_level, profile_prefix, spinning))
    eps.check_session_providers(name, sess)
    inputs = inputs_of(sess)
    feed = random_inputs(inputs, resolve_shapes(model, inputs, shapes, batch))
    return LoadedModel(model, name, sess, load_ms, inputs, feed)
