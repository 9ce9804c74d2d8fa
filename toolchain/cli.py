"""The `edgec` command line: a thin click group. Each command lives in edgec.commands.<name>
and imports its heavy dependencies (torch, onnx) only when it runs."""
import importlib

import click

from edgec.core import __version__

# command name -> module in edgec.commands that defines a click command of the same name
COMMANDS = {
    "demo": "build", "build": "build", "export": "build", "quantize": "build",
    "inspect": "package", "verify": "package", "sign": "package", "keygen": "package",
    "bench": "bench",
    "prune": "prune", "distill": "distill",
    "compare": "compare",
    "data": "data",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return [name for name in COMMANDS if self._load(name) is not None]

    def get_command(self, ctx, name):
        return self._load(name)

    @staticmethod
    def _load(name):
        module = COMMANDS.get(name)
        if module is None:
            return None
        try:
            mod = importlib.import_module(f"edgec.commands.{module}")
        except ModuleNotFoundError as e:
            if e.name == f"edgec.commands.{module}":
                return None  # command not built yet
            raise
        return getattr(mod, f"{name}_cmd", None)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgec")
@click.option("--debug", is_flag=True, help="Show full tracebacks.")
@click.pass_context
def cli(ctx, debug):
    """edgec: PyTorch model -> pruned, distilled, INT8 ONNX package, verified and benchmarked."""
    ctx.ensure_object(dict)["debug"] = debug
    from edgec.runtime.install import check_install
    check_install()  # two onnxruntime builds at once silently lose the GPU: say how to fix it first


def main(argv=None):
    from edgec.runtime.cli import run   # one error/exit-code/SIGTERM policy for edgec and edgec-runtime
    run(cli, "edgec", argv)


if __name__ == "__main__":
    main()
