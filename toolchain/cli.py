"""The `edgec` command line: a thin click group. Each command lives in edgec.commands.<name>
and imports its heavy dependencies (torch, onnx) only when it runs."""
import importlib
import signal
import sys
import threading

import click

from edgec.core import __version__
from edgec.core.errors import DataError, EdgecError

# command name -> module in edgec.commands that defines a click command of the same name
COMMANDS = {
    "demo": "build", "build": "build", "export": "build", "quantize": "build",
    "inspect": "package", "verify": "package", "sign": "package", "keygen": "package",
    "bench": "bench",
    "prune": "prune", "distill": "distill",
    "compare": "compare",
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


class Terminated(KeyboardInterrupt):
    """SIGTERM (CI timeouts, `timeout`, containers) unwinds like Ctrl-C: every temporary output is removed."""


def _terminate(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the cleanup short
    raise Terminated()


def main(argv=None):
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if in_main else None
    try:
        _main(argv)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main(argv=None):
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        cli.main(args=argv, prog_name="edgec", standalone_mode=False)
    except click.exceptions.Abort as e:  # click turns KeyboardInterrupt (and so SIGTERM) into Abort
        if isinstance(e.__cause__, Terminated):
            click.echo("edgec: terminated", err=True)
            sys.exit(143)
        click.echo("edgec: aborted", err=True)
        sys.exit(130)
    except click.UsageError as e:  # one line like every other user error, plus where to look
        cmd = f"{e.ctx.command_path} --help" if e.ctx is not None else "edgec --help"
        click.echo(f"edgec: error: {e.format_message()} (see {cmd})", err=True)
        sys.exit(e.exit_code)
    except click.ClickException as e:
        click.echo(f"edgec: error: {e.format_message()}", err=True)
        sys.exit(e.exit_code)
    except EdgecError as e:
        if debug:
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        click.echo(f"edgec: error: {msg}", err=True)
        sys.exit(e.exit_code)
    except MemoryError:   # past every estimate: still one line with the fix, never a traceback
        click.echo("edgec: error: out of memory; use fewer --samples, smaller --eval-data or a smaller input shape",
                   err=True)
        sys.exit(DataError.exit_code)
    except KeyboardInterrupt:
        click.echo("edgec: interrupted", err=True)
        sys.exit(130)
    except Exception as e:  # our bug, not the user's
        if debug:
            raise
        click.echo(f"edgec: internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)", err=True)
        sys.exit(1)
    sys.exit(0)


if __name__ == "__main__":
    main()
