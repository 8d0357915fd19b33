"""Pairwise judging: our model's answers against an anchor model's, by an LLM judge at any
OpenAI-compatible endpoint, each pair judged in both orders.

The protocol is Vicuna-80's / MT-Bench's pairwise one (FastChat's pairwise judge; MLLM-Bench the
same with the image shown to the judge): the judge sees the question and two answers as
Assistant A and B and ends with ``[[A]]``, ``[[B]]`` or ``[[C]]`` (tie). Every pair is judged twice,
ours first and anchor first. An item is a **win** when both orders prefer ours, a **loss** when
both prefer the anchor, and a **tie** otherwise: a verdict that flips with the order is position
bias, and counts as a tie, as MT-Bench counts inconsistent verdicts.

Runs are resumable like synthesis: every judge response is journaled (``synth.journal``) before it
is used, and a finished judgement is never requested again; a request id holds a hash of the
question and both answers, so a changed answer is judged afresh.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import openai

from allava_jax import storage
from allava_jax.errors import UserError
from allava_jax.synth.client import FATAL_ERRORS, FatalAPIError, error_reason, is_retryable_later, make_client
from allava_jax.synth.items import jpeg_data_url
from allava_jax.synth.journal import Journal
from allava_jax.synth.usage import Budget, Price, image_tokens, text_tokens

log = logging.getLogger(__name__)

DEFAULT_PROMPT = Path(__file__).parent / "prompts" / "pairwise.json"
ANSWERS_FILE = "answers.jsonl"
JOURNAL_FILE = "judge_journal.jsonl"
RESULTS_FILE = "judgements.jsonl"
ORDERS = ("ours_first", "anchor_first")
ITEM_HEADER = "X-Judge-Request-Id"  # lets a proxy or fake server correlate requests with pairs
_VERDICT = re.compile(r"\[\[([ABC])\]\]")


@dataclass(frozen=True)
class Question:
    id: str
    text: str
    image: Path | None = None
    category: str = ""


@dataclass(frozen=True)
class JudgePrompt:
    system: str
    user: str  # with {question}, {answer_a}, {answer_b}


@dataclass(frozen=True)
class JudgeSettings:
    model: str
    base_url: str | None = None
    concurrency: int = 8
    max_attempts: int = 3  # malformed verdicts re-requested, counted across runs
    max_tokens: int = 1024
    temperature: float = 0.0
    timeout: float = 120.0
    max_retries: int = 5  # the SDK's own retries of 429 / 5xx / timeouts
    max_cost: float | None = None
    price: Price | None = None
    image_max_side: int = 1024


# ----- inputs -------------------------------------------------------------------------------------


def _jsonl(path: Path) -> list[tuple[int, dict]]:
    """(line number, record) of a JSONL file; a bad line is an error naming file and line."""
    if not path.exists():
        raise UserError(f"{path}: no such file")
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{n}: not JSON ({e})") from None
        if not isinstance(record, dict) or "question_id" not in record:
            raise UserError(f"{path}:{n}: a record needs a question_id")
        out.append((n, record))
    return out


def load_questions(path: str | Path, image_root: str | Path | None = None) -> list[Question]:
    """Vicuna-80 ``question.jsonl`` (``question_id``, ``text``, ``category``) or MLLM-Bench style
    records (``question`` and an ``image`` path, relative to ``image_root``)."""
    path = Path(path)
    questions, seen = [], set()
    for n, r in _jsonl(path):
        text = r.get("text", r.get("question"))
        if not isinstance(text, str) or not text.strip():
            raise UserError(f"{path}:{n}: no question text ('text' or 'question')")
        qid = str(r["question_id"])
        if qid in seen:
            raise UserError(f"{path}:{n}: question_id {qid} appears twice")
        seen.add(qid)
        image = None
        if r.get("image"):
            image = Path(image_root or path.parent) / r["image"]
            if not image.exists():
                raise UserError(f"{path}:{n}: image {image} not found")
        questions.append(Question(qid, text, image, str(r.get("category", ""))))
    return questions


def load_answers(path: str | Path) -> dict[str, str]:
    """question_id -> answer text, from FastChat answer files (``text``; or ``choices[0].turns[0]``)
    or ``{question_id, answer}`` records."""
    path = storage.as_path(path)
    answers = {}
    for n, r in _jsonl(path):
        text = r.get("text", r.get("answer"))
        if text is None and r.get("choices"):
            text = r["choices"][0].get("turns", [None])[0]
        if not isinstance(text, str):
            raise UserError(f"{path}:{n}: no answer text ('text', 'answer' or choices[0].turns[0])")
        answers[str(r["question_id"])] = text
    return answers


def load_prompt(path: str | Path | None = None) -> JudgePrompt:
    path = Path(path or DEFAULT_PROMPT)
    try:
        d = json.loads(path.read_text())
        prompt = JudgePrompt(d["system"], d["user"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise UserError(f"{path}: a judge prompt is a JSON object with 'system' and 'user' strings ({e})") from None
    missing = [k for k in ("{question}", "{answer_a}", "{answer_b}") if k not in prompt.user]
    if missing:
        raise UserError(f"{path}: the user prompt lacks {missing}")
    if "[[A]]" not in prompt.system + prompt.user:
        raise UserError(f"{path}: the prompt must ask for the [[A]] / [[B]] / [[C]] verdict format")
    return prompt


# ----- our answers ----------------------------------------------------------------------------------


def generate_answers(engine: Any, questions: Sequence[Question], out: Path, *, max_new_tokens: int = 512,
                     batch_size: int = 8) -> dict[str, str]:
    """Our model's greedy answers in its chat template, appended to ``out`` batch by batch, so a
    rerun generates only the questions not yet answered."""
    from allava_jax.infer import media
    from allava_jax.infer.prompts import single_turn
    from allava_jax.infer.sampling import SamplingParams

    # Appended batch by batch: a plain file locally; on a bucket one new object per batch
    # (storage.AppendLog: object stores have no append).
    answers = storage.AppendLog(out, flush_every_s=math.inf)
    if storage.is_remote(out):
        done = {str(r["question_id"]): r["text"] for r in answers.read()}
    else:
        done = load_answers(out) if Path(out).exists() else {}
    todo = [q for q in questions if q.id not in done]
    vision = engine.config.vision
    with answers:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            prompts = []
            for q in chunk:
                pixels = None if q.image is None else media.stack([media.load_file(q.image, vision)], vision)
                prompts.append(engine.prompt(single_turn(q.text, 0 if pixels is None else 1), pixels))
            completions = engine.generate(prompts, SamplingParams(max_new_tokens=max_new_tokens))
            for q, c in zip(chunk, completions):
                answers.append({"question_id": q.id, "text": c.text, "model_id": "allava_jax"})
                done[q.id] = c.text
            answers.flush()
    return done


# ----- judging --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pair:
    """One judge request: a question and the two answers in one order."""

    question: Question
    order: str  # "ours_first" | "anchor_first"
    answer_a: str
    answer_b: str
    request_id: str


def pairs(questions: Sequence[Question], ours: dict[str, str], anchor: dict[str, str]) -> list[Pair]:
    """Both orders of every question that has both answers."""
    out = []
    for q in questions:
        if q.id not in ours or q.id not in anchor:
            continue
        digest = hashlib.sha256(json.dumps([q.text, ours[q.id], anchor[q.id]]).encode()).hexdigest()[:16]
        out.append(Pair(q, ORDERS[0], ours[q.id], anchor[q.id], f"{q.id}|{ORDERS[0]}|{digest}"))
        out.append(Pair(q, ORDERS[1], anchor[q.id], ours[q.id], f"{q.id}|{ORDERS[1]}|{digest}"))
    return out


def parse_verdict(text: str | None) -> str:
    """"A", "B" or "C" (tie); ValueError unless exactly one kind of verdict tag is present."""
    found = set(_VERDICT.findall(text or ""))
    if len(found) != 1:
        raise ValueError(f"expected one of [[A]], [[B]], [[C]]; found {sorted(found) or 'none'}")
    return found.pop()


# Both orders of a question send the same image: encode it once.
_image_url = functools.lru_cache(maxsize=32)(jpeg_data_url)


def messages(prompt: JudgePrompt, pair: Pair, image_max_side: int) -> list[dict]:
    # str.replace, not format: answers may hold braces.
    user = (prompt.user.replace("{question}", pair.question.text)
            .replace("{answer_a}", pair.answer_a).replace("{answer_b}", pair.answer_b))
    content: Any = user
    if pair.question.image is not None:
        content = [{"type": "image_url", "image_url": {"url": _image_url(pair.question.image, image_max_side)}},
                   {"type": "text", "text": user}]
    return [{"role": "system", "content": prompt.system}, {"role": "user", "content": content}]


def _estimate_cost(settings: JudgeSettings, prompt: JudgePrompt, pair: Pair) -> float:
    """An upper bound of one request's cost for the ``max_cost`` reservation (all ``max_tokens``)."""
    if settings.price is None:
        return 0.0
    n = text_tokens(prompt.system) + text_tokens(prompt.user) + text_tokens(pair.answer_a + pair.answer_b + pair.question.text)
    if pair.question.image is not None:
        n += image_tokens(1024, 1024)
    return settings.price.cost(n, settings.max_tokens)


