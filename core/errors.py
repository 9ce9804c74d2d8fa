"""User-facing failures: one exception type each, one documented exit code each.

The CLI prints `edgec: error: <message>` on one line and exits with `exit_code`.
Anything that is not an EdgecError is our bug: the CLI says so and `--debug` shows the traceback.
"""


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

