"""The package contract: `NAME.edgec/` and its manifest (`edgec.manifest/1`), the one place that knows both.

Typed records for every part of the manifest (the JSON Schema is `schemas/manifest.json`, shipped with the
package), the file names, file hashing, reading with loud one-line errors, writing, recording a latency, and
the integrity check a device runs before trusting a package (every file hashed and listed, nothing else there,
no symlinks, no names outside the folder; the Ed25519 signature when a public key is given). Torch-free and
ONNX-free: a device with only the lean install reads, verifies and renders packages through this module; the
one-inference check lives in edgec.runtime.verify, the writer that needs torch in edgec.package.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from edgec.core.errors import ModelError, VerifyError
from edgec.core.records import MAX_DEPTH, Record, RecordError, depth

SCHEMA = "edgec.manifest/1"
MODEL_FILE, FP32_FILE, MANIFEST_FILE, REPORT_FILE = "model.onnx", "model.fp32.onnx", "manifest.json", "report.md"
SIGNATURE_FILE = "manifest.sig"          # the one file besides the manifest that the manifest does not list
REQUIRED_FILES = (MODEL_FILE, FP32_FILE)
MAX_MANIFEST_BYTES = 16 * 1024 * 1024    # real manifests are tens of KB; a huge one is refused before parsing


# ---------------------------------------------------------------- records

@dataclass
class FileRecord(Record):
    sha256: str
    bytes: int


@dataclass
class TensorSpec(Record):
    """One model input or output as the ONNX model declares it."""
    name: str
    shape: list[int | str]               # a string names a dynamic axis ("batch")
    dtype: str                           # numpy name: float32, int64, bool, ...
    example: list[int] | None = None     # inputs: the concrete shape the build ran (batch 1); fills dynamic axes


@dataclass
class Source(Record):
    path: str
    kind: str
    arch: str | None = None
    input_shape: list[int] | None = None
    extra: dict = field(default_factory=dict)


@dataclass
class Toolchain(Record):
    edgec: str
    torch: str | None = None
    onnx: str | None = None
    onnxruntime: str | None = None
    numpy: str | None = None
    python: str | None = None
    machine: str | None = None
    cpu_features: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)


@dataclass
class Scheme(Record):
    activation_type: str | None = None
    weight_type: str | None = None
    per_channel: bool | None = None
    reduce_range: bool | None = None
    quant_format: str | None = None
    target: str | None = None
    reasons: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)


@dataclass
class Ops(Record):
    int8: int
    float: int
    int8_weight_share: float | None = None
    extra: dict = field(default_factory=dict)


@dataclass
class FallbackNode(Record):
    node: str
    op_type: str
    error_when_excluded: float
    error_reduction: float
    extra: dict = field(default_factory=dict)


@dataclass
class Sensitivity(Record):
    """The accuracy-aware fallback's report: what it measured, which nodes it kept in FP32, why it stopped."""
    metric: str
    fp32_score: float
    int8_score: float
    final_score: float
    drop_points: float
    budget_points: float
    stopped: str
    nodes_measured: int
    nodes_total: int
    seconds: float
    excluded: list[FallbackNode] = field(default_factory=list)
    extra: dict = field(default_factory=dict)


@dataclass
class Quantization(Record):
    scheme: Scheme | None = None
    method: str | None = None
    samples: int | None = None
    excluded_nodes: list[str] = field(default_factory=list)
    ops: Ops | None = None
    sensitivity: Sensitivity | None = None
    extra: dict = field(default_factory=dict)   # pre_process, transforms, ...: recorded, rendered by no reader


