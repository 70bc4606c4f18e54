"""The one owner of the model: takes jobs from the queue one at a time, runs them through `Pipeline.run`,
and reports every step as an event.

The HTTP layer sees a worker only through the `Worker` interface (state, model facts, cancel, stop), so a
worker of model replicas elsewhere (Ray Serve) can take this one's place. A job's failure (bad input that
slipped through, out of memory, a device error, a bug) fails that job with a code and leaves the worker
serving the next one.
"""

from __future__ import annotations

import base64
import gc
import hashlib
import hmac
import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from fluxforge import images
from fluxforge.errors import GenerationCancelled
from fluxforge.pipeline import GenerationRequest, GenerationResult, Pipeline
from fluxforge.preview import Previewer
from fluxforge.request import Limits, ModelSpec
from fluxforge.sampling import StepInfo
from fluxforge.server.jobs import Job, Jobs

log = logging.getLogger("fluxforge.server")

State = Literal["starting", "ready", "failed", "stopping"]


class Worker(Protocol):
    """What the HTTP layer needs from whoever runs the model."""

    state: State
    spec: ModelSpec | None  # for validating requests on arrival; None until the model is loaded
    running: str | None  # the id of the job running now

    def start(self) -> None: ...
    def cancel(self, job_id: str) -> bool: ...  # stop the running job at its next step
    def stop(self, grace: float) -> None: ...
    def model_info(self) -> dict[str, Any]: ...


@dataclass
class Metrics:
    """Counters for /metrics."""

    step_seconds: float = 0.0
    steps: int = 0
    job_seconds: float = 0.0
    jobs: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def step(self, seconds: float) -> None:
        with self.lock:
            self.step_seconds += seconds
            self.steps += 1

    def job(self, seconds: float) -> None:
        with self.lock:
            self.job_seconds += seconds
            self.jobs += 1


def read_request(job: Job, folder: Any) -> GenerationRequest:
    """The stored job as the request it was admitted as (its input files read back)."""
    params = {k: v for k, v in job.params.items() if v is not None}
    inputs: dict[str, Any] = {}
    if job.inputs.get("references"):
        inputs["references"] = tuple((folder / name).read_bytes() for name in job.inputs["references"])
    for slot in ("init_image", "mask"):
        if job.inputs.get(slot):
            inputs[slot] = (folder / job.inputs[slot]).read_bytes()
    return GenerationRequest(**params, **inputs)


def save_outputs(result: GenerationResult, folder: Any, options: dict[str, Any]) -> list[dict[str, Any]]:
    """Write each image in the job's folder in the asked format; PNGs carry their settings."""
    fmt = options.get("output_format") or "png"
    quality = options.get("output_compression")
    out = []
    for i, image in enumerate(result.images):
        name = f"out-{i}.{fmt}"
        target = folder / name
        tmp = target.with_suffix(".tmp")
        if fmt == "png":
            images.save_png(image, tmp, result.metadata(i))
        else:
            image.save(tmp, format=fmt.upper(), quality=90 if quality is None else quality)
        tmp.replace(target)  # a complete file or none, even when killed mid-write
        out.append({"file": name, "seed": result.seeds[i], "width": image.width, "height": image.height})
    return out


