"""OpenAI chat-completions requests -> our prompts and sampling params, and responses back.

Kept apart from the HTTP layer so the request rules (roles, image parts, limits) are testable and
reusable. Every rejection is an ``ApiError`` carrying the HTTP status and an OpenAI-style body.

Fields, as OpenAI defines them plus vLLM's extra-body ones (``top_k``, ``min_tokens``,
``ignore_eos``, ``return_tokens_as_token_ids``), with vLLM's rules where the two differ:

- ``max_completion_tokens`` (wins when both are given, as in vLLM) or ``max_tokens``: 1 to the
  server's ``--max-tokens``, which is also the default; clamped to what the context leaves.
- ``stop``: a string or a list of up to 4; the text ends before it (a stop string only counts
  once ``min_tokens`` tokens were generated). ``min_tokens``: stop tokens are banned until then.
  ``ignore_eos``: stop tokens do not end the answer (they are generated, counted and invisible).
- ``n``: 1 to ``max_n`` independent choices; choice ``i`` samples with seed ``seed + i`` (vLLM's
  rule), so a request with a ``seed`` is reproducible. Without one, the server draws a seed.
- ``logprobs`` / ``top_logprobs`` (0-20): per generated token, OpenAI's ``{token, logprob, bytes,
  top_logprobs}``, from the raw model distribution (before temperature, top-k/top-p and token bans;
  vLLM's default). Every generated token has one, a final stop token too, as vLLM does.
- Images: any number of ``image_url`` parts up to ``max_images``, in any order with text parts;
  each stands where it is in the turn (one image moves to the front, the ALLaVA convention).
- Known fields that we do not implement are refused unless they hold their no-op value; unknown
  fields are ignored, as vLLM does.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
import time
import uuid
from typing import Any


from allava_jax.infer import media
from allava_jax.infer.engine import Engine, Prompt
from allava_jax.infer.prompts import IMAGE_PLACEHOLDER, PromptError
from allava_jax.infer.sampling import MAX_TOP_LOGPROBS, SamplingParams
from allava_jax.infer.scheduler import TokenLogprob
from allava_jax.models.config import VisionConfig


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
    max_images: int = 8  # MMMU items have up to 7
    max_new_tokens: int = 512  # default and cap for max_tokens
    max_n: int = 8
    allow_remote_images: bool = False
    default_temperature: float = 0.0


def _text_and_images(content: Any, index: int, limits: ServerLimits, vision: VisionConfig | int,
                     seen: int) -> tuple[str, list[media.Image]]:
    """A message's content (string or list of parts) -> text with ``<image>`` markers + pixels.

    ``seen``: images in the earlier messages (the limit is per request)."""
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise ApiError(400, f"messages[{index}].content must be a string or a list of parts", "messages")
    texts, images = [], []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        where = f"messages[{index}].content[{j}]"
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise ApiError(400, f"{where}.text must be a string", "messages")
            texts.append(part["text"])
        elif kind == "image_url":
            spec = part.get("image_url")
            url = spec.get("url") if isinstance(spec, dict) else spec
            if not isinstance(url, str):
                raise ApiError(400, f"{where}.image_url.url must be a string", "messages")
            if seen + len(images) + 1 > limits.max_images:
                raise ApiError(400, f"too many images: this server accepts at most {limits.max_images} per request (--max-images)", "messages")
            try:
                images.append(media.load_pixels(media.fetch_url(url, allow_remote=limits.allow_remote_images), vision))
            except media.MediaError as e:
                raise ApiError(400, f"{where}: {e}", "messages", "invalid_image") from None
            texts.append(IMAGE_PLACEHOLDER + "\n")
        else:
            raise ApiError(400, f"{where} has unsupported type {kind!r} (this server takes text and image_url parts)", "messages")
    return "".join(texts), images


def parse_messages(messages: Any, limits: ServerLimits,
                   vision: VisionConfig | int) -> tuple[list[tuple[str, str | None]], list[media.Image]]:
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
        text, imgs = _text_and_images(msg.get("content", ""), i, limits, vision, len(images))
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


# ----- request fields ------------------------------------------------------------------------------

INT64 = (-(2**63), 2**63 - 1)

# Known fields we do not implement, each with a test for its no-op value: a request that sets one
# to anything else is refused rather than silently answered without it.
_UNSUPPORTED = {
    "frequency_penalty": lambda v: v in (None, 0),
    "presence_penalty": lambda v: v in (None, 0),
    "repetition_penalty": lambda v: v in (None, 1),
    "min_p": lambda v: v in (None, 0),
    "logit_bias": lambda v: not v,
    "tools": lambda v: not v,
    "functions": lambda v: not v,
    "tool_choice": lambda v: v in (None, "none", "auto"),
    "function_call": lambda v: v in (None, "none", "auto"),
    "response_format": lambda v: v is None or (isinstance(v, dict) and v.get("type") == "text"),
    "modalities": lambda v: v in (None, ["text"]),
    "audio": lambda v: v is None,
    "prediction": lambda v: v is None,
    "best_of": lambda v: v in (None, 1),
    "use_beam_search": lambda v: not v,
    "stop_token_ids": lambda v: not v,
    "prompt_logprobs": lambda v: v is None,
    "echo": lambda v: not v,
    "add_generation_prompt": lambda v: v in (None, True),
    "continue_final_message": lambda v: not v,
    "guided_json": lambda v: v is None,
    "guided_regex": lambda v: v is None,
    "guided_choice": lambda v: v is None,
    "guided_grammar": lambda v: v is None,
    "structured_outputs": lambda v: v is None,
}


@dataclasses.dataclass(frozen=True)
class ChatRequest:
    """A request's validated options (its messages are parsed apart, off the event loop)."""

    sampling: SamplingParams  # choice 0's; choice i samples with seed + i
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    tokens_as_ids: bool = False  # vLLM's return_tokens_as_token_ids: logprob tokens as "token_id:N"

    def choices(self, sampling: SamplingParams) -> list[SamplingParams]:
        """``sampling`` (as the scheduler clamped it) for each of the ``n`` choices."""
        return [dataclasses.replace(sampling, seed=(sampling.seed + i) % 2**32) for i in range(self.n)]


