"""Ed25519 keys, canonical JSON and entry hashes shared by site ledgers and the coordinator's copy.

Entries are stored as canonical JSON (sorted keys, no spaces, ASCII), so "the bytes of an
entry" and "the entry" are the same thing: a verifier can demand that a line re-serialises to
itself, and any changed byte is caught even where JSON would parse it to the same value.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import stat
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from pmlm.common.atomic import write_atomic

# Domain tags keep a site's entry signature from being replayed as a countersignature and back.
SITE_ENTRY_DOMAIN = b"pmlm-ledger-entry/1\n"
COORDINATOR_COPY_DOMAIN = b"pmlm-ledger-copy/1\n"

GENESIS_PREV_HASH = "0" * 64


class KeyFileError(Exception):
    """A key file that is missing, malformed, or readable by others."""


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def line_hash(line: bytes) -> str:
    """SHA-256 of one stored line (without its newline); the next entry's prev_hash."""
    return hashlib.sha256(line).hexdigest()


def load_or_create_private_key(path: Path) -> Ed25519PrivateKey:
    """The Ed25519 key at `path`, created (mode 0600, public half next to it as .pub) on first use."""
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        # Created once and whole: two processes creating the key at once must not overwrite each other's
        # key, and a full disk must not leave half a key behind.
        try:
            write_atomic(path, pem, mode=0o600, exclusive=True)
        except FileExistsError:
            return load_or_create_private_key(path)
        write_atomic(public_path(path), key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        return key
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise KeyFileError(f"private key {path} is accessible by other users (mode {mode:o}); run chmod 600 {path}")
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except ValueError as exc:
        raise KeyFileError(f"cannot read private key {path}: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path} is not an Ed25519 private key")
    pub = public_path(path)
    if not pub.exists():
        write_atomic(pub, key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return key


def public_path(private_key_path: Path) -> Path:
    return Path(str(private_key_path) + ".pub")


def load_public_key(path: Path) -> Ed25519PublicKey:
    """An Ed25519 public key from a PEM file (the .pub written next to a private key)."""
    path = Path(path)
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except FileNotFoundError:
        raise KeyFileError(f"public key file {path} does not exist") from None
    except ValueError as exc:
        raise KeyFileError(f"cannot read public key {path}: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{path} is not an Ed25519 public key")
    return key


def public_key_b64(key: Ed25519PublicKey) -> str:
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def public_key_from_b64(text: str) -> Ed25519PublicKey:
    try:
        return Ed25519PublicKey.from_public_bytes(base64.b64decode(text, validate=True))
    except (binascii.Error, ValueError, TypeError) as exc:
        raise KeyFileError(f"malformed public key {text!r}: {exc}") from None


def key_fingerprint(key: Ed25519PublicKey) -> str:
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "sha256:" + hashlib.sha256(raw).hexdigest()[:32]


def sign(key: Ed25519PrivateKey, domain: bytes, payload: bytes) -> str:
    return base64.b64encode(key.sign(domain + payload)).decode()


def signature_valid(key: Ed25519PublicKey, domain: bytes, payload: bytes, signature_b64: Any) -> bool:
    if not isinstance(signature_b64, str):
        return False
    try:
        key.verify(base64.b64decode(signature_b64, validate=True), domain + payload)
    except (InvalidSignature, binascii.Error, ValueError):
        return False
    return True