async def _judge_one(pair: Pair, journal: Journal, client: openai.AsyncOpenAI, prompt: JudgePrompt,
                     settings: JudgeSettings, budget: Budget) -> bool:
    """Request ``pair`` until it has a verdict or its attempts are used up; False if the budget stopped it."""
    rid = pair.request_id
    try:
        msgs = await asyncio.to_thread(messages, prompt, pair, settings.image_max_side)
    except OSError as e:
        journal.append({"k": "failed", "id": rid, "reason": f"input_error: {e}", "retryable": False})
        return True
    last = None
    for _ in range(max(0, settings.max_attempts - journal.state.bad[rid])):
        est = _estimate_cost(settings, prompt, pair)
        if not budget.reserve(est):
            return False
        try:
            resp = await client.chat.completions.create(
                model=settings.model, messages=msgs, max_completion_tokens=settings.max_tokens,
                temperature=settings.temperature, extra_headers={ITEM_HEADER: rid})
        except FATAL_ERRORS as e:
            raise FatalAPIError(error_reason(e)) from None
        except openai.APIError as e:
            journal.append({"k": "failed", "id": rid, "reason": error_reason(e), "retryable": is_retryable_later(e)})
            return True
        finally:
            budget.release(est)
        usage = resp.usage.model_dump() if resp.usage else None
        cost = settings.price.usage_cost(usage) if settings.price else 0.0
        text = resp.choices[0].message.content if resp.choices else None
        base = {"id": rid, "usage": usage, "cost": cost, "resp_id": resp.id}
        try:
            verdict = parse_verdict(text)
        except ValueError as e:
            journal.append({"k": "bad", **base, "reason": str(e), "raw": text})
            last = str(e)
            continue
        journal.append({"k": "done", **base, "result": {"verdict": verdict, "judgement": text}})
        return True
    journal.append({"k": "failed", "id": rid, "reason": f"no verdict after {settings.max_attempts} attempts; last: {last}",
                    "retryable": False})
    return True