class LocalWorker:
    """A thread in this process that owns the `Pipeline`."""

    def __init__(
        self,
        jobs: Jobs,
        load: Callable[[], Pipeline],
        limits: Limits,
        on_final: Callable[[Job], None] = lambda job: None,
        on_claim: Callable[[], None] = lambda: None,
    ) -> None:
        self.jobs, self._load, self.limits = jobs, load, limits
        self.on_final, self.on_claim = on_final, on_claim
        self.state: State = "starting"
        self.error: str | None = None
        self.spec: ModelSpec | None = None
        self.pipeline: Pipeline | None = None
        self.previewer: Previewer | None = None
        self.running: str | None = None
        self.metrics = Metrics()
        self._cancel = threading.Event()
        self._cancel_wanted: set[str] = set()
        self._requeue = False  # the running job stops because the server does: back to the queue
        self._accepting = True
        self._thread = threading.Thread(target=self._main, name="fluxforge-worker", daemon=True)
        self._idle = threading.Event()
        self._idle.set()

    def start(self) -> None:
        self._thread.start()

    def model_info(self) -> dict[str, Any]:
        if self.pipeline is None:
            return {}
        pipe = self.pipeline
        d = pipe.variant.defaults
        return {
            "id": pipe.variant.name,
            "family": pipe.variant.family,
            "defaults": {
                "steps": d.steps,
                "guidance": d.guidance,
                "width": pipe.default_size,
                "height": pipe.default_size,
            },
            "guidance": d.guidance_mode != "none",
            "negative_prompt": d.guidance_mode == "cfg",
            "reference_kv": bool(d.reference_kv),
            "dtype": str(pipe.transformer.dtype).removeprefix("torch."),
            "device": str(pipe.device),
            "caches": pipe.caches.stats(),
        }

    def cancel(self, job_id: str) -> bool:
        """Stop the job at its next step (a job claimed but not yet started: before its first)."""
        self._cancel_wanted.add(job_id)
        if self.running == job_id:
            self._cancel.set()
            return True
        return False

    def stop(self, grace: float) -> None:
        """Take no more jobs; give the running one `grace` seconds, then put it back in the queue."""
        self._accepting = False
        self.state = "stopping"
        self.jobs.wake()
        if not self._idle.wait(grace):
            log.warning(
                "the running job %s did not finish within %.0f s: back to the queue", self.running, grace
            )
            self._requeue = True
            self._cancel.set()
            self._idle.wait(30)

    # ---------------------------------------------------------------------------------------------------

    def _main(self) -> None:
        try:
            pipe = self._load()
            pipe.limits = self.limits
            self.previewer = Previewer.fit(pipe.vae)
            self.pipeline, self.spec = pipe, pipe.spec
        except Exception as exc:  # the server keeps answering /health with the reason
            log.exception("the model could not be loaded")
            self.error, self.state = f"{type(exc).__name__}: {exc}", "failed"
            return
        self.state = "ready"
        log.info("model %s ready", pipe.variant.name)
        while self._accepting:
            job = self.jobs.store.claim()
            if job is None:
                self.jobs.wait_for_work(1.0)
                continue
            self._idle.clear()
            try:
                self.on_claim()
                self._run(job)
            finally:
                self.running = None
                self._cancel_wanted.discard(job.id)
                self._idle.set()

    def _run(self, job: Job) -> None:
        store, jobs = self.jobs.store, self.jobs
        self.running = job.id
        self._cancel.clear()
        if job.id in self._cancel_wanted:
            self._cancel.set()
        started = time.perf_counter()
        jobs.publish(job.id, "started", {"attempt": job.attempts})
        folder = store.folder(job.id)
        for stale in folder.glob("out-*"):  # a previous attempt's, cut short by a crash
            stale.unlink()
        outcome: tuple[str, dict[str, Any]]
        try:
            request = read_request(job, folder)
            result = self.pipeline.run(request, on_step=self._on_step(job), cancel=self._cancel)
            saved = save_outputs(result, folder, job.options)
            info = _json_safe(result.info)
            del result
            outcome = ("succeeded", {"result": {"images": saved, "info": info}})
        except GenerationCancelled as exc:
            if self._requeue:
                store.requeue(job.id)
                return
            outcome = ("canceled", {"error": {"code": "canceled", "message": str(exc), "param": None}})
        except Exception as exc:
            outcome = ("failed", {"error": _failure(exc, job)})
        finally:
            gc.collect()  # the step tensors sit in reference cycles with the traceback; release them now
        status, fields = outcome
        if store.finish(job.id, status, **fields):
            self.metrics.job(time.perf_counter() - started)
            final = store.get(job.id)
            payload = {"status": status, **fields}
            jobs.publish(job.id, {"succeeded": "completed"}.get(status, status), payload)
            self.on_final(final)

    def _on_step(self, job: Job) -> Callable[[StepInfo], None]:
        last = [time.perf_counter()]
        grid = self.pipeline.pixels_per_token
        h, w = job.options["height"] // grid, job.options["width"] // grid  # the size validation resolved

        def on_step(info: StepInfo) -> None:
            now = time.perf_counter()
            self.metrics.step(now - last[0])
            last[0] = now
            event = self.jobs.publish(
                job.id, "progress", {"step": info.step, "total": info.total}, persist=False
            )
            self.jobs.store.progress(job.id, info.step, info.total, event)
            if (
                self.previewer is not None
                and info.denoised is not None
                and self.jobs.events.listening(job.id)
            ):
                jpeg = self.previewer.jpeg(info.denoised, h, w)
                data = {"step": info.step, "total": info.total, "image": base64.b64encode(jpeg).decode()}
                self.jobs.publish(job.id, "preview", data, persist=False)

        return on_step


