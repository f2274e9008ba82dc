"""The launcher's secrets, kept off command lines and logs: the demo's ``--auth`` logins taken out of
``--demo-args`` (they go to the demo in ``ECSO_DEMO_AUTH``), and a generated API key written to a file only this
user can read (for API clients; the launcher removes it at exit)."""
from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence

__all__ = ["split_demo_auth", "write_private_key"]


def write_private_key(key: str) -> tuple[str, str]:
    """Write ``key`` to ``api_key`` in a new private folder (mode 0700, the file 0600); (folder, file path)."""
    folder = tempfile.mkdtemp(prefix="ecso-launch-")
    path = os.path.join(folder, "api_key")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    return folder, path


def split_demo_auth(args: Sequence[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The demo's flags without ``--auth USER:PASSWORD`` (or ``--auth=...``), and those logins."""
    rest: list[str] = []
    logins: list[str] = []
    items = iter(args)
    for arg in items:
        if arg == "--auth":
            value = next(items, None)
            if value is None:
                raise ValueError("--demo-args: --auth needs USER:PASSWORD")
            logins.append(value)
        elif arg.startswith("--auth="):
            logins.append(arg.split("=", 1)[1])
        else:
            rest.append(arg)
    return tuple(rest), tuple(logins)