def _integer(obj: dict, name: str, default: Any, low: int | None = None, high: int | None = None) -> Any:
    """An integer field (JSON numbers with an integral value count), range-checked; None: default."""
    value = obj.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (isinstance(value, float) and not value.is_integer()):
        raise ApiError(400, f"{name} must be an integer, got {value!r}", name)
    value = int(value)
    _check_range(name, value, low, high)
    return value


def _real(obj: dict, name: str, default: float, low: float, high: float, *, low_open: bool = False) -> float:
    """A number field in [low, high] (or (low, high] with ``low_open``); None: default."""
    value = obj.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ApiError(400, f"{name} must be a number, got {value!r}", name)  # Python's JSON reads NaN too
    if low_open and value <= low:
        raise ApiError(400, f"{name}={value} is out of range: it must be in ({low}, {high}]", name)
    _check_range(name, value, low, high)
    return float(value)


def _check_range(name: str, value: float, low: float | None, high: float | None) -> None:
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"[{'-inf' if low is None else low}, {'inf' if high is None else high}]"
        raise ApiError(400, f"{name}={value} is out of range: it must be in {bounds}", name)


def _flag(obj: dict, name: str, param: str | None = None) -> bool:
    value = obj.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ApiError(400, f"{name} must be a boolean, got {value!r}", param or name)
    return value


def _refuse_unsupported(body: dict) -> None:
    for name, is_no_op in _UNSUPPORTED.items():
        if not is_no_op(body.get(name)):
            raise ApiError(400, f"{name}={body[name]!r} is not supported by this server", name, "unsupported_parameter")


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) for s in stop):
        raise ApiError(400, "stop must be a string or a list of up to 4 strings", "stop")
    return tuple(stop)


def _logprobs(body: dict) -> int | None:
    """OpenAI's ``logprobs`` + ``top_logprobs`` -> how many alternatives to report (None: no logprobs)."""
    wanted = _flag(body, "logprobs")
    top = _integer(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS)
    if top and not wanted:
        raise ApiError(400, "top_logprobs needs logprobs=true", "top_logprobs")
    return top if wanted else None


