"""The parties' long-term identity keys for one run, and the roster every party checks against.

A deployment enrols its parties once (``feddat-secure keys create``) and names that folder in
``secure_aggregation.keys``; each site then holds only its own private key. The in-process
simulation, when no folder is named, enrols fresh parties in ``<run>/identities/``. Either way
the run folder gets a copy of the public roster (``roster.json``) so that its audit logs can be
verified later by anyone.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

from protocols import ConfigurationError, Identity, Roster
from protocols.identity import KEYHOLDER_ID, ROSTER_FILE, SERVER_ID, create_identities, load_identity, load_roster

from ..config import ConfigError

IDENTITIES_DIR = "identities"


def run_identities(keys: str, run_dir: Path, client_ids: Sequence[str], *,
                   resume: bool = False) -> tuple[dict[str, Identity], Roster]:
    """Load (``keys`` folder, or this run's own ``identities/`` on resume) or create every party's identity.

    Returns the identities of the server, the key holder and ``client_ids``, and the roster, after
    checking that each private key matches the public key the roster lists for it.
    """
    parties = [SERVER_ID, KEYHOLDER_ID, *client_ids]
    folder = Path(keys) if keys else run_dir / IDENTITIES_DIR
    try:
        if not keys and not resume:
            roster = create_identities(folder, SERVER_ID, client_ids, KEYHOLDER_ID)
        else:
            roster = load_roster(folder)
        identities = {party: _load(folder, roster, party) for party in parties}
    except ConfigurationError as error:
        raise ConfigError(f"key 'secure_aggregation.keys' ({str(folder)!r}): {error}") from None
    if not resume:
        shutil.copyfile(folder / ROSTER_FILE, run_dir / ROSTER_FILE)
    return identities, roster


def _load(folder: Path, roster: Roster, party: str) -> Identity:
    expected_role = {SERVER_ID: "server", KEYHOLDER_ID: "keyholder"}.get(party, "client")
    if party not in roster or roster.role(party) != expected_role:
        raise ConfigurationError(f"the roster does not enrol {party!r} as a {expected_role}")
    identity = load_identity(folder, party)
    if identity.public_key != roster.public_key(party):
        raise ConfigurationError(f"the private key of {party!r} does not match its public key on the roster")
    return identity
