"""Keys, signatures, manifests and bundle verification. Knows nothing of the store."""
