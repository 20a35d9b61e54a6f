"""Worker processes that never outlive the service that started them.

A service killed with SIGKILL (or by the OOM killer) runs no clean-up, and its spawned workers
would stay behind: a PocketSphinx decoder holds about 150 MB, the PJSIP agent holds the SIP
and RTP ports. Each worker therefore watches its parent and exits once it is gone (the
kernel then gives it a new parent). Polling, not PR_SET_PDEATHSIG: that signal follows the
thread that spawned the worker, and a pool may spawn from a thread that ends before the
service does.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Final

WATCH_EVERY_S: Final = 0.5


def exit_with_parent() -> None:
    """Call first thing in a worker process: it ends within WATCH_EVERY_S of its parent."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(WATCH_EVERY_S)
        os._exit(1)  # no clean-up to run: the service that wanted the results is gone

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()
