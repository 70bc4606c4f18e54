"""`fluxforge serve` as a subprocess on loopback, for the server tests: start it on a free port, wait until
its model is loaded, talk to it with httpx and the official openai client, stop it as a user would."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
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
        if not self._ready.wait(90):
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
