"""User-facing failures: one exception type each, one documented exit code each.

The CLI prints `edgec: error: <message>` on one line and exits with `exit_code`.
Anything that is not an EdgecError is our bug: the CLI says so and `--debug` shows the traceback.
"""
import re


class EdgecError(Exception):
    exit_code = 1


class ModelError(EdgecError):
    """Missing, unreadable, truncated or untrusted model file; wrong --arch; state_dict mismatch."""
    exit_code = 3


class DataError(EdgecError):
    """Missing, empty or malformed data; NaN/Inf; shape or label mismatch."""
    exit_code = 4


class ExportError(EdgecError):
    """Unsupported operator, ONNX check failure, ONNX Runtime disagrees with torch."""
    exit_code = 5


class ProviderError(EdgecError):
    """An execution provider that the installed onnxruntime does not offer."""
    exit_code = 6


class BudgetExceeded(EdgecError):
    """A latency/size/accuracy budget was breached (the release gate)."""
    exit_code = 7


class OutputExists(EdgecError):
    """The output path exists and --force was not given."""
    exit_code = 8


class VerifyError(EdgecError):
    """A package's files do not match its manifest, or it does not run."""
    exit_code = 9


class OptionError(EdgecError):
    """Options that are individually valid but do not fit together or cannot apply."""
    exit_code = 2


_TORCHSCRIPT_HEADER = "The following operation failed in the TorchScript interpreter."


def cause_line(e: BaseException) -> str:
    """One line that says why `e` happened. For most errors that is the first line of the message; a TorchScript
    interpreter failure starts with a fixed header and a traceback, so its cause is the interpreter's own last
    line (e.g. "RuntimeError: Expected 3D input to conv1d, but got [1, 1, 1, 512]") plus the serialized code
    line marked "<--- HERE" that names the failing op."""
    text = str(e).strip()
    if not text:
        return type(e).__name__
    lines = [line.rstrip() for line in text.splitlines()]
    if not lines[0].startswith(_TORCHSCRIPT_HEADER):
        return lines[0]
    message = next((line.strip() for line in reversed(lines) if line.strip()), lines[0])
    original = next((i for i, line in enumerate(lines) if "original code" in line), len(lines))
    here = [i for i, line in enumerate(lines[:original]) if "<--- HERE" in line]
    if here and here[-1] > 0:
        # the innermost marked line of the serialized code is the op that ran (outer frames are calls to it)
        return f"{message} (TorchScript op: {lines[here[-1] - 1].strip()})"
    return message


_ORT_CODE = re.compile(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ")
# a C++ source location and the function it names: "tensorprotoutils.cc:592 ValidateExternalDataPathFromDir ",
# "bfc_arena.cc:360 void* onnxruntime::BFCArena::AllocateRawInternal(size_t, bool, onnxruntime::Stream*) "
_ORT_WHERE = re.compile(r"\S+\.(?:cc|h|cpp):\d+ (?:\S+ )?(?:[\w~]+::)+\w+\([^()]*\) |"
                        r"\S+\.(?:cc|h|cpp):\d+ (?:[A-Z][a-z0-9]+(?:[A-Z][a-z0-9]*)+ )?")
_ORT_NODE = re.compile(r"Non-zero status code returned while running (\w+) node\. Name:'([^']*)' Status Message: ")


def ort_cause(e: BaseException) -> str:
    """ONNX Runtime's own reason in one short line: without its error-code prefix, C++ source locations and
    signatures, "Load model from PATH failed:"; a failing node as "Gather node NAME: reason"."""
    text = " ".join(str(e).split()) or type(e).__name__
    text = _ORT_CODE.sub("", text)
    text = re.sub(r"^Load model from .* failed:", "", text)
    node = _ORT_NODE.match(text)
    if node:
        text = f"{node[1]} node {node[2] or '(unnamed)'}: " + text[node.end():]
    return _ORT_WHERE.sub("", text).strip()[:300]


def ort_load_error(path, e: BaseException) -> "ModelError":
    """ONNX Runtime refusing to load a model file, with the fix that fits why."""
    cause = ort_cause(e)
    if "External data" in cause or "external data" in cause:
        fix = ("edgec reads external data only from regular files inside the model's folder (no absolute path, "
               "'..' or symlink); put the data file next to the model and name it there")
    elif "is not a registered function/op" in cause:
        fix = ("it uses an operator from a custom domain, and edgec loads no custom-op library; export the model "
               "with standard ONNX operators")
    else:
        fix = "export it again with `edgec export`"
    return ModelError(f"{path} is not an ONNX model onnxruntime can load ({cause}); {fix}")
