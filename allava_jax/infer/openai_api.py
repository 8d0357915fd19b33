"""OpenAI chat-completions requests -> our prompts and sampling params, and responses back.

Kept apart from the HTTP layer so the request rules (roles, image parts, limits) are testable and
reusable. Every rejection is an ``ApiError`` carrying the HTTP status and an OpenAI-style body.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from typing import Any

import numpy as np

from allava_jax.infer import media
from allava_jax.infer.engine import Engine, Prompt
from allava_jax.infer.prompts import IMAGE_PLACEHOLDER, PromptError
from allava_jax.infer.sampling import SamplingParams


class ApiError(Exception):
    """An invalid request: ``status`` (4xx), a message, and the offending parameter."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


@dataclasses.dataclass(frozen=True)
class ServerLimits:
    max_images: int = 1
    max_new_tokens: int = 512  # default and cap for max_tokens
    allow_remote_images: bool = False
    default_temperature: float = 0.0


def _text_and_images(content: Any, index: int, limits: ServerLimits, image_size: int) -> tuple[str, list[np.ndarray]]:
    """A message's content (string or list of parts) -> text with ``<image>`` markers + pixels."""
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise ApiError(400, f"messages[{index}].content must be a string or a list of parts", "messages")
    texts, images = [], []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            texts.append(str(part.get("text", "")))
        elif kind == "image_url":
            spec = part.get("image_url")
            url = spec.get("url") if isinstance(spec, dict) else spec
            if not isinstance(url, str):
                raise ApiError(400, f"messages[{index}].content[{j}].image_url.url must be a string", "messages")
            if len(images) + 1 > limits.max_images:
                raise ApiError(400, f"too many images: this server accepts at most {limits.max_images} per request", "messages")
            try:
                images.append(media.load_pixels(media.fetch_url(url, allow_remote=limits.allow_remote_images), image_size))
            except media.MediaError as e:
                raise ApiError(400, f"messages[{index}].content[{j}]: {e}", "messages", "invalid_image") from None
            texts.append(IMAGE_PLACEHOLDER + "\n")
        else:
            raise ApiError(400, f"messages[{index}].content[{j}] has unsupported type {kind!r}", "messages")
    return "".join(texts), images


def parse_messages(messages: Any, limits: ServerLimits, image_size: int) -> tuple[list[tuple[str, str | None]], list[np.ndarray]]:
    """OpenAI messages -> ALLaVA rounds (last answer None) and the images in order.

    ALLaVA has no system prompt: a system message's text is prepended to the first user turn.
    """
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list", "messages")
    system, rounds, images = [], [], []
    pending_user: str | None = None
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or "role" not in msg:
            raise ApiError(400, f"messages[{i}] must be an object with a role", "messages")
        role = msg["role"]
        text, imgs = _text_and_images(msg.get("content", ""), i, limits, image_size)
        if len(images) + len(imgs) > limits.max_images:
            raise ApiError(400, f"too many images: this server accepts at most {limits.max_images} per request", "messages")
        if role in ("system", "developer"):
            if rounds or pending_user is not None or imgs:
                raise ApiError(400, "a system message may only come first and hold text", "messages")
            system.append(text)
        elif role == "user":
            if pending_user is not None:
                raise ApiError(400, f"messages[{i}]: two user messages in a row", "messages")
            pending_user = text
            images += imgs
        elif role == "assistant":
            if pending_user is None or imgs:
                raise ApiError(400, f"messages[{i}]: an assistant message must follow a user message", "messages")
            rounds.append((pending_user, text))
            pending_user = None
        else:
            raise ApiError(400, f"messages[{i}] has unsupported role {role!r}", "messages")
    if pending_user is None:
        raise ApiError(400, "the last message must come from the user", "messages")
    rounds.append((pending_user, None))
    if system:
        first_user = rounds[0][0]
        # Keep an image marker first (the template moves a single image to the front anyway).
        rounds[0] = ("\n".join(system) + "\n" + first_user, rounds[0][1])
    return rounds, images


def _number(body: dict, name: str, default: Any, kind: type, low: float | None = None, high: float | None = None) -> Any:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and int(value) != value):
        raise ApiError(400, f"{name} must be a{'n integer' if kind is int else ' number'}", name)
    value = kind(value)
    if (low is not None and value < low) or (high is not None and value > high):
        raise ApiError(400, f"{name}={value} is out of range [{low}, {high}]", name)
    return value


def parse_sampling(body: dict, limits: ServerLimits) -> SamplingParams:
    if _number(body, "n", 1, int, 1, 1) != 1:
        raise ApiError(400, "n must be 1", "n")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    stop = body.get("stop") or ()
    if isinstance(stop, str):
        stop = (stop,)
    if not isinstance(stop, (list, tuple)) or len(stop) > 4 or not all(isinstance(s, str) for s in stop):
        raise ApiError(400, "stop must be a string or a list of up to 4 strings", "stop")
    return SamplingParams(
        max_new_tokens=_number({"max_tokens": max_tokens}, "max_tokens", limits.max_new_tokens, int, 1, limits.max_new_tokens),
        temperature=_number(body, "temperature", limits.default_temperature, float, 0, 2),
        top_p=_number(body, "top_p", 1.0, float, 1e-6, 1),
        top_k=_number(body, "top_k", 0, int, 0, None),
        seed=_number(body, "seed", 0, int, 0, 2**32 - 1),
        stop=tuple(stop),
    )


def build_prompt(engine: Engine, rounds: list, images: list[np.ndarray]) -> Prompt:
    try:
        return engine.prompt(rounds, np.stack(images) if images else None)
    except PromptError as e:
        raise ApiError(400, f"cannot build the prompt: {e}", "messages") from None


def completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex[:24]


def chat_completion(cid: str, model: str, text: str, finish: str, prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "id": cid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish, "logprobs": None}],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def chat_chunk(cid: str, model: str, delta: dict, finish: str | None = None, usage: dict | None = None) -> dict:
    chunk = {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
    }
    if usage is not None:
        chunk["usage"] = usage
    return chunk
