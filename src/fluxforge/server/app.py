"""The HTTP API of `fluxforge serve` (shared/SERVING.md): OpenAI-compatible image endpoints, durable async
jobs with SSE progress and cancel, and service endpoints; FastAPI routes over `Jobs` and a `Worker`.

Every route that generates turns its body into a `Submission` (protocol.py), validates it against the
loaded model with the Python API's own rules (`request.Validator`, no network runs), and queues it as a
job; a synchronous OpenAI call is a job too, waited for. Handlers never touch the model.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import math
import shutil
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from fluxforge.request import Limits, Validator, batch_signature
from fluxforge.server import protocol
from fluxforge.server.events import Event
from fluxforge.server.jobs import STATUSES, Job, Jobs, JobStore
from fluxforge.server.protocol import (
    MEDIA_TYPES,
    ApiError,
    ImageGenerationBody,
    JobBody,
    Names,
    Submission,
    api_error,
)
from fluxforge.server.worker import LocalWorker, Webhooks, Worker

log = logging.getLogger("fluxforge.server")

MODES = ["text-to-image", "references", "img2img", "inpaint"]
WEB = Path(__file__).with_name("web")
FINAL_EVENTS = ("completed", "failed", "canceled")  # the last event of every job


@dataclass
class Settings:
    """Everything `fluxforge serve` takes; the limits are enforced by the same rules as the Python API's."""

    model: str | None = None  # None: the built-in demo model
    vae: str | None = None
    text_encoder: str | None = None
    variant: str | None = None
    text_layers: tuple[int, ...] | None = None
    dtype: str = "auto"
    device: str = "cpu"
    data: Path = Path("fluxforge-data")
    max_queue: int = 16
    max_body_bytes: int = 32 * 1024 * 1024
    limits: Limits = field(default_factory=lambda: Limits(max_images=4))
    api_key: str | None = None
    webhook_secret: str | None = None
    grace: float = 30.0  # s a running job may take to finish after SIGTERM
    retention: float = 7 * 24 * 3600.0  # s finished jobs and their files are kept
    keepalive: float = 15.0  # s between SSE keep-alive comments
    cache_sizes: dict[str, int] | None = None  # bytes per cache (fluxforge.cache); None: the defaults
    max_batch: int = 1  # compatible waiting jobs (same shape and images) run as one batch of up to this many
    loras: tuple[tuple[str, str], ...] = ()  # (name, file): loaded at start, none active unless asked for
    offload: bool = False  # networks on the CPU between stages, each on `device` while it runs

    def capabilities(self) -> dict[str, int]:
        return {
            "max_references": self.limits.max_references,
            "max_pixels": self.limits.max_pixels,
            "max_input_pixels": self.limits.max_input_pixels,
            "max_n": self.limits.max_images,
            "max_queue": self.max_queue,
            "max_body_bytes": self.max_body_bytes,
            "max_prompt_chars": self.limits.max_prompt_chars,
            "max_steps": self.limits.max_steps,
        }


def load_pipeline(s: Settings) -> Any:
    """The Pipeline a server runs (in this process, or in each Ray replica): the model, its caches, its
    LoRAs (none active: a request opts in) and offload."""
    from fluxforge.cache import Caches
    from fluxforge.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(
        s.model,
        vae=s.vae,
        text_encoder=s.text_encoder,
        device="cpu" if s.offload else s.device,
        dtype=s.dtype,
        variant=s.variant,
        text_encoder_out_layers=s.text_layers,
    )
    pipe.caches = Caches(s.cache_sizes)
    for name, path in s.loras:
        pipe.load_lora(path, name=name)
    pipe.set_loras({})
    if s.offload:
        pipe.enable_offload(None if s.device == "cpu" else s.device)
    pipe.limits = s.limits
    return pipe


