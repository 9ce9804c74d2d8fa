"""edgec inspect | verify: look into a package, and check it before shipping it."""
from __future__ import annotations

import click

from edgec.commands.options import emit_json


@click.command("inspect")
@click.argument("package", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def inspect_cmd(package, as_json):
    """What is in a package: summary table, input/output, quantization, stages."""
    from edgec.package import read_manifest
    from edgec.report import print_summary
    manifest = read_manifest(package)
    if as_json:
        emit_json(manifest)
        return
    print_summary(manifest, f"{package}")
    inp = manifest["input"]
    click.echo(f"input  {inp['name']} {inp['shape']} {inp['dtype']}")
    for out in manifest["output"]:
        click.echo(f"output {out['name']} {out['shape']} {out['dtype']}")
    scheme = (manifest.get("quantization") or {}).get("scheme") or {}
    if scheme:
        click.echo(f"quantization: {manifest['quantization'].get('method')} calibration, "
                   f"{manifest['quantization'].get('samples')} samples, activations {scheme.get('activation_type')}, "
                   f"weights {scheme.get('weight_type')}, reduce_range={scheme.get('reduce_range')}")
    click.echo("stages: " + " -> ".join(f"{s['name']} ({s['seconds']:.1f}s)" for s in manifest["stages"]))
    for name, rec in manifest["files"].items():
        click.echo(f"  {name:18} {rec['bytes']:>12,d} B  sha256 {rec['sha256'][:16]}…")


@click.command("verify")
@click.argument("package", type=click.Path())
@click.option("--json", "as_json", is_flag=True)
def verify_cmd(package, as_json):
    """Check that every file matches the manifest's hashes and that the model loads and runs once."""
    from edgec.package import verify_package
    result = verify_package(package)
    if as_json:
        emit_json(result)
    else:
        click.echo(f"ok: {len(result['files_checked'])} files match the manifest; {package}/model.onnx ran on "
                   f"input {result['input']['shape']} -> outputs {result['outputs']}")
