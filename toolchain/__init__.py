"""edgec: turn a trained PyTorch model into a small, verified, benchmarked INT8 ONNX package.

Importing `edgec` is light: torch is imported only by the stages that need it, so
`edgec.runtime` (benchmarking) works on a box with only onnxruntime and numpy.
"""

from edgec.core import __version__

__all__ = ["__version__"]
