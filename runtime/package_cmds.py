"""The package commands: inspect, verify, sign, keygen. Torch-free: the full `edgec` CLI and the lean device
distribution mount these same click commands (edgec.commands.package re-exports them)."""
from __future__ import annotations

import click

from edgec.core.errors import EdgecError


def _json(doc) -> None:
    from edgec.runtime.report import print_json
    print_json(doc)


@click.command("inspect")
@click.argument("package", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def inspect_cmd(package, as_json):
    """What is in a package: summary table, inputs/outputs, quantization, stages, files."""
    from edgec.core.package import read_manifest
    from edgec.core.report import inspect_lines, print_summary
    manifest = read_manifest(package)
    if as_json:
        _json(manifest.to_json())
        return
    print_summary(manifest, f"{package}")
    for line in inspect_lines(manifest):
        click.echo(line)


@click.command("verify")
@click.argument("package", type=click.Path())
@click.option("--key", "public_key", type=click.Path(dir_okay=False),
              help="Also require a valid Ed25519 signature by this public key (NAME.pub from `edgec keygen`).")
@click.option("--json", "as_json", is_flag=True, help="Print an edgec.verify/1 result on stdout, on failure too.")
def verify_cmd(package, public_key, as_json):
    """Check a package before trusting it: exactly the listed files, no symlinks, every hash matching the manifest,
    the signature (with --key), then model.onnx loads and runs once. Exit 9 on any failure, 3 when not found."""
    from edgec.runtime.verify import VERIFY_SCHEMA, verify_package
    try:
        result = verify_package(package, public_key)
    except EdgecError as e:
        if as_json:
            _json({"schema": VERIFY_SCHEMA, "ok": False, "package": str(package), "error": str(e),
                   "exit_code": e.exit_code})
        raise
    if as_json:
        _json(result)
        return
    signed = "; signature verified" if result["signature"] == "verified" else \
        f"; signature {result['signature']}" if result["signature"] != "absent" else ""
    shapes = ", ".join(f"{i['name']} {i['shape']}" for i in result["inputs"])
    click.echo(f"ok: {len(result['files_checked'])} files match the manifest, nothing else in the package{signed}; "
               f"model.onnx ran on {shapes} -> outputs {result['outputs']}")


@click.command("sign")
@click.argument("package", type=click.Path())
@click.option("--key", "private_key", required=True, type=click.Path(dir_okay=False),
              help="Ed25519 private key (NAME.key from `edgec keygen`).")
def sign_cmd(package, private_key):
    """Sign a package's manifest (which hashes every file) with Ed25519; writes PACKAGE/manifest.sig.
    The package is checked first: only an intact package is signed."""
    from edgec.core.package import check_integrity, sign_package
    from edgec.core.signing import load_private_key
    key = load_private_key(private_key)
    check_integrity(package)
    path = sign_package(package, key)
    click.echo(f"signed: {path} (check with edgec verify {package} --key NAME.pub)")


@click.command("keygen")
@click.option("-o", "--output", required=True, type=click.Path(), help="Writes OUTPUT.key (0600) and OUTPUT.pub.")
@click.option("--force", is_flag=True, help="Replace existing OUTPUT.key / OUTPUT.pub.")
def keygen_cmd(output, force):
    """Make an Ed25519 key pair for signing packages. Keep the .key secret; give the .pub to devices and CI."""
    from edgec.core.signing import keygen
    key, pub = keygen(output, force=force)
    click.echo(f"private key {key} (keep it secret), public key {pub}")
