"""edgec inspect | verify | sign | keygen: the torch-free commands of edgec.runtime.package_cmds, mounted here
unchanged so that the full CLI and the lean device distribution run one implementation."""
from edgec.runtime.package_cmds import inspect_cmd, keygen_cmd, sign_cmd, verify_cmd  # noqa: F401
