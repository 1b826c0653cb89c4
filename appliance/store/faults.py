"""Named fault-injection points for the crash-safety tests.

Each step of a state change calls `fault_point("install.after_rename")` and so on. When
the environment variable APPLIANCE_FAULT names that point, the process kills itself with
SIGKILL right there (or, with a ":enospc" suffix, fails as if the disk were full), so a
test can prove that a crash at that exact step leaves the store consistent. Unset, as in
production, a point costs one dictionary lookup.
"""

from __future__ import annotations

import errno
import os
import signal

FAULT_ENV = "APPLIANCE_FAULT"


def fault_point(name: str) -> None:
    wanted = os.environ.get(FAULT_ENV)
    if wanted is None:
        return
    if wanted == name:
        os.kill(os.getpid(), signal.SIGKILL)
    if wanted == f"{name}:enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
