"""Run the app on uvicorn: bind (port 0 picks a free port), print the address, drain on SIGTERM.

SIGTERM (or Ctrl-C) stops taking jobs (new ones get 503), gives the running job `--grace` seconds to finish,
else puts it back in the queue as a crash would, and leaves queued jobs for the next start; then uvicorn
closes the connections and the app stops. A second signal stops at once.
"""

from __future__ import annotations

import socket
import sys
import threading
from types import FrameType

import uvicorn
from fastapi import FastAPI


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: FastAPI) -> None:
        super().__init__(config)
        self.service = app.state.service
        self._draining = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._draining:
            self.force_exit = True
            self.should_exit = True
            return
        self._draining = True
        self.service.draining = True
        print("fluxforge: stopping: no new jobs; waiting for the running one", file=sys.stderr, flush=True)
        threading.Thread(target=self._drain, name="fluxforge-drain", daemon=True).start()

    def _drain(self) -> None:
        self.service.stop()
        self.should_exit = True


def serve(app: FastAPI, host: str, port: int, log_level: str = "info") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        raise OSError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(2048)
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if family == socket.AF_INET6 else host
    print(f"fluxforge: serving on http://{shown}:{bound}", flush=True)
    config = uvicorn.Config(
        app, log_level=log_level, timeout_graceful_shutdown=3, access_log=log_level == "debug"
    )
    _Server(config, app).run(sockets=[sock])
    return 0
