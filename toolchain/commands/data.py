"""`edgec data export`: write data edgec reads (e.g. the embedded digits) as a .npz file (x, y), the format of your
own data, so every example has real inputs to run on."""
from __future__ import annotations

import click

from edgec.commands.options import emit_json


@click.group("data")
def data_cmd():
    """Data helpers."""


@data_cmd.command("export")
@click.argument("spec")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="The .npz file to write.")
@click.option("--force", is_flag=True, help="Replace an existing output.")
@click.option("--json", "as_json", is_flag=True, help="Print what was written as JSON.")
def export(spec, output, force, as_json):
    """Write SPEC (builtin:digits[:train|:test|:all], a .npz or an image folder) as a .npz with x (N,C,H,W float32)
    and its labels as loaded (y, y:OUTPUT: int64 class ids or float32 targets)."""
    import numpy as np

    from edgec.core.errors import OptionError
    from edgec.core.fsutil import atomic_path
    from edgec.data import load_data
    if not output.endswith(".npz"):
        raise OptionError(f"-o {output}: the output is a .npz file; name it e.g. {output}.npz")
    ds = load_data(spec)
    from edgec.data import LABEL_KEY, LABEL_PREFIX
    arrays = {"x": np.asarray(ds.x[0:len(ds)], dtype=np.float32)}
    for key, labels in (ds.labels or {}).items():   # as loaded: class ids int64, targets float32
        arrays[LABEL_PREFIX + key if key else LABEL_KEY] = np.asarray(labels)
    with atomic_path(output, force=force) as tmp:
        with open(tmp, "wb") as f:   # a file object: np.savez would append .npz to the temporary name
            np.savez(f, **arrays)
    info = {"output": output, "source": ds.source, "samples": len(ds), "x": list(arrays["x"].shape),
            "labelled": ds.labelled, "labels": {k: list(v.shape) for k, v in arrays.items() if k != "x"}}
    if as_json:
        emit_json(info)
    else:
        click.echo(f"wrote {output}: {len(ds)} samples of {ds.source}, x {list(arrays['x'].shape)} float32"
                   + (", labels " + ", ".join(f"{k} {v.dtype}" for k, v in arrays.items() if k != "x")
                      if ds.labelled else ", no labels"))
