"""Audited changes to the trust store: trust a key, revoke one, set the threshold.

trust.json is written inside the transaction that appends the change's audit row, after the
row: if the write fails, the row rolls back and nothing changed. A crash between the write
and the commit leaves a trust store that differs from the log, which `audit verify` reports.
The caller holds the admin lock.
"""

from __future__ import annotations

from sqlite_utils import Database

from appliance.paths import AppliancePaths
from appliance.store import audit
from appliance.store.db import write_transaction
from appliance.store.faults import fault_point
from appliance.trust.crypto import PublicKey
from appliance.trust.truststore import (
    TrustedKey,
    TrustStore,
    find_key,
    load_trust_store,
    revoke_key,
    set_threshold,
    trust_key,
)


def trust(db: Database, paths: AppliancePaths, public_key: PublicKey, name: str) -> TrustedKey:
    already = load_trust_store(paths.trust_store).active_key(public_key.key_id)
    if already is not None:
        return already  # nothing changes, nothing to audit
    with write_transaction(db):
        audit.append(db, "key trust", public_key.key_id, details={"name": name})
        fault_point("keys.before_write")
        key = trust_key(paths.trust_store, public_key, name)
        fault_point("keys.after_write")
    return key


def revoke(db: Database, paths: AppliancePaths, key_id_prefix: str, reason: str) -> TrustedKey:
    found = find_key(load_trust_store(paths.trust_store), key_id_prefix)
    with write_transaction(db):
        audit.append(db, "key revoke", found.key_id, reason, {"name": found.name})
        fault_point("keys.before_write")
        key = revoke_key(paths.trust_store, found.key_id)
        fault_point("keys.after_write")
    return key


def threshold(db: Database, paths: AppliancePaths, k: int) -> TrustStore:
    with write_transaction(db):
        audit.append(db, "key threshold", str(k))
        fault_point("keys.before_write")
        store = set_threshold(paths.trust_store, k)
        fault_point("keys.after_write")
    return store
