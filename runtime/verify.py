"""`verify`: the package's integrity (edgec.core.package.check_integrity: hashes, listing, no symlinks, the
signature with a key), then model.onnx loaded in ONNX Runtime and run once on inputs of its recorded shapes
and dtypes, with finite floating-point outputs."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from edgec.core.errors import EdgecError, VerifyError
from edgec.core.package import MODEL_FILE, check_integrity, escape
from edgec.runtime.session import ModelFile, create_session, inputs_of, random_inputs, resolve_shapes

VERIFY_SCHEMA = "edgec.verify/1"


def verify_package(folder, public_key=None) -> dict:
    integrity = check_integrity(folder, public_key)
    model = ModelFile(str(folder), Path(folder) / MODEL_FILE, Path(folder), integrity.manifest)
    folder = str(folder)
    import onnxruntime as ort
    try:
        sess, _ = create_session(model, ["CPUExecutionProvider"], ort.SessionOptions())
        inputs = inputs_of(sess)
        feed = random_inputs(inputs, resolve_shapes(model, inputs, None, 1))
        outs = sess.run(None, feed)
    except EdgecError as e:
        raise VerifyError(f"{escape(folder)}/{MODEL_FILE} does not run: {e}") from None
    except Exception as e:  # noqa: BLE001 - ORT raises its own pybind types at run time
        raise VerifyError(f"{escape(folder)}/{MODEL_FILE} fails in ONNX Runtime "
                          f"({escape(str(e).strip().splitlines()[0][:200]) if str(e).strip() else type(e).__name__})"
                          "; rebuild the package") from None
    bad = [o.name for o, v in zip(sess.get_outputs(), outs)
           if np.issubdtype(np.asarray(v).dtype, np.floating) and not np.isfinite(v).all()]
    if bad:
        raise VerifyError(f"{escape(folder)}/{MODEL_FILE} produced NaN/Inf in {', '.join(map(escape, bad))} on a test "
                          "input; rebuild the package")
    return {"schema": VERIFY_SCHEMA, "ok": True, "package": folder, "files_checked": integrity.files_checked,
            "signature": integrity.signature, "ran": True,
            "inputs": [{"name": i.name, "shape": list(feed[i.name].shape), "dtype": str(feed[i.name].dtype)}
                       for i in inputs],
            "outputs": [list(np.shape(o)) for o in outs]}

