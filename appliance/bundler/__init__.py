"""Building signed release bundles from bundles/<name>/bundle.toml (the build host's side)."""
