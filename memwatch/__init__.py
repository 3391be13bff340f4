"""memwatch: restart long-running karton workers cleanly before they grow too large.

:func:`restart_when` guards a function, a method such as karton's ``process``, or a
coroutine. :func:`implant_watcher`, :class:`RestartRule` and
:class:`RestartBehavior` keep karton-memory-watcher's API.
"""

import logging

from .behavior import Decision, RestartBehavior
from .compat import MemoryWatcherExitException, RestartRule
from .decorator import ENABLED_VARIABLE, restart_when, stats
from .growth import Stats
from .karton import implant_watcher
from .rules import Snapshot, Trip

__version__ = "0.1.0"

__all__ = [
    "ENABLED_VARIABLE",
    "Decision",
    "MemoryWatcherExitException",
    "RestartBehavior",
    "RestartRule",
    "Snapshot",
    "Stats",
    "Trip",
    "__version__",
    "implant_watcher",
    "restart_when",
    "stats",
]

# A library adds only a NullHandler: the application decides where logs go.
logging.getLogger("memwatch").addHandler(logging.NullHandler())
