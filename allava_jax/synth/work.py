"""What one item's request is and how its response is handled: the per-mode strategy.

:class:`Work` holds what every mode shares (settings, journal, progress, failures, attempts) and
the interface the online loop (``pipeline._process``) drives: ``prepare`` builds the request once,
``call`` sends it, ``receive`` journals the answer as done or unusable. :class:`ChatWork` is the
chat-completions modes (laion, vflan, text; the batch route uses it too); the Images API mode is
``images.ImageWork``.
"""

from __future__ import annotations

import logging
import sys
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import Any

import openai
from tqdm import tqdm

from . import prompts as P
from .config import SynthConfig
from .items import Item, jpeg_data_url
from .journal import Journal
from .parse import ParseError, parse
from .usage import EST_OUTPUT_TOKENS, Price, estimate_prompt_tokens

log = logging.getLogger(__name__)
ITEM_HEADER = "X-Synth-Item-Id"  # lets a proxy or server log correlate requests with items


class Progress:
    """tqdm on stderr showing done / failed / cost (all runs of this directory)."""

    def __init__(self, total: int, journal: Journal, enabled: bool = True):
        self.journal = journal
        st = journal.state
        self.bar = tqdm(total=total, initial=len(st.done) + len(st.failed), file=sys.stderr,
                        disable=not enabled, unit="item", dynamic_ncols=True, mininterval=0.5)
        self.refresh(0)

    def refresh(self, finished: int = 1) -> None:
        st = self.journal.state
        self.bar.set_postfix_str(f"done={len(st.done)} failed={len(st.failed)} cost=${st.totals.cost:.4f}",
                                 refresh=False)
        self.bar.update(finished)

    def close(self) -> None:
        self.bar.close()


@dataclass(frozen=True)
class Request:
    """One item's request, built once (off the event loop) and sent again on every attempt."""

    body: dict  # keyword arguments of the SDK call
    est_prompt: int = 0  # estimated prompt tokens (chat modes)
    tokens: int = 0  # what the tokens/min limiter charges for it


class Work(ABC):
    """Shared context and bookkeeping; a mode subclasses it with its request and response steps."""

    def __init__(self, cfg: SynthConfig, journal: Journal):
        self.cfg, self.journal = cfg, journal
        self.progress: Progress | None = None

    # ---- the per-mode strategy ------------------------------------------------------------------
    @abstractmethod
    def prepare(self, item: Item) -> Request:
        """The request for ``item`` (may read files: called off the event loop)."""

    @abstractmethod
    def request_cost(self, req: Request) -> float:
        """Expected cost of one attempt: what ``--max-cost`` reserves while it is in flight."""

    @abstractmethod
    async def call(self, client: openai.AsyncOpenAI, item: Item, req: Request) -> Any:
        """Send ``req``; API errors propagate (the loop maps them onto outcomes)."""

    @abstractmethod
    async def receive(self, client: openai.AsyncOpenAI, item: Item, resp: Any) -> tuple[str | None, str | None]:
        """Journal one response as done or unusable: (None, None) if done, else (reason, raw output)."""

    @abstractmethod
    def dry_run(self, todo: list[Item], finished: int) -> dict:
        """Request count and estimated cost of ``todo``, without calling anything."""

    async def aclose(self) -> None:
        """Release what the mode opened for itself (the client is closed by the pipeline)."""

    # ---- shared bookkeeping ---------------------------------------------------------------------
    def finish(self, entry: dict) -> None:
        """Journal a ``done`` entry and move the progress bar."""
        self.journal.append(entry)
        if self.progress:
            self.progress.refresh()

    def fail(self, item: Item, reason: str, raw: str | None = None, retryable: bool = False,
             batch_id: str | None = None) -> None:
        """Journal that the item is given up on, with its reason (and the last raw output)."""
        entry = {"k": "failed", "id": item.id, "reason": reason, "raw": raw, "retryable": retryable}
        if batch_id:
            entry["batch"] = batch_id
        self.journal.append(entry)
        log.warning("item %s failed: %s", item.id, reason)
        if self.progress:
            self.progress.refresh()

    def attempts_left(self, item: Item) -> int:
        return max(0, self.cfg.max_attempts - self.journal.state.bad[item.id])