@dataclass
class Latency(Record):
    """One model's latency on one execution provider: what build measures and what `bench --record` writes."""
    p50_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    min_ms: float
    max_ms: float
    n: int
    batch: int
    std_ms: float | None = None
    p50_ci_ms: list[float] | None = None
    reliable: dict[str, bool] = field(default_factory=dict)
    threads: int | None = None
    intra_op_spinning: bool | None = None
    interleaved: bool = False            # measured alternating with other models (build: INT8 with FP32)
    load_ms: float | None = None
    first_ms: float | None = None
    memory_mb: float | None = None
    throughput_ips: float | None = None
    providers: list[str] = field(default_factory=list)
    measured: str | None = None          # UTC time of the measurement
    host: dict | None = None             # where `bench --record` measured it (build: see Manifest.toolchain)
    warnings: list[str] = field(default_factory=list)

    @classmethod
    def from_bench(cls, result: dict, measured: str | None = None) -> Latency:
        """From one `results[]` entry of an edgec.bench/1 document (BenchResult.to_json())."""
        lat = result["latency_ms"]
        return cls(p50_ms=lat["p50"], p90_ms=lat["p90"], p95_ms=lat["p95"], p99_ms=lat["p99"], mean_ms=lat["mean"],
                   min_ms=lat["min"], max_ms=lat["max"], std_ms=lat.get("std"), p50_ci_ms=lat.get("p50_ci"),
                   n=lat["n"], batch=result["batch"], reliable=dict(result.get("reliable") or {}),
                   threads=result.get("threads"), intra_op_spinning=result.get("intra_op_spinning"),
                   interleaved=result.get("ratio") is not None, load_ms=result.get("load_ms"),
                   first_ms=result.get("first_ms"), memory_mb=result.get("memory_mb"),
                   throughput_ips=result.get("throughput_ips"), providers=list(result.get("providers") or []),
                   measured=measured or now(), warnings=list(result.get("warnings") or []))

    @property
    def how(self) -> str:
        """Which figure this is: alone (what `edgec bench` and the gate measure) or interleaved with another model."""
        return "interleaved" if self.interleaved else "alone"


@dataclass
class Agreement(Record):
    """INT8 against FP32 on the same inputs (top-1 agreement in percent, output cosines)."""
    top1_agreement: float | None = None
    mean_cosine: float | None = None
    extra: dict = field(default_factory=dict)


@dataclass
class ModelMetrics(Record):
    bytes: int
    params: int | None = None
    flops: int | None = None                 # per sample, 2 per multiply-add
    accuracy: float | None = None            # percent, on labelled eval data
    agreement: Agreement | None = None       # without labels
    latency: dict[str, Latency] = field(default_factory=dict)   # FP32 only; the INT8 model's is Manifest.latency


@dataclass
class Figures(Record):
    params: int | None = None
    flops: int | None = None


@dataclass
class OutputCheck(Record):
    """One output, INT8 against FP32 on the eval data (edgec.exporters.metrics; every figure is in the evaluate
    stage): its task and how it was chosen, the task figure in percent, SQNR over the eval set."""
    name: str
    task: str                                # classify | multilabel | regress | score | embed | none
    chosen: str                              # "auto" (detected, `why` says from what) | "given" (--task)
    why: str = ""
    labels: bool = False                     # the labels applied to this output
    metric: str | None = None                # accuracy, top1_agreement, f1, pearson, mean_cosine, ...; None: SQNR only
    fp32: float | None = None
    int8: float | None = None
    drop_points: float | None = None
    sqnr_db: float | None = None             # None: identical (see `identical`) or a zero reference
    identical: bool = False
    rel_error: float | None = None
    max_abs_error_of_range: float | None = None
    extra: dict = field(default_factory=dict)


@dataclass
class Metrics(Record):
    fp32: ModelMetrics
    int8: ModelMetrics
    compression_ratio: float
    original: Figures | None = None          # the model as given, when it was pruned
    outputs: list[OutputCheck] = field(default_factory=list)   # every output's check


@dataclass
class StageRecord(Record):
    name: str
    needs: str
    gives: str
    options: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class Manifest(Record):
    schema: str
    created: str
    source: Source
    files: dict[str, FileRecord]
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    opset: int
    toolchain: Toolchain
    quantization: Quantization
    stages: list[StageRecord]
    metrics: Metrics
    latency: dict[str, Latency] = field(default_factory=dict)   # the INT8 model.onnx, per execution provider
    build_seconds: float = 0.0
    preprocess: dict | None = None           # what the data loader did to the samples the model was built on
    classes: list[str] | None = None         # label names, when the data had them
    extra: dict = field(default_factory=dict)   # recorded verbatim by the builder (e.g. {"demo": true})

    def input_shapes(self) -> dict[str, list]:
        """Input name -> the shape to run it with: the build's example where recorded, else the declared one."""
        return {i.name: list(i.example or i.shape) for i in self.inputs}

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2) + "\n"


# ---------------------------------------------------------------- files