async def _judge_all(todo: list[Pair], journal: Journal, prompt: JudgePrompt, settings: JudgeSettings,
                     progress: Callable[[], None]) -> str | None:
    client = make_client(settings.base_url, settings.timeout, settings.max_retries)
    budget = Budget(settings.max_cost, lambda: journal.state.totals.cost)
    queue, stopped = iter(todo), []

    async def worker() -> None:
        for pair in queue:  # one shared iterator: each pair goes to one worker
            if stopped or not await _judge_one(pair, journal, client, prompt, settings, budget):
                stopped.append("budget")
                return
            progress()

    try:
        async with asyncio.TaskGroup() as tg:
            for _ in range(max(1, min(settings.concurrency, len(todo)))):
                tg.create_task(worker())
    except* FatalAPIError as eg:
        raise eg.exceptions[0] from None
    finally:
        await client.close()
    return f"max_cost ${settings.max_cost:g} reached" if stopped else None


# ----- results --------------------------------------------------------------------------------------


def outcome(ours_first: str, anchor_first: str) -> str:
    """Ours-perspective outcome of an item from the verdicts of both orders ("A", "B", "C")."""
    first = {"A": "win", "B": "loss", "C": "tie"}[ours_first]  # ours was Assistant A
    second = {"A": "loss", "B": "win", "C": "tie"}[anchor_first]  # ours was Assistant B
    return first if first == second and first != "tie" else "tie"