class ChatWork(Work):
    """The chat-completions modes: tagged-output prompts, token prices, parsing."""

    def __init__(self, cfg: SynthConfig, prompts: P.Prompts, journal: Journal, price: Price | None):
        super().__init__(cfg, journal)
        self.prompts, self.price = prompts, price
        self._avg_cost = [0.0, 0]

    # ---- requests -------------------------------------------------------------------------------
    def user_text(self, item: Item) -> str:
        return P.user_text(self.prompts, self.cfg.mode, item_id=item.id, seed=self.cfg.seed,
                           instruction=item.instruction)

    def messages(self, item: Item) -> list[dict]:
        """Chat messages for ``item`` (encodes the image: call off the event loop)."""
        url = jpeg_data_url(item.image_path, self.cfg.max_side, self.cfg.jpeg_quality) if item.image_path else None
        return P.build_messages(self.prompts.system, self.user_text(item), url, self.cfg.detail)

    def body(self, messages: list[dict]) -> dict:
        """The chat-completions request body (also the Batch API line body)."""
        return {"model": self.cfg.model, "messages": messages, "max_completion_tokens": self.cfg.max_tokens,
                "temperature": self.cfg.temperature}

    def est_output(self) -> int:
        return self.cfg.est_output_tokens or min(self.cfg.max_tokens, EST_OUTPUT_TOKENS[self.cfg.mode])

    def est_prompt(self, item: Item) -> int:
        return estimate_prompt_tokens(self.prompts.system, self.user_text(item), item, self.cfg.max_side,
                                      self.cfg.detail)

    def est_cost(self, prompt_tokens: int, batch: bool = False) -> float:
        """Expected cost of one request: the running average once responses exist, else the estimate."""
        total, n = self._avg_cost
        if n >= 5:
            return total / n
        return self.price.cost(prompt_tokens, self.est_output(), batch) if self.price else 0.0

    def prepare(self, item: Item) -> Request:
        est = self.est_prompt(item)
        return Request(self.body(self.messages(item)), est, est + self.cfg.max_tokens)

    def request_cost(self, req: Request) -> float:
        return self.est_cost(req.est_prompt)

    async def call(self, client: openai.AsyncOpenAI, item: Item, req: Request) -> Any:
        return await client.chat.completions.create(**req.body, extra_headers={ITEM_HEADER: item.id})

    def dry_run(self, todo: list[Item], finished: int) -> dict:
        prompt = sum(self.est_prompt(it) for it in todo)
        completion = len(todo) * self.est_output()
        cost = self.price.cost(prompt, completion, self.cfg.batch) if self.price else None
        return {"requests": len(todo), "finished": finished, "est_prompt_tokens": prompt,
                "est_completion_tokens": completion, "est_cost": cost,
                "price": asdict(self.price) if self.price else None}

    # ---- responses ------------------------------------------------------------------------------
    async def receive(self, client: openai.AsyncOpenAI, item: Item, resp: Any) -> tuple[str | None, str | None]:
        usage = resp.usage.model_dump() if resp.usage else None
        choice = resp.choices[0] if resp.choices else None
        text = choice.message.content if choice else None
        return self.handle(item, text, choice.finish_reason if choice else None, usage, resp.id), text

    def cost(self, usage: dict | None, batch: bool = False) -> float:
        return self.price.usage_cost(usage, batch) if self.price else 0.0

    def handle(self, item: Item, text: str | None, finish_reason: str | None, usage: dict | None,
               resp_id: str | None, batch_id: str | None = None) -> str | None:
        """Parse and journal one response; returns None if done, else the reason it was unusable."""
        cost = self.cost(usage, batch_id is not None)
        self._avg_cost[0] += cost
        self._avg_cost[1] += 1
        base = {"id": item.id, "usage": usage, "cost": cost, "resp_id": resp_id}
        if batch_id:
            base["batch"] = batch_id
        try:
            parsed = parse(self.cfg.mode, text, finish_reason)
        except ParseError as e:
            self.journal.append({"k": "bad", **base, "reason": str(e), "raw": text})
            log.info("item %s: unusable output (%s)", item.id, e)
            return str(e)
        result = {"answer": parsed.answer}
        if parsed.caption is not None:
            result["caption"] = parsed.caption
            result["caption_instruction"] = P.caption_instruction(self.prompts, self.cfg.seed, item.id)
        if parsed.questions is not None:
            k = P.question_number(self.cfg.seed, item.id)
            result.update(questions=list(parsed.questions), question_number=k, question=parsed.questions[k - 1])
        self.finish({"k": "done", **base, "result": result})
        return None