def _include_usage(body: dict, stream: bool) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict):
        raise ApiError(400, "stream_options must be an object", "stream_options")
    if not stream:
        raise ApiError(400, "stream_options is only allowed with stream=true", "stream_options")
    if _flag(options, "continuous_usage_stats", "stream_options"):
        raise ApiError(400, "stream_options.continuous_usage_stats is not supported by this server", "stream_options")
    return _flag(options, "include_usage", "stream_options")


def parse_request(body: dict, limits: ServerLimits) -> ChatRequest:
    """Every option of a chat-completions body but its messages, validated (``ApiError`` if not)."""
    _refuse_unsupported(body)
    token_field = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _integer(body, token_field, limits.max_new_tokens, 1, limits.max_new_tokens)
    top_k = _integer(body, "top_k", 0, -1)  # vLLM: 0 or -1 turn it off
    seed = _integer(body, "seed", None, *INT64)
    stream = _flag(body, "stream")
    sampling = SamplingParams(
        max_new_tokens=max_tokens,
        temperature=_real(body, "temperature", limits.default_temperature, 0, 2),
        top_p=_real(body, "top_p", 1.0, 0, 1, low_open=True),
        top_k=max(top_k, 0),
        seed=secrets.randbits(32) if seed is None else seed % 2**32,
        stop=_stop(body),
        min_tokens=_integer(body, "min_tokens", 0, 0, max_tokens),
        ignore_eos=_flag(body, "ignore_eos"),
        logprobs=_logprobs(body),
    )
    return ChatRequest(
        sampling,
        n=_integer(body, "n", 1, 1, limits.max_n),
        stream=stream,
        include_usage=_include_usage(body, stream),
        tokens_as_ids=_flag(body, "return_tokens_as_token_ids"),
    )


def build_prompt(engine: Engine, rounds: list, images: list[media.Image]) -> Prompt:
    try:
        return engine.prompt(rounds, media.stack(images, engine.config.vision))
    except PromptError as e:
        raise ApiError(400, f"cannot build the prompt: {e}", "messages") from None


# ----- responses -----------------------------------------------------------------------------------


def completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    """OpenAI's usage object; a request's prompt counts once, whatever its ``n``."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}


@dataclasses.dataclass(frozen=True)
class Reply:
    """Builds the response objects of one completion (one id and creation time for all its chunks)."""

    id: str
    model: str
    tokenizer: Any
    tokens_as_ids: bool = False
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))

    def _token(self, token_id: int, logprob: float) -> dict:
        text = f"token_id:{token_id}" if self.tokens_as_ids else self.tokenizer.decode([token_id])
        # JSON has no -inf: vLLM reports such a logprob as -9999.0.
        return {"token": text, "logprob": max(logprob, -9999.0), "bytes": list(text.encode("utf-8"))}

    def logprobs(self, entries: list[TokenLogprob] | None) -> dict | None:
        """OpenAI's ``choices[i].logprobs``: ``{"content": [{token, logprob, bytes, top_logprobs}]}``."""
        if entries is None:
            return None
        return {"content": [{**self._token(e.token_id, e.logprob), "top_logprobs": [self._token(t, v) for t, v in e.top]}
                            for e in entries]}

    def completion(self, texts: list[str], finishes: list[str], logprobs: list[list[TokenLogprob] | None],
                   prompt_tokens: int, completion_tokens: int) -> dict:
        choices = [{"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                    "logprobs": self.logprobs(lps)} for i, (text, finish, lps) in enumerate(zip(texts, finishes, logprobs))]
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": choices, "usage": usage(prompt_tokens, completion_tokens)}

    def chunk(self, choices: list[dict], usage: dict | None = None, with_usage: bool = False) -> dict:
        """A ``chat.completion.chunk``; ``with_usage`` adds ``usage`` (null but on the last chunk, as OpenAI)."""
        chunk = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model, "choices": choices}
        if with_usage:
            chunk["usage"] = usage
        return chunk

    def chunk_choice(self, index: int, delta: dict, finish: str | None, entries: list[TokenLogprob] | None) -> dict:
        return {"index": index, "delta": delta, "finish_reason": finish, "logprobs": self.logprobs(entries)}
