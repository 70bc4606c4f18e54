"""`fluxforge serve` as a subprocess on loopback, for the server tests: start it on a free port, wait until
its model is loaded, talk to it with httpx and the official openai client, stop it as a user would."""

from __future__ import annotations

import io
import json
import os
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import PIL.Image

PROMPT = "a red circle on a blue background, top left"


class Server:
    def __init__(self, data: Path, *args: str, env: dict[str, str] | None = None, wait: bool = True) -> None:
        self.data, self.args = Path(data), args
        self.log = self.data.with_name(self.data.name + ".log")
        command = [sys.executable, "-m", "fluxforge", "serve", "--port", "0", "--data", str(data), *args]
        self._log = open(self.log, "ab")
        self.process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env={**os.environ, **(env or {})},
        )
        self.lines: list[str] = []
        self._ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        if not self._ready.wait(90) or not any("serving on" in line for line in self.lines):
            self.kill()
            raise RuntimeError(f"the server did not print its address; log:\n{self.log.read_text()[-3000:]}")
        self.url = next(line for line in self.lines if "serving on" in line).split("serving on ")[1].strip()
        if wait:
            self.wait_ready()

    def _read(self) -> None:
        for raw in self.process.stdout:
            self.lines.append(raw.decode().rstrip())
            if "serving on" in self.lines[-1]:
                self._ready.set()
        self._ready.set()  # the process ended

    def wait_ready(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.process.poll() is not None:
                break
            time.sleep(0.1)
        raise RuntimeError(f"the server did not get ready; log:\n{self.log.read_text()[-3000:]}")

    def http(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=120, **kwargs)

    def openai(self, api_key: str = "unused") -> Any:
        import openai

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=120)

    def terminate(self, timeout: float = 60) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(30)

    def stop(self) -> None:
        if self.process.poll() is None:
            try:
                self.terminate(30)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()

    def rss_kib(self) -> int:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(next(line for line in status.splitlines() if line.startswith("VmRSS")).split()[1])


def png(size: tuple[int, int] = (64, 64), color: tuple[int, ...] = (200, 30, 30), mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    PIL.Image.new(mode, size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def picture(data: bytes) -> np.ndarray:
    return np.asarray(PIL.Image.open(io.BytesIO(data)).convert("RGB"))


def events(response: httpx.Response) -> list[tuple[str, int | None, dict[str, Any]]]:
    """Parse an SSE stream into (event, id, data) records, comments skipped."""
    out = []
    name, event_id, data = None, None, []
    for line in response.iter_lines():
        if line == "":
            if name is not None or data:
                out.append((name or "message", event_id, json.loads("\n".join(data))))
            name, event_id, data = None, None, []
        elif line.startswith(":"):
            continue
        elif line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("id:"):
            event_id = int(line[3:].strip())
        elif line.startswith("data:"):
            data.append(line[5:].strip())
    return out


def wait_status(client: httpx.Client, job_id: str, statuses: tuple[str, ...], timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in statuses:
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} is still {job['status']}, not {statuses}")


class WebhookReceiver:
    """A loopback HTTP server that records every POST (signature header, body); `fail_first` answers the
    first n with 500 to exercise retries."""

    def __init__(self, fail_first: int = 0) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.received: list[tuple[str, bytes]] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                owner.received.append((self.headers.get("X-Fluxforge-Signature", ""), body))
                self.send_response(500 if len(owner.received) <= fail_first else 200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/hook"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def bodies(self) -> list[dict[str, Any]]:
        return [json.loads(body) for _, body in self.received]

    def wait(self, count: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while len(self.received) < count and time.monotonic() < deadline:
            time.sleep(0.05)

    def close(self) -> None:
        self.httpd.shutdown()


def header_only_png(width: int, height: int) -> bytes:
    """A PNG that claims a size and holds no pixels: a decompression bomb, as a header reader sees it."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")
