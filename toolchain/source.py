"""The Source: the user's model, data and input spec, loaded and checked once before any work starts, then
handed to every stage (build, compare's recipes, export, distill) instead of being copied field by field."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from edgec.core.errors import DataError, ModelError, OptionError
from edgec.core.progress import note
from edgec.data import Dataset, load_data, split
from edgec.modelio import LoadedModel, load_model

DEFAULT_DATA = "builtin:digits"
EVAL_FRACTION = 0.2        # held out of --data when no --eval-data is given
VALIDATION_FRACTION = 0.1  # held out of the training data to pick the best epoch (never the eval data)
RANDOM_SAMPLES = 64        # export check of a self-describing model file given no --data


def parse_shape(text: str | None) -> tuple | None:
    if not text:
        return None
    try:
        shape = tuple(int(d) for d in text.replace("x", ",").split(","))
    except ValueError:
        raise OptionError(f"--input-shape {text!r}: expected integers like 1,3,224,224") from None
    if len(shape) < 2 or any(d <= 0 for d in shape):
        raise OptionError(f"--input-shape {text!r}: expected a batch and at least one positive dimension")
    return shape


@dataclass(frozen=True)
class SourceSpec:
    """What the user named: the model file and how to read it, the data and how to preprocess it."""
    model: str
    arch: str | None = None
    trust_pickle: bool = False
    input_shape: tuple | None = None
    data: str | None = None        # None: builtin:digits (export of a self-describing file: its recorded shape)
    eval_data: str | None = None
    image_size: int | None = None  # None: from the model file's recorded input shape, else 224
    mean: tuple | None = None
    std: tuple | None = None

    def to_json(self) -> dict:
        return {**asdict(self), "model": str(Path(self.model).resolve())}


@dataclass
class Source:
    spec: SourceSpec
    model: LoadedModel
    input_shape: tuple
    calib: Dataset
    eval: Dataset | None
    num_outputs: int

    @property
    def check_data(self) -> Dataset:
        """What measures quality: the held-out eval data, else the calibration data."""
        return self.eval if self.eval is not None else self.calib

    def example(self):
        import torch
        return torch.from_numpy(self.calib.head(1))

    @cached_property
    def fingerprint(self) -> str:
        """Hash of what every artifact depends on: the model file's bytes and the spec (cache keys)."""
        from edgec.core.package import file_record
        spec = {**self.spec.to_json(), "model": file_record(self.model.path).sha256,
                "input_shape": list(self.input_shape), "data": [_stamp(p) for p in (self.spec.data, self.spec.eval_data)]}
        return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()


def _stamp(spec: str | None):
    """A data spec with the size and time of the file or folder it names: changed data, other cache keys."""
    if spec is None or not Path(spec).exists():
        return spec
    st = Path(spec).stat()
    return [spec, st.st_size, st.st_mtime_ns]


def image_size_for(spec: SourceSpec, loaded: LoadedModel) -> int | None:
    """An image folder's size: --image-size, else the square side of the model file's recorded input shape."""
    shape = loaded.input_shape
    if spec.image_size is None and shape is not None and len(shape) == 4 and shape[2] == shape[3]:
        return int(shape[3])
    return spec.image_size


def _random_data(shape: tuple) -> Dataset:
    x = np.random.default_rng(0).standard_normal((RANDOM_SAMPLES, *shape[1:])).astype(np.float32)
    return Dataset(x, None, f"random:normal{tuple(shape[1:])}", {})


def load_source(spec: SourceSpec, *, random_ok: bool = False) -> Source:
    """Load and validate model and data before any work starts. random_ok: with no --data, a model file that
    records its input shape is checked on random inputs of that shape (export needs no real samples)."""
    loaded = load_model(spec.model, spec.arch, trust_pickle=spec.trust_pickle, input_shape=spec.input_shape)
    if spec.data is None and random_ok and loaded.input_shape is not None:
        calib = _random_data(loaded.input_shape)
        note(f"no --data: checking on {RANDOM_SAMPLES} random inputs of the recorded shape "
             f"{'x'.join(map(str, loaded.input_shape))}")
    else:
        kw = dict(image_size=image_size_for(spec, loaded), mean=spec.mean, std=spec.std)
        calib = load_data(spec.data or DEFAULT_DATA, **kw)
    shape = loaded.input_shape or (1, *calib.sample_shape)
    _validate(calib, shape, spec)
    if spec.eval_data:
        evaluation = load_data(spec.eval_data, image_size=image_size_for(spec, loaded), mean=spec.mean, std=spec.std)
    elif calib.source == "builtin:digits:train":
        evaluation = load_data("builtin:digits:test")
    elif calib.labelled and len(calib) >= 10:
        calib, evaluation = split(calib, EVAL_FRACTION)
        note(f"no --eval-data: holding out {len(evaluation)} of {calib.source}'s samples for evaluation")
    else:
        evaluation = None
    num_outputs, ndim = _probe(loaded, calib)
    if evaluation is not None:
        _validate(evaluation, shape, spec, num_classes=num_outputs if ndim == 2 else None)
    return Source(spec, loaded, shape, calib, evaluation, num_outputs)


def _validate(data: Dataset, shape: tuple, spec: SourceSpec, num_classes: int | None = None) -> None:
    try:
        data.validate(shape, num_classes=num_classes)
    except DataError as e:
        want = tuple(shape[1:])
        if data.preprocess.get("center_crop") and len(want) == 3 and want[1] == want[2] \
                and want[1] != data.sample_shape[-1]:  # an image folder at the wrong size: name the fix
            raise DataError(f"{data.source}: images are {data.sample_shape[-1]} px, the model expects "
                            f"{'x'.join(map(str, want))}; pass --image-size {want[1]}") from None
        raise e


def _probe(loaded: LoadedModel, calib: Dataset) -> tuple[int, int]:
    """(size of the first output's last axis, its rank) from one real sample: data and model must fit."""
    import torch
    example = torch.from_numpy(calib.head(1))
    try:
        with torch.no_grad():
            out = loaded.module(example)
    except Exception as e:  # noqa: BLE001 - any failure here means data and model do not fit
        raise DataError(f"the model fails on a sample of shape {tuple(example.shape)} from {calib.source} "
                        f"({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                        "check --input-shape/--image-size") from None
    out = out[0] if isinstance(out, (tuple, list)) else out
    return int(out.shape[-1]), out.ndim


def training_split(calib: Dataset) -> tuple[Dataset, Dataset | None]:
    """(train, validation): the best epoch is picked on data held out of training, not on the eval data
    whose accuracy is reported. Unlabelled or tiny data: no validation, the last epoch is kept."""
    if not calib.labelled or len(calib) < 50:
        return calib, None
    return split(calib, VALIDATION_FRACTION)


def require_eager(loaded: LoadedModel, what: str) -> None:
    """The one refusal for pruning/training a model that cannot be changed (same message, same exit code)."""
    if not loaded.eager:
        raise ModelError(f"{what} needs an eager model (a checkpoint + --arch or an edgec model file); "
                         f"{loaded.path} is {loaded.kind}")
