"""edgec's torch-free core: errors and exit codes, atomic outputs, progress, typed records and the package
contract (edgec.core.package: manifest records, schemas, integrity, signing; edgec.core.report: its views).

The bottom layer: it imports nothing else of edgec, and runtime/, exporters/ and the toolchain build on it,
so a device with only onnxruntime and numpy can gate a package (see README "Layers").
"""

__version__ = "0.1.0"
