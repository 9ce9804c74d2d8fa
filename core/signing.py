"""Ed25519 signatures over a package's manifest (which hashes every file), with the `cryptography` package.

`NAME.key` is the private key (PKCS#8 PEM, created 0600), `NAME.pub` the public key (SubjectPublicKeyInfo PEM).
Bytes in, bytes out: edgec.core.package puts the signature file (`manifest.sig`) into a package and checks it.
A signature names the key that made it (the first 16 hex digits of the public key's sha256), so a wrong key is
told apart from a changed manifest.
"""
from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edgec.core.errors import OptionError, OutputExists, VerifyError

SIGNATURE_SCHEMA = "edgec.signature/1"
MAX_SIGNATURE_BYTES = 4096


def key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def keygen(stem, force: bool = False) -> tuple[Path, Path]:
    """Write STEM.key (mode 0600, never world-readable, not even for a moment) and STEM.pub: both written to
    temporaries beside them first, then moved into place, so a failure (a full disk, an unwritable folder) leaves
    the old pair (or none) and never half of one."""
    import tempfile
    stem = Path(stem)
    if stem.suffix in (".key", ".pub"):   # -o release.key means the pair release.key / release.pub
        stem = stem.with_suffix("")
    if not stem.parent.is_dir():
        raise OptionError(f"-o {stem}: the folder {stem.parent} does not exist; create it or choose another -o")
    key, pub = stem.with_name(stem.name + ".key"), stem.with_name(stem.name + ".pub")
    for path in (key, pub):
        if path.is_symlink() or path.is_dir():
            raise OptionError(f"-o {stem}: {path} is a {'symlink' if path.is_symlink() else 'folder'}; "
                              "choose another -o")
        if path.exists() and not force:
            raise OutputExists(f"{path} already exists; pass --force to replace it or choose another -o")
    private = Ed25519PrivateKey.generate()
    blobs = {key: private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption()),
             pub: private.public_key().public_bytes(serialization.Encoding.PEM,
                                                    serialization.PublicFormat.SubjectPublicKeyInfo)}
    temps: dict[Path, str] = {}
    try:
        for path, data in blobs.items():
            fd, temps[path] = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)   # created 0600
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        os.chmod(temps[pub], 0o644)
        for path, tmp in temps.items():
            if force:
                os.replace(tmp, path)
            else:
                os.link(tmp, path)   # fails if something appeared there meanwhile: never replaced
    except FileExistsError:
        raise OutputExists(f"{stem}.key or .pub appeared while this ran; it was kept; pass --force to replace it "
                           "or choose another -o") from None
    except OSError as e:
        raise OptionError(f"-o {stem}: cannot write the key pair ({e.strerror}); choose another -o") from None
    finally:
        for tmp in temps.values():
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    return key, pub


def _read_key(path, private: bool):
    path = Path(path)
    what = "private key (NAME.key from edgec keygen)" if private else "public key (NAME.pub from edgec keygen)"
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise OptionError(f"--key {path}: no such file; pass the {what}") from None
    except OSError as e:
        raise OptionError(f"--key {path}: cannot be read ({e.strerror})") from None
    try:
        key = serialization.load_pem_private_key(data, password=None) if private else \
            serialization.load_pem_public_key(data)
    except (ValueError, TypeError):
        raise OptionError(f"--key {path} is not a PEM {what}") from None
    wanted = Ed25519PrivateKey if private else Ed25519PublicKey
    if not isinstance(key, wanted):
        raise OptionError(f"--key {path} is not an Ed25519 {what}")
    return key


def load_private_key(path) -> Ed25519PrivateKey:
    return _read_key(path, private=True)


def load_public_key(path) -> Ed25519PublicKey:
    return _read_key(path, private=False)


def sign_bytes(private: Ed25519PrivateKey, manifest: bytes) -> bytes:
    """The signature file's content for these manifest bytes."""
    doc = {"schema": SIGNATURE_SCHEMA, "algorithm": "ed25519", "key_id": key_id(private.public_key()),
           "signed": "manifest.json", "signature": base64.b64encode(private.sign(manifest)).decode()}
    return (json.dumps(doc, indent=2) + "\n").encode()


def verify_bytes(public: Ed25519PublicKey, signed: bytes, signature_file: bytes, where: str) -> str:
    """The signer's key id, or a VerifyError (exit 9) unless `signature_file` (a manifest.sig's bytes) is a valid
    signature of `signed` by `public`."""
    try:
        doc = json.loads(signature_file) if len(signature_file) <= MAX_SIGNATURE_BYTES else None
        signature = base64.b64decode(doc["signature"], validate=True)
        signer = doc["key_id"]
    except (ValueError, KeyError, TypeError):
        raise VerifyError(f"{where} is not an {SIGNATURE_SCHEMA} signature; sign the package again") from None
    if signer != key_id(public):
        raise VerifyError(f"{where} is by key {str(signer)[:16]!r}, not by this --key ({key_id(public)}): "
                          "wrong key, or re-signed by someone else")
    try:
        public.verify(signature, signed)
    except InvalidSignature:
        raise VerifyError(f"{where} does not match manifest.json: the manifest was changed after signing (or the "
                          "signature was); do not trust this package") from None
    return signer
