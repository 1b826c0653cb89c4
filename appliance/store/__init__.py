"""The release store: install, activate, roll back, freeze, remove; audit log; state DB."""
