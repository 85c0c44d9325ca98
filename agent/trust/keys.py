"""Ed25519 keys: key ids, the text form of a public key, the set of trusted keys, and the agent's key file.

A public key travels as base64url (no padding) of its raw 32 bytes; its key id (`kid`) is the first 16 hex
digits of SHA-256 over those 32 bytes. The agent's private key is a PKCS#8 PEM file of mode 0600, created
atomically and never replaced unless asked. This module never logs or prints a private key.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import errno
import hashlib
import os
import re
import secrets
import stat
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from agent.errors import AgentError

if TYPE_CHECKING:  # the library costs 8 MB of memory: loaded only by an agent that has keys to use
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

ALG = "ed25519"
KEY_FILE = "agent-key.pem"
"""The agent's private key, in its state directory (beside the store)."""
DEFAULT_KEY_DIR = Path("/var/lib/edge-agent")
"""The state directory systemd gives the service (StateDirectory=edge-agent) and install.sh creates."""
KID_LENGTH = 16
_KID = re.compile(rf"^[0-9a-f]{{{KID_LENGTH}}}$")
_B64URL = re.compile(r"^[A-Za-z0-9_-]*$")
_MAX_KEY_FILE_BYTES = 16_384


class KeyFileError(AgentError):
    """The agent's key file cannot be created or read; the text names the file and says what to do."""


def b64url(data: bytes) -> str:
    """base64url without padding (RFC 4648 section 5)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str, size: int) -> bytes:
    """Exactly `size` bytes from their unpadded base64url text; ValueError for anything else, including texts
    that decode to the same bytes but are not the one canonical spelling of them (unused bits set)."""
    if not isinstance(text, str) or not _B64URL.match(text) or len(text) != (size * 8 + 5) // 6:
        raise ValueError(f"not base64url (unpadded) of {size} bytes")
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise ValueError(f"not base64url (unpadded) of {size} bytes") from None
    if len(data) != size or b64url(data) != text:
        raise ValueError(f"not base64url (unpadded) of {size} bytes")
    return data


def raw_public(key: Ed25519PublicKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(key: Ed25519PublicKey | bytes) -> str:
    """The key id: the first 16 hex digits of SHA-256 over the raw 32-byte public key."""
    raw = key if isinstance(key, bytes) else raw_public(key)
    return hashlib.sha256(raw).hexdigest()[:KID_LENGTH]


def is_key_id(text: object) -> bool:
    return isinstance(text, str) and _KID.match(text) is not None


def public_key_text(key: Ed25519PublicKey) -> str:
    """How a public key is written in configurations and registrations: base64url of its raw 32 bytes."""
    return b64url(raw_public(key))


def parse_public_key(text: str) -> Ed25519PublicKey:
    """An Ed25519 public key from its base64url text; ValueError saying what is wrong."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    raw = b64url_decode(text, 32)
    try:
        return Ed25519PublicKey.from_public_bytes(raw)
    except (ValueError, UnsupportedAlgorithm):
        raise ValueError("not an Ed25519 public key") from None


def generate_private_key() -> Ed25519PrivateKey:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    return Ed25519PrivateKey.generate()


class TrustedKeys(Mapping[str, "Ed25519PublicKey"]):
    """Public keys a verifier trusts, by key id: more than one while a key is being replaced (rotation)."""

    def __init__(self, keys: Iterable[Ed25519PublicKey] = ()) -> None:
        self._by_kid = {key_id(key): key for key in keys}

    @classmethod
    def from_texts(cls, texts: Iterable[str]) -> TrustedKeys:
        """From base64url texts (e.g. `remote_config.keys`); ValueError naming the index of a bad one."""
        keys = []
        for i, text in enumerate(texts):
            try:
                keys.append(parse_public_key(text))
            except ValueError as exc:
                raise ValueError(f"[{i}]: {exc}") from None
        return cls(keys)

    def __getitem__(self, kid: str) -> Ed25519PublicKey:
        return self._by_kid[kid]

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_kid)

    def __len__(self) -> int:
        return len(self._by_kid)


# --- the agent's key file --------------------------------------------------------------------------------------


def key_path(directory: Path) -> Path:
    return directory / KEY_FILE


def create_key_file(directory: Path, *, force: bool = False) -> tuple[Path, Ed25519PrivateKey]:
    """A new private key written to `directory`/agent-key.pem, mode 0600, atomically: a temporary file in the same
    directory is written, synced and then linked (or with `force`, renamed) into place, so the file is either
    absent, the old key or the whole new one, never partly written. An existing key is kept unless `force`."""
    path = key_path(directory)
    try:
        directory.mkdir(mode=0o750, parents=True, exist_ok=True)
    except OSError as exc:
        raise KeyFileError(f"{directory}: cannot create the directory: {exc.strerror or exc}") from None
    if not force and os.path.lexists(path):
        raise KeyFileError(f"{path} exists: kept (--force replaces it, and the platform must then be given the "
                           "new public key)")
    from cryptography.hazmat.primitives import serialization

    key = generate_private_key()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    tmp = directory / f".{KEY_FILE}.{secrets.token_hex(8)}.tmp"  # never the name of another run's file
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(fd, 0o600)  # whatever the umask
            os.write(fd, pem)
            os.fsync(fd)
        finally:
            os.close(fd)
        if force:
            os.replace(tmp, path)
        else:
            _link_new(tmp, path)
        sync_directory(directory)
    except OSError as exc:
        if exc.errno == errno.EEXIST:
            raise KeyFileError(f"{path} exists: kept (--force replaces it)") from None
        raise KeyFileError(f"{path}: cannot write the key: {exc.strerror or exc}") from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    return path, key


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """The agent's private key from its PEM file; KeyFileError if it is missing, readable by others than its
    owner, or not an Ed25519 key."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        hint = " (create it with `edge-agent keys init`)" if exc.errno == errno.ENOENT else ""
        raise KeyFileError(f"{path}: {exc.strerror or exc}{hint}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise KeyFileError(f"{path}: not a regular file")
        if info.st_mode & 0o077:
            raise KeyFileError(f"{path}: mode {stat.S_IMODE(info.st_mode):04o} lets others read the private key: "
                               f"chmod 600 {path}")
        data = os.read(fd, _MAX_KEY_FILE_BYTES + 1)
    except OSError as exc:
        raise KeyFileError(f"{path}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    if len(data) > _MAX_KEY_FILE_BYTES:
        raise KeyFileError(f"{path}: larger than {_MAX_KEY_FILE_BYTES} bytes, not a key file")
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise KeyFileError(f"{path}: not an unencrypted PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path}: a {type(key).__name__.removesuffix('PrivateKey') or 'other'} key, "
                           "not Ed25519")
    return key


def _link_new(tmp: Path, path: Path) -> None:
    """Put `tmp` at `path` only if nothing is there: link() fails if the name exists, where rename() replaces."""
    try:
        os.link(tmp, path)
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
        # a file system without hard links (vfat): rename, having looked just before
        if os.path.lexists(path):
            raise FileExistsError(errno.EEXIST, "exists") from None
        os.rename(tmp, path)


def sync_directory(directory: Path) -> None:
    """A new name in `directory` survives a power loss only once the directory is synced, not only the file."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
