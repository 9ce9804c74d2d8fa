"""The Source: the user's model, data and input spec, loaded and checked once before any work starts, then
handed to every stage (build, compare's recipes, export, distill) instead of being copied field by field."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from edgec.core.errors import DataError, ModelError, cause_line
from edgec.core.progress import note
from edgec.data import DEFAULT_KEY, Dataset, check_memory, load_data, split
from edgec.inputspec import apply_overrides, declared_inputs, dynamic_from_data, example_args, legacy_shape
from edgec.modelio import LoadedModel, load_model

DEFAULT_DATA = "builtin:digits"
EVAL_FRACTION = 0.2        # held out of --data when no --eval-data is given
VALIDATION_FRACTION = 0.1  # held out of the training data to pick the best epoch (never the eval data)
RANDOM_SAMPLES = 64        # export check of a self-describing model file given no --data
MIN_CALIBRATION_SAMPLES = 32  # the calibration check's own minimum (exporters.calibration.check_samples)


@dataclass(frozen=True)
class SourceSpec:
    """What the user named: the model file and how to read it, the data and how to preprocess it."""
    model: str
    arch: str | None = None
    trust_pickle: bool = False
    input_shape: tuple | dict | None = None   # one shape, or {input name: dims} (edgec.inputspec)
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
    input_shape: tuple | None   # a single-input model's shape at batch 1 (FLOPs, model files); None: several
    calib: Dataset
    eval: Dataset | None
    num_outputs: int
    specs: list = field(default_factory=list)   # edgec.core.feeds.InputSpec per model input, completed from data
    output_names: list = field(default_factory=list)   # as exported: what --task/--label-output name
    checks: object = None                               # edgec.exporters.metrics.CheckOptions

    @property
    def check_data(self) -> Dataset:
        """What measures quality: the held-out eval data, else the calibration data."""
        return self.eval if self.eval is not None else self.calib

    def example(self) -> tuple:
        """Positional torch arguments of one real sample, in the model's input order."""
        return example_args(self.calib.head(1), self.specs)

    def sample_shapes(self) -> dict:
        """{input: dims} of one real sample (the data's sequence lengths): what the benchmark times."""
        return {k: list(v.shape) for k, v in self.calib.head(1).items()}

    @cached_property
    def fingerprint(self) -> str:
        """Hash of what every artifact depends on: the model file's bytes and the spec (cache keys)."""
        from edgec.core.package import file_record
        spec = {**self.spec.to_json(), "model": file_record(self.model.path).sha256,
                "specs": [str(s) for s in self.specs], "data": [_stamp(p) for p in (self.spec.data, self.spec.eval_data)]}
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
    return Dataset({DEFAULT_KEY: x}, None, f"random:normal{tuple(shape[1:])}", {})


