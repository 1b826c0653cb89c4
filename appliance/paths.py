"""The one place that knows where the appliance keeps its state.

With APPLIANCE_HOME set (tests, the demo, a developer's machine) everything lives under
that directory; without it, the production layout (/etc/appliance, /var/lib/appliance,
/var/cache/appliance) is used, below APPLIANCE_ROOT when that is set, else below the root
`install.sh --root DIR` recorded in the installed environment (`appliance-root` beside
its pyvenv.cfg), else below /.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

HOME_ENV = "APPLIANCE_HOME"
ROOT_ENV = "APPLIANCE_ROOT"
INSTALLED_ROOT_FILE = "appliance-root"  # written by install.sh into the venv it creates


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

    def corpus_index(self, manifest_sha256: str) -> Path:
        """The FTS5 index of a release's signed corpus: derived, rebuilt when missing."""
        return self.cache_dir / "indexes" / f"{manifest_sha256}.sqlite"

    @property
    def admin_lock(self) -> Path:
        return self.state_dir / "admin.lock"


def appliance_paths() -> AppliancePaths:
    """Return the paths in force for this process (read from the environment each time)."""
    home = os.environ.get(HOME_ENV)
    if home:
        root = Path(home).expanduser().resolve()
        return AppliancePaths(root / "etc", root / "var", root / "cache")
    root = Path(os.environ.get(ROOT_ENV) or _installed_root() or "/")
    return AppliancePaths(
        root / "etc/appliance", root / "var/lib/appliance", root / "var/cache/appliance"
    )


def _installed_root() -> str | None:
    try:
        return (Path(sys.prefix) / INSTALLED_ROOT_FILE).read_text().strip() or None
    except OSError:
        return None
