"""Child processes that never outlive the process that started them, however it dies (kill -9 included).

Linux delivers a signal to a child when its parent dies if the child asked for it (`prctl(PR_SET_PDEATHSIG)`). The
CLI's Prefect API server and a launch's torchrun are started through `dying_with_this_process`, a wrapper that asks
for SIGTERM and then becomes the real command: a wrapper rather than Popen's `preexec_fn`, which is unsafe once
threads exist. Elsewhere than Linux the callers' own exit handling stops their children.
"""

from __future__ import annotations

import os
import signal
import sys

_WRAPPER = """
import ctypes, os, signal, sys
parent = int(sys.argv[1])
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
except (OSError, AttributeError):
    pass
if os.getppid() != parent:  # the parent died before prctl took effect
    sys.exit(1)
os.execv(sys.executable, [sys.executable, *sys.argv[2:]])
"""


def dying_with_this_process(*python_args: str) -> list[str]:
    """The command line that runs `python <python_args>` and ends (SIGTERM) when this process ends."""
    return [sys.executable, "-c", _WRAPPER, str(os.getpid()), *python_args]


def die_with_parent() -> None:
    """Ask for SIGTERM when this process's parent dies (for a process started by a launcher we don't control)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux
