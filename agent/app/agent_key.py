"""The agent's own key at start: loaded from its state folder to sign the messages it stores, or, when it is
missing or unusable, said once in the log and in `health` while the agent runs on with its chain unsigned. A
safety monitor never stops for want of a signing key. Never logs the key itself.
"""

from __future__ import annotations

import logging
from pathlib import Path

from agent.seal import Sealer
from agent.trust.keys import KeyFileError, key_path, load_private_key

log = logging.getLogger(__name__)


def load_sealer(folder: Path) -> Sealer:
    """A sealer that signs with the key in `folder` (agent-key.pem); an unsigned one, saying why, without it."""
    path = key_path(folder)
    if not path.exists() and not path.is_symlink():
        why = f"no key file {path}"
        log.warning("messages are chained but not signed: %s (create it with `edge-agent keys init`, then register "
                    "`edge-agent keys show` with the platform)", why)
        return Sealer(unsigned_reason=why)
    try:
        key = load_private_key(path)
    except KeyFileError as exc:
        log.error("messages are chained but not signed: %s", exc)
        return Sealer(unsigned_reason=str(exc))
    sealer = Sealer(key)
    log.info("messages are chained and signed with key %s (%s)", sealer.kid, path)
    return sealer
