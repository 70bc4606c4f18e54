"""The one owner of the model: takes jobs from the queue (several at once where they batch), runs them through
`Pipeline.run_batch`, and reports every step as an event.

The HTTP layer sees a worker only through the `Worker` interface (state, model facts, cancel, stop).
`LocalWorker` runs the model in this process; `fluxforge.server.ray.RayWorker` is the same job flow with
`_load_model` and `_execute` sending each job to a Ray Serve model replica, with one slot (a thread) per
job the replicas can take at once. A job's failure (bad input that slipped through, out of memory, a
device error, a bug) fails that job with a code and leaves the worker serving the next one; a job whose
replica died runs again (once).
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

import torch

from fluxforge import images
from fluxforge.errors import GenerationCancelled
from fluxforge.pipeline import GenerationRequest, GenerationResult, Pipeline
from fluxforge.preview import Previewer
from fluxforge.request import Limits, ModelSpec, param_of
from fluxforge.sampling import StepInfo
from fluxforge.server.jobs import MAX_ATTEMPTS, Job, Jobs
from fluxforge.server.protocol import to_request

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


class ReplicaLost(Exception):
    """The process running a job died under it (a Ray replica); the job may run again elsewhere."""


@dataclass(frozen=True)
class ModelFacts:
    """What the job flow needs of the model beside validation: the token grid, the latent channels and
    dtype (a batch's noise is drawn here), and the map for previews."""

    pixels_per_token: int
    latent_channels: int
    dtype: torch.dtype
    previewer: Previewer | None


@dataclass
class _Slot:
    """One job (or batch) running: its ids, its cancel event, whether it goes back to the queue."""

    batch: tuple[str, ...] = ()
    cancel: threading.Event = field(default_factory=threading.Event)
    requeue: bool = False


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
    inputs = {
        slot: [(folder / n).read_bytes() for n in names]
        if isinstance(names, list)
        else (folder / names).read_bytes()
        for slot, names in job.inputs.items()
    }
    return to_request(job.params, inputs)


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
    """Threads in this process (one per slot) that run jobs; the model is the `Pipeline` `load` returns."""

    def __init__(
        self,
        jobs: Jobs,
        load: Callable[[], Pipeline],
        limits: Limits,
        on_final: Callable[[Job], None] = lambda job: None,
        on_claim: Callable[[], None] = lambda: None,
        max_batch: int = 1,
        slots: int = 1,
    ) -> None:
        self.jobs, self._load, self.limits = jobs, load, limits
        self.on_final, self.on_claim = on_final, on_claim
        self.state: State = "starting"
        self.error: str | None = None
        self.spec: ModelSpec | None = None
        self.pipeline: Pipeline | None = None
        self.facts: ModelFacts | None = None
        self.metrics = Metrics()
        self._cancel_wanted: set[str] = set()
        self.max_batch = max_batch
        self._slots = [_Slot() for _ in range(slots)]
        self._accepting = True
        self._thread = threading.Thread(target=self._main, name="fluxforge-worker", daemon=True)
        self._slot_threads: list[threading.Thread] = []  # the slots' beyond the first, which _thread runs
        self._busy = 0  # slots running a job now
        self._idle = threading.Condition()

    def start(self) -> None:
        self._thread.start()

    @property
    def running(self) -> str | None:
        """The id of a job running now (the first busy slot's), or None."""
        return next((slot.batch[0] for slot in self._slots if slot.batch), None)

    @property
    def previewer(self) -> Previewer | None:
        return self.facts.previewer if self.facts else None

    def model_info(self) -> dict[str, Any]:
        return {} if self.pipeline is None else pipeline_info(self.pipeline)

    def cancel(self, job_id: str) -> bool:
        """Stop the job at its next step (a job claimed but not yet started: before its first). A job in a
        batch stops the batch; its companions go back to the front of the queue."""
        self._cancel_wanted.add(job_id)
        for slot in self._slots:
            if job_id in slot.batch:
                slot.cancel.set()
                return True
        return False

    def stop(self, grace: float) -> None:
        """Take no more jobs; give the running ones `grace` seconds, then put them back in the queue."""
        self._accepting = False
        self.state = "stopping"
        self.jobs.wake()
        with self._idle:
            if not self._idle.wait_for(lambda: self._busy == 0, grace):
                log.warning(
                    "the running job %s did not finish within %.0f s: back to the queue", self.running, grace
                )
                for slot in self._slots:
                    slot.requeue = True
                    slot.cancel.set()
                self._idle.wait_for(lambda: self._busy == 0, 30)
        # The slots see that they may take no more jobs at their next look at the queue: let them leave,
        # so that nothing touches the job store once this returns (the caller may close it).
        for thread in (self._thread, *self._slot_threads):
            if thread.is_alive() and thread is not threading.current_thread():
                thread.join(timeout=5)

    # -- the model: what another worker replaces -----------------------------------------------------------

    def _load_model(self) -> None:
        """Load the model; set `spec` and `facts` (and `pipeline`, for a model in this process)."""
        pipe = self._load()
        pipe.limits = self.limits
        self.facts = facts_of(pipe, Previewer.fit(pipe.vae))
        self.pipeline, self.spec = pipe, pipe.spec

    def _execute(
        self,
        requests: list[GenerationRequest],
        on_step: Callable[[StepInfo], None],
        cancel: threading.Event,
    ) -> list[GenerationResult]:
        """Run a batch of jobs' requests (often one) on the model, one result each."""
        return self.pipeline.run_batch(requests, on_step=on_step, cancel=cancel)

    # ---------------------------------------------------------------------------------------------------

    def _main(self) -> None:
        try:
            self._load_model()
        except Exception as exc:  # the server keeps answering /health with the reason
            log.exception("the model could not be loaded")
            self.error, self.state = f"{type(exc).__name__}: {exc}", "failed"
            return
        self.state = "ready"
        log.info("model %s ready", self.model_info().get("id"))
        for i, slot in enumerate(self._slots[1:], 1):
            name = f"fluxforge-worker-{i}"
            thread = threading.Thread(target=self._serve, args=(slot,), name=name, daemon=True)
            self._slot_threads.append(thread)
            thread.start()
        self._serve(self._slots[0])

    def _serve(self, slot: _Slot) -> None:
        """One slot: claim the oldest job (and those that batch with it), run it, and again."""
        while self._accepting:
            job = self.jobs.store.claim()
            if job is None:
                self.jobs.wait_for_work(1.0)
                continue
            batch = [job]
            key = batch_key(job)
            if key is not None and self.max_batch > 1:
                batch += self.jobs.store.claim_matching(
                    lambda j, k=key: batch_key(j) == k, self.max_batch - 1
                )
            with self._idle:
                self._busy += 1
            try:
                self.on_claim()
                self._run(batch, slot)
            finally:
                slot.batch = ()
                self._cancel_wanted.difference_update(j.id for j in batch)
                with self._idle:
                    self._busy -= 1
                    self._idle.notify_all()

    def _run(self, batch: list[Job], slot: _Slot) -> None:
        store, jobs = self.jobs.store, self.jobs
        slot.batch = tuple(j.id for j in batch)
        slot.cancel.clear()
        if self._cancel_wanted.intersection(slot.batch):
            slot.cancel.set()
        started = time.perf_counter()
        for job in batch:
            jobs.publish(job.id, "started", {"attempt": job.attempts, "batch_size": len(batch)})
            for stale in store.folder(job.id).glob("out-*"):  # a previous attempt's, cut short by a crash
                stale.unlink()
        outcomes: dict[str, tuple[str, dict[str, Any]]] = {}
        try:
            # run_batch checks each job alone against the limits: together they may hold more images.
            requests = [read_request(job, store.folder(job.id)) for job in batch]
            results = self._execute(requests, self._on_step(batch), slot.cancel)
            for job, result in zip(batch, results, strict=True):
                saved = save_outputs(result, store.folder(job.id), job.options)
                info = _json_safe(result.info)
                outcomes[job.id] = ("succeeded", {"result": {"images": saved, "info": info}})
            del results, result
        except GenerationCancelled as exc:
            for job in batch:
                if slot.requeue:
                    store.requeue(job.id)
                elif job.id in self._cancel_wanted:
                    error = {"code": "canceled", "message": str(exc), "param": None}
                    outcomes[job.id] = ("canceled", {"error": error})
                else:  # stopped because a batch companion was canceled: it runs again, uncounted
                    store.requeue(job.id, count_attempt=False)
                    jobs.publish(job.id, "queued", {"queue_position": 0}, persist=False)
        except ReplicaLost as exc:
            for job in batch:
                if job.attempts < MAX_ATTEMPTS:  # once more, on another replica
                    log.warning("job %s lost its model replica (%s): back to the queue", job.id, exc)
                    store.requeue(job.id)
                    jobs.publish(job.id, "queued", {"queue_position": 0}, persist=False)
                    jobs.wake()
                else:
                    message = f"the model replica running this job died, {job.attempts} times ({exc})"
                    error = {"code": "replica_died", "message": message, "param": None}
                    outcomes[job.id] = ("failed", {"error": error})
        except Exception as exc:
            for job in batch:
                outcomes[job.id] = ("failed", {"error": _failure(exc, job)})
        finally:
            gc.collect()  # the step tensors sit in reference cycles with the traceback; release them now
        for job in batch:
            if job.id not in outcomes:
                continue
            status, fields = outcomes[job.id]
            if store.finish(job.id, status, **fields):
                self.metrics.job(time.perf_counter() - started)
                payload = {"status": status, **fields}
                jobs.publish(job.id, {"succeeded": "completed"}.get(status, status), payload)
                self.on_final(store.get(job.id))

    def _on_step(self, batch: list[Job]) -> Callable[[StepInfo], None]:
        last = [time.perf_counter()]
        grid = self.facts.pixels_per_token
        job0 = batch[0]
        h, w = job0.options["height"] // grid, job0.options["width"] // grid  # the size validation resolved
        first_rows = [0]  # each job's first image in the batch
        for job in batch[:-1]:
            first_rows.append(first_rows[-1] + job.options["images"])

        def on_step(info: StepInfo) -> None:
            now = time.perf_counter()
            self.metrics.step(now - last[0])
            last[0] = now
            for i, job in enumerate(batch):
                event = self.jobs.publish(
                    job.id, "progress", {"step": info.step, "total": info.total}, persist=False
                )
                self.jobs.store.progress(job.id, info.step, info.total, event)
                if (
                    self.previewer is not None
                    and info.denoised is not None
                    and self.jobs.events.listening(job.id)
                ):
                    jpeg = self.previewer.jpeg(info.denoised, h, w, index=first_rows[i])
                    data = {"step": info.step, "total": info.total, "image": base64.b64encode(jpeg).decode()}
                    self.jobs.publish(job.id, "preview", data, persist=False)

        return on_step


def facts_of(pipe: Pipeline, previewer: Previewer | None) -> ModelFacts:
    config = pipe.transformer.config
    return ModelFacts(pipe.pixels_per_token, config.in_channels, pipe.transformer.dtype, previewer)


def pipeline_info(pipe: Pipeline) -> dict[str, Any]:
    """The model facts /v1/models, /v1/capabilities, /health and /metrics show."""
    d = pipe.variant.defaults
    return {
        "id": pipe.variant.name,
        "family": pipe.variant.family,
        "defaults": {
            "steps": d.steps,
            "guidance": d.guidance,
            "width": pipe.default_size,
            "height": pipe.default_size,
        },  # fmt: skip
        "guidance": d.guidance_mode != "none",
        "negative_prompt": d.guidance_mode == "cfg",
        "reference_kv": bool(d.reference_kv),
        "dtype": str(pipe.transformer.dtype).removeprefix("torch."),
        "device": str(pipe.device),
        "caches": pipe.caches.stats(),
        "loras": [adapter.describe() for adapter in pipe.loras.loaded.values()],
        "offload": str(pipe.offload.device) if pipe.offload else None,
    }


def batch_key(job: Job) -> str | None:
    """Jobs whose keys are equal run as one batch: the signature `request.batch_signature` gave on arrival
    (everything that shapes the computation; prompts, seeds, the number of images and the images'
    contents may differ). None: this job runs alone (a job stored before signatures, or a batch of
    prompt embeddings)."""
    signature = job.options.get("signature")
    if signature is None or not isinstance(job.params.get("prompt"), str):
        return None
    return json.dumps(signature, sort_keys=True)


def _failure(exc: BaseException, job: Job) -> dict[str, Any]:
    import torch

    if isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower():
        log.error("job %s ran out of memory: %s", job.id, exc)
        return {"code": "out_of_memory", "message": f"the device ran out of memory: {exc}", "param": None}
    if isinstance(exc, (ValueError, TypeError)):
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