def summarize(pair_list: list[Pair], journal: Journal, out: Path) -> dict:
    """Per-item JSONL (both verdicts, the outcome) and win / tie / loss rates over judged items."""
    st = journal.state
    by_q: dict[str, dict[str, Pair]] = {}
    for p in pair_list:
        by_q.setdefault(p.question.id, {})[p.order] = p
    counts, per_order = Counter(), {o: Counter() for o in ORDERS}
    failed = pending = 0
    with (out / RESULTS_FILE).open("w") as f:
        for qid, both in by_q.items():
            verdicts = {o: st.done[p.request_id]["result"]["verdict"] for o, p in both.items() if p.request_id in st.done}
            row: dict[str, Any] = {"question_id": qid, "category": both[ORDERS[0]].question.category}
            for o, p in both.items():
                entry = st.done.get(p.request_id) or st.failed.get(p.request_id)
                row[o] = {"verdict": verdicts.get(o), "judgement": (entry or {}).get("result", {}).get("judgement"),
                          "error": None if p.request_id in st.done else (entry or {}).get("reason")}
            if len(verdicts) == 2:
                row["outcome"] = outcome(verdicts[ORDERS[0]], verdicts[ORDERS[1]])
                counts[row["outcome"]] += 1
                for o in ORDERS:
                    per_order[o][verdicts[o]] += 1
            elif any(p.request_id in st.failed for p in both.values()):
                row["outcome"], failed = "failed", failed + 1
            else:
                row["outcome"], pending = "pending", pending + 1
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    judged = sum(counts.values())

    def rate(k: str) -> float | None:
        return round(counts[k] / judged, 6) if judged else None

    t = st.totals
    return {"items": len(by_q), "judged": judged, "win": counts["win"], "tie": counts["tie"], "loss": counts["loss"],
            "win_rate": rate("win"), "tie_rate": rate("tie"), "loss_rate": rate("loss"),
            "verdicts": {o: dict(per_order[o]) for o in ORDERS}, "failed": failed, "pending": pending,
            "requests": t.requests, "prompt_tokens": t.prompt_tokens, "completion_tokens": t.completion_tokens,
            "cost": round(t.cost, 6)}


def judge(questions: Sequence[Question], ours: dict[str, str], anchor: dict[str, str], out: str | Path,
          settings: JudgeSettings, prompt: JudgePrompt | None = None, *, retry_failed: bool = False,
          progress: bool = True) -> dict:
    """Judge every question in both orders into ``out`` (resuming its journal); returns the summary."""
    from tqdm import tqdm

    out = storage.as_path(out)
    out.mkdir(parents=True, exist_ok=True)
    prompt = prompt or load_prompt()
    missing = [q.id for q in questions if q.id not in ours or q.id not in anchor]
    if missing:
        log.warning("%d questions lack our answer or the anchor's and are skipped: %s", len(missing), missing[:10])
    pair_list = pairs(questions, ours, anchor)
    if settings.max_cost is not None and settings.price is None:
        raise UserError(f"--max-cost needs a price for {settings.model!r}: pass --price-in/--price-out")
    with Journal(out / JOURNAL_FILE) as journal:
        st = journal.state
        todo = [p for p in pair_list if not st.finished(p.request_id, retry_failed)]
        bar = tqdm(total=len(pair_list), initial=len(pair_list) - len(todo), unit="pair", disable=not progress)
        stop = None
        try:
            if todo:
                stop = asyncio.run(_judge_all(todo, journal, prompt, settings, lambda: bar.update(1)))
        finally:
            bar.close()
            summary = summarize(pair_list, journal, out)
    summary["stopped"] = stop
    summary["skipped_questions"] = len(missing)
    return summary
