"""A fake OpenAI-compatible judge for the pairwise and judged-task tests.

Each question's text says which answer the judge prefers: ``prefer:ours``, ``prefer:anchor``,
``prefer:first`` (pure position bias), ``prefer:tie``, or ``prefer:garbage`` (never a verdict); our answers hold the word OURS, the
anchor's ANCHOR. Faults, drawn per request from a seeded generator: 500s (the SDK retries them) and
malformed verdicts (re-requested). Counts 200 responses per request id (``X-Judge-Request-Id``).
"""

from __future__ import annotations

import asyncio
import random
import re
import threading
from collections import Counter
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse


@dataclass
class JudgeState:
    fail_rate: float = 0.0  # 500 responses
    malformed_rate: float = 0.0  # answers without a verdict
    latency: float = 0.0
    seed: int = 0
    scores: str = "8 6"  # the reply to lmms-eval's llava-in-the-wild scoring prompt
    delivered: Counter = field(default_factory=Counter)  # 200 responses per request id
    malformed: Counter = field(default_factory=Counter)
    requests: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)


def _text(messages: list[dict]) -> str:
    content = messages[-1]["content"]
    return content if isinstance(content, str) else " ".join(p.get("text", "") for p in content if p.get("type") == "text")


def _verdict(user: str) -> str:
    pref = re.search(r"prefer:(\w+)", user).group(1)
    a = user.split("[The Start of Assistant A's Answer]")[1].split("[The End of Assistant A's Answer]")[0]
    ours_is_a = "OURS" in a
    if pref == "first":
        return "A"
    if pref == "tie":
        return "C"
    return "A" if (pref == "ours") == ours_is_a else "B"


def make_judge_app(state: JudgeState) -> FastAPI:
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        rid = request.headers.get("x-judge-request-id", "")
        with state.lock:
            state.requests += 1
            fault = state.rng.random()
        if state.latency:
            await asyncio.sleep(state.latency)
        if fault < state.fail_rate:
            return JSONResponse({"error": {"message": "injected", "type": "server_error"}}, status_code=500)
        user = _text(body["messages"])
        if "[Assistant 1]" in user or "[user 1]" in user.lower():  # lmms-eval's llava-in-the-wild review
            text = f"{state.scores}\nBoth answers are reviewed."
        elif fault < state.fail_rate + state.malformed_rate or "prefer:garbage" in user:
            text = "Both are fine, I cannot decide. Verdict: A or B."
            with state.lock:
                state.malformed[rid] += 1
        else:
            text = f"Assistant {'A' if _verdict(user) == 'A' else 'B'} explains more. [[{_verdict(user)}]]"
        with state.lock:
            state.delivered[rid] += 1
        return {"id": f"cmpl-{state.requests}", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120}}

    return app