def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def file_record(path: Path, *, follow_symlinks: bool = True) -> FileRecord:
    """sha256 and size of a file; with follow_symlinks=False a symlink is refused by the open itself (no race)."""
    flags = os.O_RDONLY | (0 if follow_symlinks else getattr(os, "O_NOFOLLOW", 0))
    digest, size = hashlib.sha256(), 0
    with os.fdopen(os.open(path, flags), "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
            size += len(block)
    return FileRecord(sha256=digest.hexdigest(), bytes=size)


def bad_name(name: str) -> str | None:
    """Why `name` cannot be a file of a package (which is one flat folder), or None when it can."""
    if not name or name in (".", ".."):
        return "is empty or a folder reference"
    if "/" in name or "\\" in name or os.path.isabs(name):
        return "is a path, not a file name in the package folder"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "contains control characters"
    if name in (MANIFEST_FILE, SIGNATURE_FILE):
        return "is the manifest or its signature, which the manifest cannot list"
    return None


def escape(text) -> str:
    """A manifest's text made safe for a terminal: control characters (ANSI escapes, newlines) shown as escapes."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


# ---------------------------------------------------------------- read and write

def package_dir(folder) -> Path:
    """The package folder, or a one-line not-found error (exit 3, like a missing model file)."""
    folder = Path(folder)
    if not folder.exists():
        raise ModelError(f"package {escape(folder)} not found; pass a NAME.edgec folder written by `edgec build`")
    if not folder.is_dir() or not (folder / MANIFEST_FILE).exists():
        raise ModelError(f"{escape(folder)} is not an edgec package (no {MANIFEST_FILE}); build one with edgec build")
    return folder


def manifest_bytes(folder: Path) -> bytes:
    """The manifest file's bytes, refusing a symlink, a non-file or a huge file before reading it."""
    path = folder / MANIFEST_FILE
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise VerifyError(f"{escape(path)} is a symlink; a package holds its own files only")
    if not stat.S_ISREG(st.st_mode):
        raise VerifyError(f"{escape(path)} is not a regular file; rebuild the package")
    if st.st_size > MAX_MANIFEST_BYTES:
        raise VerifyError(f"{escape(path)} is {st.st_size / 1e6:.1f} MB, over the {MAX_MANIFEST_BYTES >> 20} MiB a "
                          "manifest may have; it is not one edgec wrote: rebuild the package")
    with open(path, "rb") as f:
        return f.read(MAX_MANIFEST_BYTES + 1)


def parse_manifest(data: bytes, where: str = MANIFEST_FILE) -> Manifest:
    """Bytes -> Manifest, or one VerifyError line naming what is wrong."""
    fix = "rebuild the package with this edgec version"
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError; RecursionError: deep nesting
        raise VerifyError(f"{where} is not valid JSON ({escape(str(e)[:120])}); {fix}") from None
    if depth(doc) > MAX_DEPTH:
        raise VerifyError(f"{where} nests deeper than {MAX_DEPTH} levels, which no edgec manifest does; {fix}")
    schema = doc.get("schema") if isinstance(doc, dict) else None
    if schema != SCHEMA:
        raise VerifyError(f"{where} has schema {escape(repr(schema))[:60]}, expected {SCHEMA!r}; {fix}")
    try:
        manifest = Manifest.from_json(doc, "manifest")
    except RecordError as e:
        raise VerifyError(f"{where} is malformed: {escape(e)}; {fix}") from None
    for name in manifest.files:
        why = bad_name(name)
        if why:
            raise VerifyError(f"{where} lists {escape(repr(name))}, which {why}; the package was tampered with or "
                              "not written by edgec")
    return manifest


def read_manifest(folder) -> Manifest:
    folder = package_dir(folder)
    return parse_manifest(manifest_bytes(folder), str(escape(folder / MANIFEST_FILE)))


def write_manifest(folder: Path, manifest: Manifest) -> None:
    """Atomically (temp file + rename in the same folder): a reader never sees half a manifest."""
    fd, tmp = tempfile.mkstemp(prefix=f".{MANIFEST_FILE}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(manifest.dumps())
        os.replace(tmp, Path(folder) / MANIFEST_FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def record_latency(folder, ep: str, latency: Latency) -> Path:
    """`edgec bench --record`: the INT8 model's latency on `ep` into the manifest, in the same record build writes.
    The manifest changes, so a signature made before no longer verifies: sign again after recording."""
    folder = package_dir(folder)
    manifest = read_manifest(folder)
    manifest.latency[ep] = latency
    write_manifest(folder, manifest)
    return folder / MANIFEST_FILE


# ---------------------------------------------------------------- integrity

@dataclass
class Integrity:
    manifest: Manifest
    files_checked: list[str]
    signature: str                 # "verified", "absent" or "present, not checked (no --key)"


def check_integrity(folder, public_key=None) -> Integrity:
    """What a device checks before trusting a package, without running it: the folder holds exactly the
    manifest, its signature (optional) and the files the manifest lists, all regular files (no symlinks, no
    subfolders), each matching its sha256 and size; with `public_key` (a path), the signature must be there and
    verify over the manifest's bytes. Any failure is a VerifyError (exit 9) naming the file."""
    folder = package_dir(folder)
    data = manifest_bytes(folder)
    where = escape(folder / MANIFEST_FILE)
    signature = "absent"
    if public_key is not None:   # before parsing: only a manifest signed by this key is trusted input
        verify_signature(folder, data, public_key)
        signature = "verified"
    manifest = parse_manifest(data, str(where))
    allowed = set(manifest.files) | {MANIFEST_FILE, SIGNATURE_FILE}
    with os.scandir(folder) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            name = escape(entry.name)
            if entry.is_symlink():
                raise VerifyError(f"{escape(folder)}: {name} is a symlink; a package holds its own files only "
                                  "(copy the target in and rebuild, or remove it)")
            if not entry.is_file(follow_symlinks=False):
                raise VerifyError(f"{escape(folder)}: {name} is not a regular file (a folder?); packages are flat: "
                                  "remove it")
            if entry.name not in allowed:
                raise VerifyError(f"{escape(folder)}: {name} is not listed in the manifest; something was added to "
                                  "the package: remove it or rebuild")
            if entry.name == SIGNATURE_FILE and signature == "absent":
                signature = "present, not checked (pass --key NAME.pub)"
    for required in REQUIRED_FILES:
        if required not in manifest.files:
            raise VerifyError(f"{escape(folder)}: the manifest lists no {required}; rebuild the package")
    checked = []
    for name, expected in manifest.files.items():
        try:   # a symlink swapped in after the listing above is refused by the open, not followed
            got = file_record(folder / name, follow_symlinks=False)
        except FileNotFoundError:
            raise VerifyError(f"{escape(folder)}: {escape(name)} is listed in the manifest but missing; rebuild or "
                              "restore it") from None
        except OSError as e:
            raise VerifyError(f"{escape(folder)}: {escape(name)} cannot be read ({e.strerror})") from None
        if got != expected:
            what = "size" if got.bytes != expected.bytes else "sha256"
            raise VerifyError(f"{escape(folder)}: {escape(name)} does not match the manifest ({what} differs): it was "
                              "modified or corrupted; rebuild or restore it")
        checked.append(name)
    return Integrity(manifest, checked, signature)


# ---------------------------------------------------------------- signing

def sign_package(folder, key) -> Path:
    """Sign the package's manifest bytes (a NAME.key path or a loaded key) into manifest.sig, atomically."""
    from edgec.core.signing import load_private_key, sign_bytes
    folder = package_dir(folder)
    private = load_private_key(key) if isinstance(key, (str, os.PathLike)) else key
    fd, tmp = tempfile.mkstemp(prefix=f".{SIGNATURE_FILE}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(sign_bytes(private, manifest_bytes(folder)))
        os.replace(tmp, folder / SIGNATURE_FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return folder / SIGNATURE_FILE


def verify_signature(folder: Path, manifest: bytes, public_key) -> str:
    """The signer's key id; VerifyError unless manifest.sig is this key's signature of these manifest bytes."""
    from edgec.core.signing import MAX_SIGNATURE_BYTES, load_public_key, verify_bytes
    public = load_public_key(public_key) if isinstance(public_key, (str, os.PathLike)) else public_key
    path = folder / SIGNATURE_FILE
    if path.is_symlink() or not path.is_file():
        raise VerifyError(f"{escape(folder)}: no {SIGNATURE_FILE} (the package is not signed); sign it with "
                          "`edgec sign PKG --key NAME.key` or build with --sign-key")
    with open(path, "rb") as f:
        signature_file = f.read(MAX_SIGNATURE_BYTES + 1)
    return verify_bytes(public, manifest, signature_file, f"{escape(folder)}/{SIGNATURE_FILE}")
