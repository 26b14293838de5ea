"""Request validation: an OpenAI chat-completions body -> a typed `ChatRequest`, or an `ApiError`."""

import json
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
# Fields that would change the answer in a way this server does not implement: accepted only at
# their neutral value. Other unknown fields (user, metadata, store, ...) change nothing and are ignored.
MAX_IMAGES = 16  # per request; each is decoded in memory before the prompt length is known
NEUTRAL = {"frequency_penalty": 0, "presence_penalty": 0, "logprobs": False, "logit_bias": {}}


class ApiError(Exception):
    """An error answered as OpenAI does: HTTP status + {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 type: str = "invalid_request_error", headers: Optional[Dict[str, str]] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers or {}

    def body(self) -> Dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: Optional[str] = None, code: Optional[str] = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


@dataclass
class ImageRef:
    url: str
    param: str  # where it was in the request, e.g. messages[0].content[1].image_url


@dataclass
class ChatRequest:
    """A validated request. `messages` are HF-style (content parts {"type": "text"|"image"}); the
    images, in `<image>` order, are in `images`."""

    messages: List[Dict[str, Any]]
    images: List[ImageRef]
    model: Optional[str] = None
    max_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    seed: Optional[int] = None
    stop: Tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False


def parse_json(raw: bytes) -> Dict[str, Any]:
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(f"the request body is not valid JSON ({e})", code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object", code="invalid_json")
    return body


def _number(body, name, lo, hi, integer=False):
    value = body.get(name)
    if value is None:
        return None
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or (not integer and not math.isfinite(value)):
        raise bad(f"`{name}` must be {'an integer' if integer else 'a number'}, got {value!r}", param=name)
    if not lo <= value <= hi:
        raise bad(f"`{name}` must be between {lo} and {hi}, got {value!r}", param=name)
    return value


def _text(value, param: str) -> str:
    if not isinstance(value, str):
        raise bad(f"`{param}` must be a string", param=param)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise bad(f"`{param}` is not valid Unicode (a lone surrogate escape)", param=param) from None
    return value


def _parts(content, where: str, role: str, images: List[ImageRef]) -> List[Dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": _text(content, f"{where}.content")}]
    if content is None and role == "assistant":
        return [{"type": "text", "text": ""}]
    if not isinstance(content, list):
        raise bad(f"`{where}.content` must be a string or a list of content parts", param=f"{where}.content")
    parts = []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            parts.append({"type": "text", "text": _text(part.get("text"), f"{at}.text")})
        elif kind == "image_url":
            if role != "user":
                raise bad(f"`{at}`: images are only accepted in user messages", param=at)
            ref = part.get("image_url")
            url = ref.get("url") if isinstance(ref, dict) else ref
            if not isinstance(url, str) or not url:
                raise bad(f"`{at}.image_url.url` must be a non-empty string", param=f"{at}.image_url")
            images.append(ImageRef(url, f"{at}.image_url"))
            parts.append({"type": "image"})
        else:
            raise bad(f"`{at}`: unsupported content part type {kind!r} (use 'text' or 'image_url')", param=at)
    return parts


def parse_chat_request(body: Dict[str, Any]) -> ChatRequest:
    """Validate a chat-completions body; every refusal names the field."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("`messages` must be a non-empty list", param="messages")
    out, images = [], []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad(f"`{where}` must be an object", param=where)
        role = message.get("role")
        if role not in ROLES:
            raise bad(f"`{where}.role` {role!r} is not supported (system, user or assistant)", param=f"{where}.role")
        if message.get("tool_calls"):
            raise bad(f"`{where}.tool_calls`: tools are not supported by this server", param=f"{where}.tool_calls")
        out.append({"role": ROLES[role], "content": _parts(message.get("content"), where, ROLES[role], images)})
    if len(images) > MAX_IMAGES:
        raise bad(f"too many images ({len(images)}); at most {MAX_IMAGES} per request", param="messages",
                  code="too_many_images")
    if out[-1]["role"] == "assistant":
        raise bad("the last message must be a user (or system) message; continuing an assistant turn is not supported",
                  param=f"messages[{len(out) - 1}].role")

    n = body.get("n", 1)
    if n != 1:
        raise bad(f"`n` must be 1 (one completion per request), got {n!r}", param="n", code="unsupported_parameter")
    if body.get("tools") or body.get("functions"):
        name = "tools" if body.get("tools") else "functions"
        raise bad(f"`{name}`: tool calling is not supported by this model server", param=name,
                  code="unsupported_parameter")
    for name, neutral in NEUTRAL.items():
        if name in body and body[name] not in (None, neutral):
            raise bad(f"`{name}` is not supported (only {neutral!r})", param=name, code="unsupported_parameter")
    fmt = body.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
        raise bad("`response_format`: only {'type': 'text'} is supported", param="response_format",
                  code="unsupported_parameter")

    max_tokens = _number(body, "max_completion_tokens", 1, 1 << 30, integer=True)
    if max_tokens is None:
        max_tokens = _number(body, "max_tokens", 1, 1 << 30, integer=True)
    stop = body.get("stop")
    if stop is None:
        stop = ()
    elif isinstance(stop, str):
        stop = (_text(stop, "stop"),)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= 16:
        stop = tuple(_text(s, "stop") for s in stop)
    else:
        raise bad("`stop` must be a string or a list of at most 16 strings", param="stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad("`stream` must be true or false", param="stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise bad("`stream_options` must be an object", param="stream_options")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad("`model` must be a string", param="model")
    return ChatRequest(
        messages=out,
        images=images,
        model=model,
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 0, 2),
        top_p=_number(body, "top_p", 0, 1),
        seed=_number(body, "seed", -(1 << 63), (1 << 63) - 1, integer=True),
        stop=stop,
        stream=stream,
        include_usage=bool(options.get("include_usage", False)),
    )
