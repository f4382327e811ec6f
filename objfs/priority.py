"""Whose request this is: Orthanc's (foreground) or objfs' own background work.

The FUSE boundary marks every handler as foreground; backends give foreground requests their
own worker threads and limiter, so uploads, deletes, inventories and moves stuck on a slow
bucket can never hold every slot while Orthanc waits to read (docs/design.md, "Layers").
"""

from __future__ import annotations

import contextvars

# trio copies the context into each task at spawn: background workers, started by the
# daemon, see False; a FUSE handler's task sets True for itself.
FOREGROUND: contextvars.ContextVar[bool] = contextvars.ContextVar("objfs_foreground",
                                                                 default=False)


def is_foreground() -> bool:
    return FOREGROUND.get()