class Service:
    """The store, the queue, the worker and the webhooks of one server."""

    def __init__(
        self,
        settings: Settings,
        load: Callable[[], Any] | None = None,
        make_worker: Callable[..., Worker] = LocalWorker,
    ) -> None:
        self.settings = settings
        settings.data.mkdir(parents=True, exist_ok=True)
        self.store = JobStore(settings.data)
        self.jobs = Jobs(self.store, settings.max_queue)
        self.base_url = ""  # set from the first request; webhooks use it for absolute URLs
        self.webhooks = Webhooks(self.jobs, settings.webhook_secret, lambda job: job_json(job, self.base_url))
        self.worker: Worker = make_worker(
            self.jobs,
            load or self._load,
            settings.limits,
            on_final=self._final,
            on_claim=self.queue_moved,
            max_batch=settings.max_batch,
        )
        self._positions: dict[str, int | None] = {}  # the queue position last told to each queued job
        self.draining = False
        self.started = time.time()

    def _load(self) -> Any:
        return load_pipeline(self.settings)

    def start(self) -> None:
        requeued, failed = self.store.recover()
        if requeued or failed:
            log.warning(
                "recovered after a stop: %d jobs back in the queue, %d failed as interrupted",
                len(requeued),
                len(failed),
            )
        self.webhooks.start()
        self.worker.start()

    def stop(self) -> None:
        self.draining = True
        self.worker.stop(self.settings.grace)
        self.webhooks.stop()

    def _final(self, job: Job) -> None:
        self.webhooks.notify(job)

    def queue_moved(self) -> None:
        """Tell the subscribers of queued jobs their new place, when it changed (a job ahead of them started
        or was canceled)."""
        queued = self.store.list("queued", limit=self.settings.max_queue + 1)
        for job in queued:
            if self._positions.get(job.id) != job.queue_position and self.jobs.events.listening(job.id):
                self._positions[job.id] = job.queue_position
                self.jobs.publish(job.id, "queued", {"queue_position": job.queue_position}, persist=False)
        waiting = {job.id for job in queued}
        for job_id in [k for k in self._positions if k not in waiting]:
            del self._positions[job_id]

    # ---------------------------------------------------------------------------------------------------

    def check_ready(self) -> None:
        if self.draining or self.worker.state == "stopping":
            raise ApiError(
                503,
                "the server is shutting down; retry on another instance or later",
                "shutting_down",
                headers={"Retry-After": "5"},
            )
        if self.worker.state == "starting":
            raise ApiError(
                503,
                "the model is still loading; retry in a few seconds",
                "loading",
                headers={"Retry-After": "2"},
            )
        if self.worker.state == "failed":
            raise ApiError(
                503, f"the model failed to load: {getattr(self.worker, 'error', '')}", "model_failed"
            )

    def admit(
        self, sub: Submission, idempotency_key: str | None = None, body_hash: str | None = None
    ) -> tuple[Job, bool]:
        """Validate and queue a submission (runs in a thread: validation decodes the images)."""
        self.check_ready()
        if idempotency_key is not None:
            existing = self.store.by_key(idempotency_key)
            if existing is not None:
                return self._same_body(existing, body_hash), False
        if sub.webhook_url and not self.settings.webhook_secret:
            raise ApiError(
                400,
                "webhook_url needs a server started with --webhook-secret (webhooks are signed)",
                "webhooks_off",
                "webhook_url",
            )
        request = sub.request()
        try:
            plan = Validator(self.worker.spec, self.settings.limits).plan(request)
        except (ValueError, TypeError) as exc:
            raise api_error(exc, sub.names) from None
        params = dict(sub.params)
        if plan.seeds and params.get("seed") is None:
            params["seed"] = plan.seeds[0]  # drawn now, so that a rerun after a crash gives the same images
        options = dict(
            sub.options,
            mode=plan.mode,
            width=plan.width,
            height=plan.height,
            images=plan.batch,
            steps=plan.steps,
        )
        options["signature"] = batch_signature(plan, request)  # jobs with equal signatures may batch
        job_id = self.store.new_id()
        folder = self.store.folder(job_id)
        folder.mkdir(parents=True)
        inputs: dict[str, Any] = {}
        for slot, value in sub.inputs.items():
            if slot == "references":
                names = [f"in-references-{i}" for i in range(len(value))]
                for name, data in zip(names, value, strict=True):
                    (folder / name).write_bytes(data)
                inputs[slot] = names
            else:
                (folder / f"in-{slot}").write_bytes(value)
                inputs[slot] = f"in-{slot}"
        job = Job(
            job_id,
            0,
            sub.kind,
            "queued",
            params,
            inputs,
            options,
            time.time(),
            idempotency_key=idempotency_key,
            body_hash=body_hash,
            webhook_url=sub.webhook_url,
        )
        try:
            stored, created = self.jobs.submit(job)
        except Exception as exc:
            shutil.rmtree(folder, ignore_errors=True)
            raise api_error(exc, retry_after=self.retry_after()) or exc from None
        if not created:
            shutil.rmtree(folder, ignore_errors=True)
            return self._same_body(stored, body_hash), False
        return stored, True

    def _same_body(self, job: Job, body_hash: str | None) -> Job:
        if job.body_hash != body_hash:
            raise ApiError(
                422,
                "this Idempotency-Key was used with a different body; use a new key for a new request",
                "idempotency_key_reused",
                "Idempotency-Key",
            )
        return job

    def retry_after(self) -> int:
        """Seconds until the queue has room, estimated from the time per job so far."""
        metrics = getattr(self.worker, "metrics", None)
        per_job = metrics.job_seconds / metrics.jobs if metrics and metrics.jobs else 1.0
        return max(1, math.ceil(per_job))

    def cancel(self, job_id: str) -> Job:
        job = self.get(job_id)
        if job.final:
            raise ApiError(
                409, f"job {job_id} has already {job.status}; nothing to cancel", "job_finished", "id"
            )
        error = {"code": "canceled", "message": "canceled while queued", "param": None}
        if job.status == "queued" and self.store.finish(
            job_id, "canceled", error=error, only_from=("queued",)
        ):
            self.jobs.publish(job_id, "canceled", {"status": "canceled", "error": error})
            self._final(self.store.get(job_id))
            self.queue_moved()
        else:
            self.worker.cancel(job_id)  # running: it stops at the next step
        return self.get(job_id)

    def clean(self, now: float | None = None) -> list[str]:
        """Delete the finished jobs older than `--retention`, with their files; returns their ids."""
        cutoff = (time.time() if now is None else now) - self.settings.retention
        deleted = [job_id for job_id in self.store.expired(cutoff) if self.store.delete(job_id)]
        for job_id in deleted:
            self.jobs.events.forget(job_id)
        return deleted

    def get(self, job_id: str) -> Job:
        job = self.store.get(job_id)
        if job is None:
            raise ApiError(404, f"no job {job_id!r}", "job_not_found", "id")
        return job


