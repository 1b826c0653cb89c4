"""The one place that knows where the appliance keeps its state.

With APPLIANCE_HOME set (tests, the demo, a developer's machine) everything lives under
that directory; without it, the production layout under /etc, /var/lib and /opt is used.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

HOME_ENV = "APPLIANCE_HOME"


@dataclass(frozen=True)
class AppliancePaths:
    config_dir: Path  # trust store, service config
    state_dir: Path  # state database, installed releases
    cache_dir: Path  # regenerable files (the assembled embedded model)

    @property
    def trust_store(self) -> Path:
        return self.config_dir / "trust.json"

    @property
    def state_db(self) -> Path:
        return self.state_dir / "state.db"

    @property
    def releases_dir(self) -> Path:
        return self.state_dir / "releases"

    @property
    def staging_dir(self) -> Path:
        """Same filesystem as releases_dir, so a finished install is one rename away."""
        return self.state_dir / "staging"

    @property
    def admin_lock(self) -> Path:
        return self.state_dir / "admin.lock"


def appliance_paths() -> AppliancePaths:
    """Return the paths in force for this process (read from the environment each time)."""
    home = os.environ.get(HOME_ENV)
    if home:
        root = Path(home).expanduser().resolve()
        return AppliancePaths(root / "etc", root / "var", root / "cache")
    return AppliancePaths(
        Path("/etc/appliance"), Path("/var/lib/appliance"), Path("/var/cache/appliance")
    )