def load_source(spec: SourceSpec, *, checks=None, random_ok: bool = False) -> Source:
    """Load and validate model and data before any work starts; `checks` (edgec.exporters.metrics.CheckOptions)
    name outputs, checked here too. random_ok: with no --data, a model file that records its input shape is
    checked on random inputs of that shape (export needs no real samples)."""
    import torch
    from edgec.exporters.metrics import CheckOptions, check_labels, check_names
    from edgec.exporters.onnx_export import default_output_names
    checks = checks if checks is not None else CheckOptions()
    checks.validate()
    one_shape = legacy_shape(spec.input_shape) if isinstance(spec.input_shape, tuple) else None
    loaded = load_model(spec.model, spec.arch, trust_pickle=spec.trust_pickle, input_shape=one_shape)
    if spec.data is None and random_ok and loaded.input_shape is not None:
        calib = _random_data(loaded.input_shape)
        note(f"no --data: checking on {RANDOM_SAMPLES} random inputs of the recorded shape "
             f"{'x'.join(map(str, loaded.input_shape))}")
    else:
        calib = load_data(spec.data or DEFAULT_DATA, image_size=image_size_for(spec, loaded), mean=spec.mean,
                          std=spec.std)
    bound = _bind(calib, apply_overrides(declared_inputs(loaded), spec.input_shape))
    specs = dynamic_from_data(bound.specs, calib)
    calib.specs = specs
    shape = (loaded.input_shape or legacy_shape(specs[0].shape)) if len(specs) == 1 else None
    if spec.eval_data:
        evaluation = load_data(spec.eval_data, image_size=image_size_for(spec, loaded), mean=spec.mean, std=spec.std)
    elif calib.source == "builtin:digits:train":
        evaluation = load_data("builtin:digits:test")
    elif calib.labelled and len(calib) >= 10:
        calib, evaluation = split(calib, EVAL_FRACTION)
        note(f"no --eval-data: holding out {len(evaluation)} of {calib.source}'s samples for evaluation")
    else:
        evaluation = None
    if not random_ok:  # everything but export calibrates on this data
        held_out = len(evaluation) if evaluation is not None and evaluation.source == calib.source \
            and not spec.eval_data else 0
        check_calibration_size(calib, held_out=held_out)
    example = example_args(calib.head(1), specs)
    try:
        with torch.no_grad():
            out = out_all = loaded.module(*example)
    except Exception as e:  # noqa: BLE001 - any failure here means data and model do not fit
        shapes = ", ".join(f"{s.name} {tuple(t.shape)} {str(t.dtype).replace('torch.', '')}"
                           for s, t in zip(specs, example))
        raise DataError(f"the model fails on a sample ({shapes}) from {calib.source} "
                        f"({cause_line(e)}); check --input-shape/--image-size") from None
    out = out[0] if isinstance(out, (tuple, list)) else out
    num_outputs = int(out.shape[-1]) if out.ndim else 1
    outs = out_all if isinstance(out_all, (tuple, list)) else (out_all,)
    names = default_output_names(len(outs))
    # --task/--label-output name real outputs, and labels apply to a named one: checked before any long work
    scored = evaluation if evaluation is not None else calib
    label_output = check_names(names, checks, scored.y is not None, list(scored.named))
    for data in {id(d): d for d in (calib, evaluation) if d is not None and d.classes is None}.values():
        # labels the user saved (npz, hook) must fit the output they are tied to; a class folder's are implicit
        check_labels(names, [tuple(o.shape[1:]) for o in outs], data.labels, checks)
    if evaluation is not None:
        given = checks.tasks.get(label_output, checks.tasks.get("")) if label_output else None
        labelled_out = outs[names.index(label_output)] if given == "classify" else None
        _bind(evaluation, specs, num_classes=int(labelled_out.shape[-1]) if labelled_out is not None else None)
    params = [*loaded.module.parameters(), *loaded.module.buffers()]
    check_memory(sum(t.numel() * t.element_size() for t in params),
                 sum(o.numel() * o.element_size() for o in outs), calib, evaluation)
    return Source(spec, loaded, shape, calib, evaluation, num_outputs, specs, names, checks)


def _bind(data: Dataset, specs, num_classes: int | None = None) -> Dataset:
    """Dataset.bind, with the fix named when an image folder is read at another size than the model's."""
    try:
        return data.bind(specs, num_classes=num_classes)
    except DataError:
        want = tuple(specs[0].shape[1:]) if len(specs) == 1 and specs[0].shape else ()
        side = want[-1] if len(want) == 3 and want[1] == want[2] and isinstance(want[2], int) else None
        if data.preprocess.get("center_crop") and side and side != data.preprocess["center_crop"]:
            raise DataError(f"{data.source}: images are {data.preprocess['center_crop']} px, the model expects "
                            f"{'x'.join(map(str, want))}; pass --image-size {side}") from None
        raise


def check_calibration_size(calib: Dataset, held_out: int = 0) -> None:
    """INT8 ranges from a handful of samples do not fit real inputs (and an accuracy on them means nothing)."""
    if len(calib) < MIN_CALIBRATION_SAMPLES:
        kept = f" after holding out {held_out} for evaluation (or pass --eval-data)" if held_out else ""
        raise DataError(f"{calib.source}: {len(calib)} calibration samples{kept}; edgec needs at least "
                        f"{MIN_CALIBRATION_SAMPLES} (256 by default), drawn from the data the model will see")


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
