"""The HTTP bodies, how each becomes a `GenerationRequest`, and how every error becomes an HTTP answer.

One place maps errors to status codes (`api_error`): the Python API's TypeError / ValueError -> 400,
`InputTooLarge` -> 413, a full queue -> 429; the app adds 401, 404, 409, 422 and 503 with the same body,
OpenAI's `{"error": {"message", "type", "param", "code"}}`. The OpenAI endpoints name parameters as OpenAI
does (`n`, `size`, `image[1]`); `Names` renames the Python API's names in a message and its `param`.
"""

from __future__ import annotations

import base64
import binascii
import difflib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

from fluxforge.errors import InputTooLarge
from fluxforge.request import GenerationRequest, param_of, reject_unknown
from fluxforge.server.jobs import QueueFull

OutputFormat = Literal["png", "jpeg", "webp"]
Number = StrictFloat | StrictInt
MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


class ApiError(Exception):
    """An HTTP error with OpenAI's error body."""

    TYPES = {401: "authentication_error", 429: "rate_limit_error", 500: "server_error", 503: "server_error"}

    def __init__(
        self,
        status: int,
        message: str,
        code: str,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        kind = self.TYPES.get(self.status, "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Names:
    """Python API names -> the names an endpoint uses, for messages and `param`."""

    renames: Mapping[str, str] = field(default_factory=dict)

    def param(self, name: str | None) -> str | None:
        if name is None:
            return None
        if name == "width/height":
            return self.renames.get("width/height", "width")
        return self.renames.get(name, name)

    def message(self, text: str) -> str:
        if not self.renames:
            return text
        pattern = "|".join(re.escape(k) for k in sorted(self.renames, key=len, reverse=True))
        return re.sub(rf"(?<![\w\[])({pattern})(?![\w\[])", lambda m: self.renames[m.group(1)], text)


PYTHON_NAMES = Names()


def api_error(exc: BaseException, names: Names = PYTHON_NAMES, retry_after: int = 1) -> ApiError | None:
    """The HTTP error for a request error, or None for anything else (a bug: the caller answers 500)."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, QueueFull):
        return ApiError(429, str(exc), "queue_full", headers={"Retry-After": str(retry_after)})
    if isinstance(exc, (ValueError, TypeError)):
        status = 413 if isinstance(exc, InputTooLarge) else 400
        code = (
            "too_large"
            if status == 413
            else ("invalid_type" if isinstance(exc, TypeError) else "invalid_value")
        )
        return ApiError(status, names.message(str(exc)), code, names.param(param_of(exc)))
    return None


# -------------------------------------------------------------------------------------------------------
# Bodies


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")

    def extras(self) -> dict[str, Any]:
        return dict(self.__pydantic_extra__ or {})


class LoraUse(BaseModel):
    """One LoRA a request opts in to: a name the server was started with (`--lora NAME=FILE`)."""

    model_config = ConfigDict(extra="forbid")
    name: StrictStr
    scale: Number = 1.0


def lora_scales(loras: list[LoraUse] | None) -> dict[str, float] | None:
    """A body's `loras` as the request's name -> scale; each name once."""
    if loras is None:
        return None
    out: dict[str, float] = {}
    for use in loras:
        if use.name in out:
            raise ValueError(f"loras: {use.name!r} is given twice; give each LoRA once, with its scale")
        out[use.name] = float(use.scale)
    return out


class ImageGenerationBody(_Body):
    """POST /v1/images/generations, OpenAI's fields and fluxforge's own at the top level."""

    prompt: StrictStr
    model: StrictStr | None = None
    n: StrictInt | None = None
    size: StrictStr | None = Field(None, description='"WIDTHxHEIGHT" or "auto" (the model\'s default)')
    response_format: Literal["b64_json", "url"] | None = None
    output_format: OutputFormat | None = None
    output_compression: Annotated[StrictInt, Field(ge=0, le=100)] | None = None
    stream: StrictBool | None = None
    partial_images: Annotated[StrictInt, Field(ge=0, le=3)] | None = None
    user: StrictStr | None = None
    quality: StrictStr | None = Field(None, description="accepted for compatibility; ignored")
    background: StrictStr | None = Field(None, description="accepted for compatibility; ignored")
    moderation: StrictStr | None = Field(None, description="accepted for compatibility; ignored")
    style: StrictStr | None = Field(None, description="accepted for compatibility; ignored")
    seed: StrictInt | None = None
    steps: StrictInt | None = None
    guidance: Number | None = None
    negative_prompt: StrictStr | None = None
    width: StrictInt | None = None
    height: StrictInt | None = None
    loras: list[LoraUse] | None = Field(None, description="LoRAs to apply (GET /v1/capabilities lists them)")


class JobBody(_Body):
    """POST /v1/jobs: the GenerationRequest fields by their Python names; images as base64 or data URLs."""

    prompt: StrictStr | list[StrictStr] | None = None
    references: list[StrictStr] | None = None
    init_image: StrictStr | None = None
    strength: Number | None = None
    mask: StrictStr | None = None
    mask_alpha_is_repaint: StrictBool | None = None
    negative_prompt: StrictStr | None = None
    width: StrictInt | None = None
    height: StrictInt | None = None
    steps: StrictInt | None = None
    guidance: Number | None = None
    seed: StrictInt | None = None
    num_images: StrictInt | None = None
    max_sequence_length: StrictInt | None = None
    output_format: OutputFormat | None = None
    output_compression: Annotated[StrictInt, Field(ge=0, le=100)] | None = None
    webhook_url: StrictStr | None = None
    loras: list[LoraUse] | None = Field(None, description="LoRAs to apply (GET /v1/capabilities lists them)")


# The GenerationRequest fields a body may set (the rest are for Python callers: tensors, generators).
SCALARS = (
    "prompt",
    "strength",
    "mask_alpha_is_repaint",
    "negative_prompt",
    "width",
    "height",
    "steps",
    "guidance",
    "seed",
    "num_images",
    "max_sequence_length",
)
_IGNORED = ("quality", "background", "moderation", "style", "user")
_PYTHON_ONLY = {
    "prompt_embeds",
    "negative_prompt_embeds",
    "noise",
    "start_latents",
    "generator",
    "sigmas",
    "decode",
}


@dataclass
class Submission:
    """A parsed body: what the job store keeps and what the worker runs."""

    kind: str  # "job", "generation" or "edit"
    params: dict[str, Any]  # GenerationRequest scalars by their Python names
    inputs: dict[str, Any]  # "references": [bytes, ...], "init_image": bytes, "mask": bytes
    options: dict[str, Any]  # output_format, output_compression, response_format, stream, partial_images
    names: Names = PYTHON_NAMES
    webhook_url: str | None = None

    def request(self) -> GenerationRequest:
        return to_request(self.params, self.inputs)

    @property
    def mode(self) -> str:
        if "init_image" not in self.inputs:
            return "references" if self.inputs.get("references") else "text-to-image"
        return "inpaint" if "mask" in self.inputs else "img2img"


def to_request(params: Mapping[str, Any], inputs: Mapping[str, Any]) -> GenerationRequest:
    """Stored fields (None: not given) and encoded images by slot -> the request they stand for."""
    return GenerationRequest(
        references=tuple(inputs.get("references") or ()),
        init_image=inputs.get("init_image"),
        mask=inputs.get("mask"),
        **{k: v for k, v in params.items() if v is not None},
    )


def job_submission(body: JobBody) -> Submission:
    extras = body.extras()
    known_elsewhere = {k for k in extras if k in _PYTHON_ONLY}
    if known_elsewhere:
        name = sorted(known_elsewhere)[0]
        raise TypeError(f"{name} is a Python-API-only field (tensors and generators do not travel over HTTP)")
    reject_unknown(extras, GenerationRequest, "POST /v1/jobs")
    params = {k: getattr(body, k) for k in SCALARS}
    params["loras"] = lora_scales(body.loras)
    inputs: dict[str, Any] = {}
    if body.references:
        inputs["references"] = [decode_image(v, f"references[{i}]") for i, v in enumerate(body.references)]
    if body.init_image is not None:
        inputs["init_image"] = decode_image(body.init_image, "init_image")
    if body.mask is not None:
        inputs["mask"] = decode_image(body.mask, "mask")
    options = {"output_format": body.output_format or "png", "output_compression": body.output_compression}
    return Submission("job", params, inputs, options, webhook_url=_webhook(body.webhook_url))


def generation_submission(body: ImageGenerationBody) -> Submission:
    _reject_openai_extras(body.extras(), "/v1/images/generations")
    params = {
        "prompt": body.prompt,
        "num_images": 1 if body.n is None else body.n,
        "seed": body.seed,
        "steps": body.steps,
        "guidance": body.guidance,
        "negative_prompt": body.negative_prompt,
        "loras": lora_scales(body.loras),
    }
    names = _size_into(params, body.size, body.width, body.height)
    return Submission("generation", params, {}, _openai_options(body.model_dump()), names)


def edit_submission(
    form: Mapping[str, Any], images: list[bytes], image_field: str, mask: bytes | None
) -> Submission:
    """The multipart fields of /v1/images/edits (already read) as a submission; `image_field` is how the
    images came: "image" (one) or "image[]" (several)."""
    _reject_openai_extras({k: v for k, v in form.items() if k not in _EDIT_FIELDS}, "/v1/images/edits")
    if not images:
        raise ApiError(
            400, "image: at least one image is required (send image or image[])", "invalid_value", "image"
        )
    fields = {name: _form_value(form, name, kind) for name, kind in _EDIT_FIELDS.items() if name in form}
    params = {
        "prompt": fields.get("prompt"),
        "num_images": fields.get("n", 1),
        "seed": fields.get("seed"),
        "steps": fields.get("steps"),
        "guidance": fields.get("guidance"),
        "negative_prompt": fields.get("negative_prompt"),
        "strength": fields.get("strength"),
        "loras": _form_loras(fields.get("loras")),
    }
    if params["prompt"] is None:
        raise ApiError(400, "prompt is required", "invalid_value", "prompt")
    names = _size_into(params, fields.get("size"), fields.get("width"), fields.get("height"))
    one = image_field == "image" and len(images) == 1

    def image_name(i: int) -> str:
        return "image" if one else f"image[{i}]"

    renames = dict(names.renames)
    inputs: dict[str, Any] = {}
    if mask is not None or params["strength"] is not None:
        inputs["init_image"] = images[0]
        renames["init_image"] = image_name(0)
        rest = images[1:]
        offset = 1
        if mask is not None:
            inputs["mask"] = mask
            params["mask_alpha_is_repaint"] = True
    else:
        rest, offset = images, 0
    if rest:
        inputs["references"] = rest
    for j in range(len(rest)):
        renames[f"references[{j}]"] = image_name(j + offset)
    renames["references"] = "image[]"
    return Submission("edit", params, inputs, _openai_options(fields), Names(renames))


_EDIT_FIELDS: dict[str, Any] = {
    "prompt": str,
    "model": str,
    "n": int,
    "size": str,
    "response_format": ("b64_json", "url"),
    "output_format": ("png", "jpeg", "webp"),
    "output_compression": int,
    "stream": bool,
    "partial_images": int,
    "user": str,
    "quality": str,
    "background": str,
    "input_fidelity": str,
    "moderation": str,
    "seed": int,
    "steps": int,
    "guidance": float,
    "negative_prompt": str,
    "width": int,
    "height": int,
    "strength": float,
    "loras": str,  # JSON: [{"name": ..., "scale": ...}]
    "image": None,
    "image[]": None,
    "mask": None,
}


def _form_loras(text: str | None) -> dict[str, float] | None:
    """The edits form's `loras` field: the JSON list the JSON bodies take."""
    if text is None:
        return None
    try:
        uses = [LoraUse.model_validate(item) for item in json.loads(text)]
    except (ValueError, TypeError):
        raise ApiError(
            422, 'loras must be a JSON list of {"name": ..., "scale": ...}', "invalid_body", "loras"
        ) from None
    return lora_scales(uses)


def _form_value(form: Mapping[str, Any], name: str, kind: Any) -> Any:
    value = form[name]
    if kind is None:
        return value
    if not isinstance(value, str):
        raise ApiError(422, f"{name} must be a form field, not a file", "invalid_body", name)
    if kind is str:
        return value
    if isinstance(kind, tuple):
        if value not in kind:
            raise ApiError(
                422, f"{name} must be one of {', '.join(kind)}, got {value!r}", "invalid_body", name
            )
        return value
    try:
        if kind is bool:
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return value.lower() in ("true", "1")
        number = kind(value)
    except ValueError:
        raise ApiError(
            422,
            f"{name} must be {'an integer' if kind is int else 'a number'}, got {value!r}",
            "invalid_body",
            name,
        ) from None
    if name == "output_compression" and not 0 <= number <= 100:
        raise ApiError(422, f"output_compression must be in [0, 100], got {number}", "invalid_body", name)
    if name == "partial_images" and not 0 <= number <= 3:
        raise ApiError(422, f"partial_images must be in [0, 3], got {number}", "invalid_body", name)
    return number


def _openai_options(fields: Mapping[str, Any]) -> dict[str, Any]:
    """How to answer an OpenAI call, from its (parsed) fields."""
    return {
        "response_format": fields.get("response_format") or "b64_json",
        "output_format": fields.get("output_format") or "png",
        "output_compression": fields.get("output_compression"),
        "stream": bool(fields.get("stream")),
        "partial_images": fields.get("partial_images") or 0,
    }


def _size_into(params: dict[str, Any], size: str | None, width: int | None, height: int | None) -> Names:
    """OpenAI's `size` ("WxH" or "auto") into width / height, which, when given, override it."""
    renames = {"num_images": "n"}
    if size is not None and size != "auto":
        match = re.fullmatch(r"\s*(\d{1,6})\s*[xX×]\s*(\d{1,6})\s*", size)
        if match is None:
            raise ApiError(
                400,
                f"size must be 'WIDTHxHEIGHT' (for example '1024x1024') or 'auto', got {size!r}",
                "invalid_value",
                "size",
            )
        params["width"], params["height"] = int(match[1]), int(match[2])
        renames["width/height"] = "size"
    if width is not None:
        params["width"] = width
    if height is not None:
        params["height"] = height
    if width is not None or height is not None:
        renames.pop("width/height", None)
    return Names(renames)


def _reject_openai_extras(extras: Mapping[str, Any], endpoint: str) -> None:
    extras = {k: v for k, v in extras.items() if k not in _IGNORED}
    for name in extras:
        if endpoint.endswith("generations") and name in (
            "image",
            "image[]",
            "mask",
            "strength",
            "references",
        ):
            raise ApiError(
                400,
                f"{name} is not a field of {endpoint}: an input image goes to /v1/images/edits, where "
                "the images alone are references (attention tokens, never noised), with strength they are "
                "img2img, and with a mask inpainting",
                "unknown_parameter",
                name,
            )
        known = [*_EDIT_FIELDS] if endpoint.endswith("edits") else list(ImageGenerationBody.model_fields)
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ApiError(400, f"unknown parameter {name!r} for {endpoint}{hint}", "unknown_parameter", name)


_DATA_URL = re.compile(r"data:[\w/+.-]*(;[\w=-]+)*;base64,", re.ASCII)


def decode_image(value: str, param: str) -> bytes:
    """A base64 string or a data URL -> the encoded image bytes (decoded as an image later, after its size is
    read from its header)."""
    text = value.strip()
    match = _DATA_URL.match(text)
    if match:
        text = text[match.end() :]
    elif text.startswith(("http://", "https://", "/", "file:")):
        raise ValueError(
            f"{param}: URLs and paths are not fetched; send the image itself as base64 or a data URL"
        )
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{param}: not valid base64; send the image as base64 or a data URL") from None
    if not data:
        raise ValueError(f"{param}: the image is empty")
    return data


def _webhook(url: str | None) -> str | None:
    if url is None:
        return None
    if not re.match(r"https?://[^\s/]+", url):
        raise ValueError(f"webhook_url must be an http:// or https:// URL, got {url!r:.80}")
    return url