# -------------------------------------------------------------------------------------------------------
# Representations


def job_json(job: Job, base: str) -> dict[str, Any]:
    url = f"{base}/v1/jobs/{job.id}"
    result = None
    if job.result is not None:
        result = {
            "images": [
                {"url": f"{url}/images/{i}", "seed": im["seed"], "width": im["width"], "height": im["height"]}
                for i, im in enumerate(job.result["images"])
            ],
            "info": job.result["info"],
        }
    request = {k: v for k, v in job.params.items() if v is not None}
    for slot, files in job.inputs.items():
        request[slot] = len(files) if isinstance(files, list) else 1  # images travel once, in the request
    return {
        "id": job.id,
        "object": "job",
        "kind": job.kind,
        "status": job.status,
        "mode": job.options.get("mode"),
        "queue_position": job.queue_position if job.status == "queued" else None,
        "progress": {"step": job.step or 0, "total": job.total or job.options.get("steps")},
        "created_at": job.created_at,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
        "attempts": job.attempts,
        "request": request,
        "result": result,
        "error": job.error,
        "urls": {"self": url, "events": f"{url}/events", "cancel": f"{url}/cancel"},
    }


def usage(job: Job, grid: int = 16) -> dict[str, Any]:
    """OpenAI's usage block in tokens the model attended to: text tokens, image tokens in and out."""
    info = job.result["info"] if job.result else {}
    text = int(info.get("max_sequence_length") or 0)
    sizes = info.get("reference_sizes") or []
    image_in = sum((w // grid) * (h // grid) for w, h in sizes)
    out = (job.options["width"] // grid) * (job.options["height"] // grid) * job.options["images"]
    return {
        "input_tokens": text + image_in,
        "output_tokens": out,
        "total_tokens": text + image_in + out,
        "input_tokens_details": {"text_tokens": text, "image_tokens": image_in},
    }


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(BaseModel):
    error: ErrorDetail


_ERRORS = {
    code: {"model": ErrorBody, "description": text}
    for code, text in {
        400: "invalid value or combination",
        401: "missing or wrong API key",
        413: "body or image too large",
        422: "a body that does not parse",
        429: "queue full (see Retry-After)",
        503: "loading or shutting down",
    }.items()
}
_JOB_ERRORS = {**_ERRORS, 404: {"model": ErrorBody, "description": "unknown job"}}


def _edit_schema() -> dict[str, Any]:
    props: dict[str, Any] = {}
    for name, kind in protocol._EDIT_FIELDS.items():
        if kind is None:
            binary = {"type": "string", "format": "binary"}
            props[name] = {"type": "array", "items": binary} if name == "image[]" else binary
        elif isinstance(kind, tuple):
            props[name] = {"type": "string", "enum": list(kind)}
        else:
            props[name] = {"type": {str: "string", int: "integer", float: "number", bool: "boolean"}[kind]}
    schema = {"type": "object", "properties": props, "required": ["prompt"]}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}}


# -------------------------------------------------------------------------------------------------------
# The app


def create_app(
    settings: Settings,
    load: Callable[[], Any] | None = None,
    make_worker: Callable[..., Worker] = LocalWorker,
) -> FastAPI:
    """The FastAPI app; `load` returns the Pipeline (default: the model in `settings`); `make_worker` builds
    the worker from LocalWorker's arguments (fluxforge.server.ray passes its RayWorker)."""
    service = Service(settings, load, make_worker)

    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service.start()
        janitor = asyncio.create_task(_janitor(service))
        yield
        janitor.cancel()
        await run_in_threadpool(service.stop)

    app = FastAPI(
        title="fluxforge",
        version="0.1.0",
        description="FLUX.2 image generation: OpenAI-compatible endpoints, durable jobs, live progress.",
        lifespan=lifespan,
    )
    app.state.service = service
    app.add_middleware(_BodyLimit, limit=settings.max_body_bytes)

    def authorize(request: Request) -> None:
        if settings.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), settings.api_key.encode()
        ):
            raise ApiError(401, "missing or wrong API key: send Authorization: Bearer KEY", "invalid_api_key")

    def base(request: Request) -> str:
        url = str(request.base_url).rstrip("/")
        service.base_url = service.base_url or url
        return url

    # --- errors ----------------------------------------------------------------------------------------

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path", "header")]
        param = ".".join(loc) or None
        message = f"{param + ': ' if param else ''}{first.get('msg', 'the body does not parse')}"
        if first.get("type") == "json_invalid":  # its loc is a character offset, not a field
            where = loc[0] if loc else "?"
            param, message = None, f"the body is not valid JSON (at character {where}); send a JSON object"
        return JSONResponse(ApiError(422, message, "invalid_body", param).body(), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        error = ApiError(exc.status_code, str(exc.detail), code)
        return JSONResponse(error.body(), status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        log.error("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
        error = ApiError(500, f"internal error ({type(exc).__name__}); it has been logged", "internal_error")
        return JSONResponse(error.body(), status_code=500)

    # --- the page (web/): static files over this same API, open without the key ---------------------

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(WEB / "index.html", media_type="text/html")

    app.mount("/web", StaticFiles(directory=WEB), name="web")

    # --- service ---------------------------------------------------------------------------------------

    @app.get("/health", tags=["service"])
    def health() -> JSONResponse:
        worker = service.worker
        state = "stopping" if service.draining else worker.state
        if state == "ready" and worker.running is not None:
            state = "busy"
        body = {
            "status": state,
            "queue": service.store.count("queued"),
            "model": worker.model_info().get("id"),
        }
        if state == "failed":
            body["error"] = getattr(worker, "error", None)
        return JSONResponse(body, status_code=200 if state in ("ready", "busy") else 503)

    def model_object() -> dict[str, Any]:
        service.check_ready()
        info = service.worker.model_info()
        return {"id": info["id"], "object": "model", "created": int(service.started), "owned_by": "fluxforge"}

    @app.get("/v1/models", tags=["service"], responses=_ERRORS)
    def models(request: Request) -> dict[str, Any]:
        authorize(request)
        return {"object": "list", "data": [model_object()]}

    @app.get("/v1/models/{model_id}", tags=["service"], responses=_ERRORS)
    def model(model_id: str, request: Request) -> dict[str, Any]:
        authorize(request)
        found = model_object()
        if model_id != found["id"]:
            raise ApiError(
                404,
                f"model {model_id!r} is not loaded; this server runs {found['id']!r}",
                "model_not_found",
                "model",
            )
        return found

    @app.get("/v1/capabilities", tags=["service"], responses=_ERRORS)
    def capabilities(request: Request) -> dict[str, Any]:
        authorize(request)
        service.check_ready()
        info = service.worker.model_info()
        return {
            "model": info["id"],
            "modes": MODES,
            "limits": settings.capabilities(),
            "defaults": info["defaults"],
            "guidance": info["guidance"],
            "negative_prompt": info["negative_prompt"],
            "reference_kv": info["reference_kv"],
            "output_formats": list(MEDIA_TYPES),
            "api_key": settings.api_key is not None,
            "webhooks": settings.webhook_secret is not None,
            "caches": info.get("caches", {}),
            "loras": info.get("loras", []),
        }

    @app.get("/metrics", tags=["service"], response_class=Response)
    def metrics(request: Request) -> Response:
        authorize(request)
        return Response(_prometheus(service), media_type="text/plain; version=0.0.4")

    # --- OpenAI-compatible ------------------------------------------------------------------------------

    @app.post("/v1/images/generations", tags=["openai"], responses=_ERRORS)
    async def generations(body: ImageGenerationBody, request: Request) -> Any:
        authorize(request)
        _check_model(service, body.model)
        sub = _openai(protocol.generation_submission, body)
        return await _openai_call(service, sub, request, "image_generation")

    @app.post("/v1/images/edits", tags=["openai"], responses=_ERRORS, openapi_extra=_edit_schema())
    async def edits(request: Request) -> Any:
        authorize(request)
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise ApiError(
                422, "the body must be multipart/form-data, as the OpenAI client sends it", "invalid_body"
            )
        try:
            form = await request.form(max_files=100, max_fields=100)
        except Exception as exc:  # a malformed multipart body
            raise ApiError(422, f"the multipart body does not parse: {exc}", "invalid_body") from None
        fields: dict[str, Any] = {}
        for key in form:
            values = form.getlist(key)
            fields[key] = values if key == "image[]" or (key == "image" and len(values) > 1) else values[0]
        one = fields.get("image")
        image_field = "image[]" if "image[]" in fields or isinstance(one, list) else "image"
        uploads = (
            fields.get("image[]", []) if image_field == "image[]" else ([one] if one is not None else [])
        )
        if image_field == "image[]" and isinstance(one, list):
            uploads = one
        images = [
            await _read_upload(u, f"image[{i}]" if image_field == "image[]" else "image")
            for i, u in enumerate(uploads)
        ]
        mask = await _read_upload(fields["mask"], "mask") if "mask" in fields else None
        model_name = fields.get("model")
        _check_model(service, model_name if isinstance(model_name, str) else None)
        sub = _openai(protocol.edit_submission, fields, images, image_field, mask)
        return await _openai_call(service, sub, request, "image_edit")

    # --- jobs ------------------------------------------------------------------------------------------

    @app.post(
        "/v1/jobs",
        tags=["jobs"],
        status_code=202,
        responses={**_ERRORS, 200: {"description": "the job created earlier with this Idempotency-Key"}},
    )
    async def create_job(body: JobBody, request: Request) -> JSONResponse:
        authorize(request)
        key = request.headers.get("idempotency-key")
        digest = hashlib.sha256(json.dumps(body.model_dump(), sort_keys=True).encode()).hexdigest()
        try:
            sub = protocol.job_submission(body)
        except (ValueError, TypeError) as exc:
            raise api_error(exc) from None
        job, created = await run_in_threadpool(service.admit, sub, key, digest)
        data = job_json(job, base(request))
        return JSONResponse(data, status_code=202 if created else 200)

    @app.get("/v1/jobs", tags=["jobs"], responses=_ERRORS)
    def list_jobs(request: Request, status: str | None = None, limit: int = 20) -> dict[str, Any]:
        authorize(request)
        if status is not None and status not in STATUSES:
            raise ApiError(
                400, f"status must be one of {', '.join(STATUSES)}, got {status!r}", "invalid_value", "status"
            )
        if not 1 <= limit <= 100:
            raise ApiError(400, f"limit must be in [1, 100], got {limit}", "invalid_value", "limit")
        url = base(request)
        return {"object": "list", "data": [job_json(j, url) for j in service.store.list(status, limit)]}

    @app.get("/v1/jobs/{job_id}", tags=["jobs"], responses=_JOB_ERRORS)
    def get_job(job_id: str, request: Request) -> dict[str, Any]:
        authorize(request)
        return job_json(service.get(job_id), base(request))

    @app.delete("/v1/jobs/{job_id}", tags=["jobs"], responses={**_JOB_ERRORS, 409: {"model": ErrorBody}})
    def delete_job(job_id: str, request: Request) -> dict[str, Any]:
        authorize(request)
        job = service.get(job_id)
        if not job.final or not service.store.delete(job_id):
            raise ApiError(
                409,
                f"job {job_id} is {job.status}; cancel it first, then delete it",
                "job_not_finished",
                "id",
            )
        service.jobs.events.forget(job_id)
        return {"id": job_id, "object": "job", "deleted": True}

    @app.post(
        "/v1/jobs/{job_id}/cancel",
        tags=["jobs"],
        status_code=202,
        responses={**_JOB_ERRORS, 409: {"model": ErrorBody}},
    )
    def cancel_job(job_id: str, request: Request) -> JSONResponse:
        authorize(request)
        job = service.cancel(job_id)
        return JSONResponse(job_json(job, base(request)), status_code=202)

    @app.get(
        "/v1/jobs/{job_id}/images/{index}", tags=["jobs"], response_class=FileResponse, responses=_JOB_ERRORS
    )
    def job_image(job_id: str, index: int, request: Request) -> FileResponse:
        authorize(request)
        job = service.get(job_id)
        produced = job.result["images"] if job.result else []
        if not 0 <= index < len(produced):
            what = f"{len(produced)} images" if job.status == "succeeded" else f"no images yet ({job.status})"
            raise ApiError(404, f"job {job_id} has {what}; no image {index}", "image_not_found", "index")
        name = produced[index]["file"]
        media = MEDIA_TYPES[name.rsplit(".", 1)[-1]]
        return FileResponse(service.store.folder(job_id) / name, media_type=media)

    @app.get("/v1/jobs/{job_id}/events", tags=["jobs"], responses=_JOB_ERRORS)
    async def job_events(job_id: str, request: Request) -> StreamingResponse:
        authorize(request)
        service.get(job_id)
        last = request.headers.get("last-event-id")
        after = int(last) if last and last.isdigit() else None
        stream = _job_stream(service, job_id, after, base(request), request)
        return StreamingResponse(stream, media_type="text/event-stream", headers=_SSE_HEADERS)

    return app


_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _check_model(service: Service, name: str | None) -> None:
    service.check_ready()
    loaded = service.worker.model_info()["id"]
    if name is not None and name not in (loaded, "fluxforge"):
        raise ApiError(
            400,
            f"model {name!r} is not loaded; this server runs {loaded!r} (or leave model out)",
            "model_not_found",
            "model",
        )


def _openai(make: Callable[..., Submission], *args: Any) -> Submission:
    try:
        return make(*args)
    except (ValueError, TypeError) as exc:
        raise api_error(exc, Names({"num_images": "n"})) from None


async def _read_upload(value: Any, param: str) -> bytes:
    if not isinstance(value, UploadFile):
        raise ApiError(
            400, f"{param} must be a file (multipart file upload), not a text field", "invalid_value", param
        )
    return await value.read()


async def _wait_final(service: Service, job_id: str, request: Request) -> Job:
    """Wait for a job to finish; cancel it if the client goes away first."""
    with service.jobs.events.subscribe(job_id, lambda: 0)[0] as sub:
        job = service.store.get(job_id)
        while not job.final:
            event = await sub.get(timeout=0.5)
            if await request.is_disconnected():
                service.cancel(job_id)
                raise asyncio.CancelledError
            if event is None or event.name in FINAL_EVENTS:  # the store, only when it may have changed
                job = service.store.get(job_id)
        return job


async def _openai_call(service: Service, sub: Submission, request: Request, prefix: str) -> Any:
    job, _ = await run_in_threadpool(service.admit, sub)
    base_url = str(request.base_url).rstrip("/")
    if sub.options["stream"]:
        stream = _openai_stream(service, job, prefix, base_url)
        return StreamingResponse(stream, media_type="text/event-stream", headers=_SSE_HEADERS)
    try:
        job = await _wait_final(service, job.id, request)
    except asyncio.CancelledError:
        return Response(status_code=499)
    if job.status != "succeeded":
        raise _job_failure(job)
    data = []
    for i, image in enumerate(job.result["images"]):
        item: dict[str, Any] = {"revised_prompt": None, "seed": image["seed"]}
        if job.options["response_format"] == "url":
            item["url"] = f"{base_url}/v1/jobs/{job.id}/images/{i}"
        else:
            item["b64_json"] = base64.b64encode(
                (service.store.folder(job.id) / image["file"]).read_bytes()
            ).decode()
        data.append(item)
    return {
        "created": int(job.created_at),
        "data": data,
        "size": f"{job.options['width']}x{job.options['height']}",
        "output_format": job.options["output_format"],
        "mode": job.options["mode"],
        "usage": usage(job, _grid(service)),
        "id": job.id,
    }


def _grid(service: Service) -> int:
    spec = service.worker.spec
    return spec.pixels_per_token if spec else 16


def _job_failure(job: Job) -> ApiError:
    error = job.error or {}
    code = error.get("code", "failed")
    status = {"invalid_request": 400, "canceled": 409}.get(code, 500)
    return ApiError(status, error.get("message", f"the job {job.status}"), code, error.get("param"))


async def _openai_stream(service: Service, job: Job, prefix: str, base_url: str) -> AsyncIterator[bytes]:
    """OpenAI's image stream: `partial_images` previews, then one `completed` event per image."""
    wanted = job.options["partial_images"]
    total = job.options["steps"]
    targets = [math.ceil((k + 1) * total / (wanted + 1)) for k in range(wanted)]
    size = f"{job.options['width']}x{job.options['height']}"
    common = {"created_at": int(job.created_at), "size": size, "quality": "auto", "background": "opaque"}
    number = 0

    def record(name: str, data: dict[str, Any]) -> bytes:
        nonlocal number
        number += 1
        payload = json.dumps({"type": name, **data}, separators=(",", ":"))
        return f"event: {name}\nid: {number}\ndata: {payload}\n\n".encode()

    sub, _, _ = service.jobs.events.subscribe(job.id, lambda: 0)
    finished = False
    try:
        sent = 0
        done = service.store.get(job.id).final
        while not done:
            # No keep-alive comments here: once a stream has carried an `id:`, the official openai client
            # turns a comment's blank line into an event with empty data and fails to parse it.
            event = await sub.get(timeout=service.settings.keepalive)
            if event is None:
                done = service.store.get(job.id).final
                continue
            if event.name == "preview" and sent < wanted and event.data["step"] >= targets[sent]:
                yield record(
                    f"{prefix}.partial_image",
                    {
                        **common,
                        "b64_json": event.data["image"],
                        "partial_image_index": sent,
                        "output_format": "jpeg",
                    },
                )
                sent += 1
            if event.name in FINAL_EVENTS:
                break
        job = service.store.get(job.id)
        if job.status != "succeeded":
            yield record("error", {"error": _job_failure(job).body()["error"]})
        else:
            fmt = job.options["output_format"]
            for i, image in enumerate(job.result["images"]):
                data = (service.store.folder(job.id) / image["file"]).read_bytes()
                yield record(
                    f"{prefix}.completed",
                    {
                        **common,
                        "b64_json": base64.b64encode(data).decode(),
                        "output_format": fmt,
                        "index": i,
                        "seed": image["seed"],
                        "usage": usage(job, _grid(service)),
                    },
                )
        finished = True
    finally:
        sub.close()
        if not finished:  # the client went away: its generation is canceled
            current = service.store.get(job.id)
            if current is not None and not current.final:
                service.cancel(job.id)


async def _job_stream(
    service: Service, job_id: str, after: int | None, base_url: str, request: Request
) -> AsyncIterator[bytes]:
    """SSE of one job: a `state` event, what was missed after Last-Event-ID, then live events until the
    final one; a keep-alive comment every `keepalive` seconds."""
    sub, missed, last = service.jobs.events.subscribe(job_id, lambda: service.jobs.last_event(job_id), after)
    try:
        job = service.store.get(job_id)
        if job is None:
            return
        yield Event(max(last, job.last_event), "state", {"job": job_json(job, base_url)}).sse()
        for event in missed:
            yield event.sse()
            if event.name in FINAL_EVENTS:
                return
        if job.final:
            name = {"succeeded": "completed"}.get(job.status, job.status)
            data = {"status": job.status, "result": job_json(job, base_url)["result"], "error": job.error}
            yield Event(max(last, job.last_event), name, {"job_id": job_id, **data}).sse()
            return
        while True:
            event = await sub.get(timeout=service.settings.keepalive)
            if event is None:
                if service.store.get(job_id) is None:
                    return
                yield b": keep-alive\n\n"
                continue
            if event.name in FINAL_EVENTS:
                current = service.store.get(job_id)
                result = job_json(current, base_url)["result"] if current else None
                event = Event(event.id, event.name, {**event.data, "result": result})
                yield event.sse()
                return
            yield event.sse()
    finally:
        sub.close()


async def _janitor(service: Service) -> None:
    """`Service.clean`, once a minute."""
    while True:
        try:
            await run_in_threadpool(service.clean)
        except Exception:
            log.exception("cleaning up old jobs failed")
        await asyncio.sleep(60)


def _prometheus(service: Service) -> str:
    counts = service.store.counts()
    lines = ["# HELP fluxforge_jobs Jobs in the store by status.", "# TYPE fluxforge_jobs gauge"]
    lines += [f'fluxforge_jobs{{status="{s}"}} {n}' for s, n in counts.items()]
    lines += [
        "# HELP fluxforge_queue_length Jobs waiting.",
        "# TYPE fluxforge_queue_length gauge",
        f"fluxforge_queue_length {counts['queued']}",
    ]
    m = getattr(service.worker, "metrics", None)
    if m is not None:
        lines += [
            "# HELP fluxforge_step_seconds Time per denoising step.",
            "# TYPE fluxforge_step_seconds summary",
            f"fluxforge_step_seconds_sum {m.step_seconds:.6f}",
            f"fluxforge_step_seconds_count {m.steps}",
            "# HELP fluxforge_job_seconds Time per finished job, from start to end.",
            "# TYPE fluxforge_job_seconds summary",
            f"fluxforge_job_seconds_sum {m.job_seconds:.6f}",
            f"fluxforge_job_seconds_count {m.jobs}",
        ]
    info = service.worker.model_info()
    # One series per cache; on Ray Serve, one per cache and replica (each replica has its own caches).
    series = [
        (f'cache="{cache}"' + (f',replica="{replica}"' if replica else ""), stats)
        for replica, caches in (info.get("replica_caches") or {None: info.get("caches", {})}).items()
        for cache, stats in caches.items()
    ]
    for name, help_text in (
        ("hits", "Cache hits."),
        ("misses", "Cache misses."),
        ("evictions", "Entries evicted to stay within the size."),
        ("bytes", "Bytes held."),
        ("max_bytes", "The size limit in bytes."),
    ):
        kind = "counter" if name in ("hits", "misses", "evictions") else "gauge"
        metric = f"fluxforge_cache_{name}" + ("_total" if kind == "counter" else "")
        lines += [f"# HELP {metric} {help_text}", f"# TYPE {metric} {kind}"]
        lines += [f"{metric}{{{labels}}} {stats[name]}" for labels, stats in series]
    lines += [
        "# HELP fluxforge_up 1 when the model is loaded.",
        "# TYPE fluxforge_up gauge",
        f"fluxforge_up {int(service.worker.state == 'ready')}",
    ]
    return "\n".join(lines) + "\n"


class _BodyLimit:
    """413 for a body over the limit: from Content-Length before reading, else while it streams in."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            await _send_error(send, self._error(int(length)))
            return
        seen = 0
        too_big = False
        answered = False

        async def counted() -> dict:
            nonlocal seen, too_big
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    too_big = True
                    raise _TooLarge()
            return message

        async def guarded(message: dict) -> None:
            # Whatever the app answers once the body was cut off (FastAPI turns a failed read into a 400),
            # the client gets the 413.
            nonlocal answered
            if too_big:
                if not answered:
                    answered = True
                    await _send_error(send, self._error(seen))
                return
            await send(message)

        try:
            await self.app(scope, counted, guarded)
        except Exception:
            if not too_big:
                raise
        if too_big and not answered:
            await _send_error(send, self._error(seen))

    def _error(self, size: int) -> ApiError:
        return ApiError(
            413,
            f"the body is {size} bytes or more; at most {self.limit} bytes (--max-body-bytes)",
            "too_large",
        )


class _TooLarge(Exception):
    pass


async def _send_error(send: Callable, error: ApiError) -> None:
    body = json.dumps(error.body()).encode()
    await send(
        {
            "type": "http.response.start",
            "status": error.status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})