def _failure(exc: BaseException, job: Job) -> dict[str, Any]:
    import torch

    if isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower():
        log.error("job %s ran out of memory: %s", job.id, exc)
        return {"code": "out_of_memory", "message": f"the device ran out of memory: {exc}", "param": None}
    if isinstance(exc, (ValueError, TypeError)):
        from fluxforge.request import param_of

        return {"code": "invalid_request", "message": str(exc), "param": param_of(exc)}
    if isinstance(exc, (RuntimeError, OSError)) and any(w in str(exc) for w in ("CUDA", "device", "MPS")):
        log.error("job %s hit a device error: %s", job.id, exc)
        return {"code": "device_error", "message": str(exc), "param": None}
    log.exception("job %s failed", job.id)
    return {"code": "internal_error", "message": f"{type(exc).__name__}: {exc}", "param": None}


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and value != value:
        return None
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


class Webhooks:
    """POSTs each finished job to its `webhook_url` from a thread of its own, never blocking the worker:
    signed with HMAC-SHA256 of the body under the server's secret (`X-Fluxforge-Signature: sha256=<hex>`),
    retried with back-off, and remembered in the store until delivered, so a restart resends them."""

    DELAYS = (0.5, 1, 2, 4, 8)  # seconds before each retry

    def __init__(self, jobs: Jobs, secret: str | None, body: Callable[[Job], dict[str, Any]]) -> None:
        self.jobs, self.secret, self.body = jobs, secret, body
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._main, name="fluxforge-webhooks", daemon=True)

    def start(self) -> None:
        for job_id in self.jobs.store.webhooks_pending():
            self._queue.put(job_id)
        self._thread.start()

    def notify(self, job: Job) -> None:
        if job.webhook_url:
            self._queue.put(job.id)

    def stop(self) -> None:
        self._queue.put(None)

    def _main(self) -> None:
        import httpx

        with httpx.Client(timeout=10) as client:
            while (job_id := self._queue.get()) is not None:
                job = self.jobs.store.get(job_id)
                if job is None or not job.webhook_url:
                    continue
                self._deliver(client, job)

    def _deliver(self, client: Any, job: Job) -> None:
        body = json.dumps(self.body(job), separators=(",", ":")).encode()
        signature = hmac.new((self.secret or "").encode(), body, hashlib.sha256).hexdigest()
        headers = {"Content-Type": "application/json", "X-Fluxforge-Signature": f"sha256={signature}"}
        for attempt, delay in enumerate((0, *self.DELAYS)):
            time.sleep(delay)
            try:
                response = client.post(job.webhook_url, content=body, headers=headers)
                if response.status_code < 300:
                    self.jobs.store.webhook_done(job.id)
                    return
                reason = f"HTTP {response.status_code}"
            except Exception as exc:  # network errors of any kind: retry
                reason = f"{type(exc).__name__}: {exc}"
            log.warning("webhook for %s, attempt %d: %s", job.id, attempt + 1, reason)
        log.error("webhook for %s given up after %d attempts", job.id, len(self.DELAYS) + 1)
        self.jobs.store.webhook_done(job.id)
