"""Parse the model's tagged output; tolerant of formatting, strict about completeness.

Each part sits between ``<name>`` and ``</name>``. Accepted: any case, spaces inside the tag, markdown
decoration around tags (``**<caption>**``, headings, code fences), candidate questions numbered in any
common style (``1.``, ``1)``, ``(1)``, ``[1]``, ``Q1:``, ``Question 1 -``, bullets, or bare lines).
Rejected (so the item is re-requested): a missing begin or end tag, a repeated or empty part, a
truncated response, a question list that does not hold exactly five questions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

NUM_QUESTIONS = 5


class ParseError(ValueError):
    """Model output that cannot be used; ``str(err)`` is the reason written to the failures file."""


def _tag(name: str, closing: bool) -> re.Pattern[str]:
    slash = r"/\s*" if closing else ""
    return re.compile(rf"<\s*{slash}{name}\s*>", re.IGNORECASE)


# A line fragment made only of markdown decoration (emphasis, code, heading, quote, colon).
_DECOR = re.compile(r"^[\s*_`#>:~-]*$")


def section(text: str, name: str) -> str:
    """Return the stripped content of the single ``<name>...</name>`` section of ``text``."""
    begins = list(_tag(name, False).finditer(text))
    ends = list(_tag(name, True).finditer(text))
    if not begins:
        raise ParseError(f"missing <{name}> begin tag")
    if not ends:
        raise ParseError(f"missing </{name}> end tag (incomplete output)")
    if len(begins) > 1 or len(ends) > 1:
        raise ParseError(f"<{name}> section appears more than once")
    start, stop = begins[0].end(), ends[0].start()
    if stop < start:
        raise ParseError(f"</{name}> comes before <{name}>")
    body = text[start:stop]
    # Drop decoration hugging the tags: the rest of the begin line / the start of the end line.
    first_nl = body.find("\n")
    if first_nl >= 0 and _DECOR.match(body[:first_nl]):
        body = body[first_nl + 1 :]
    last_nl = body.rfind("\n")
    if last_nl >= 0 and _DECOR.match(body[last_nl + 1 :]):
        body = body[:last_nl]
    body = body.strip()
    if body.startswith("```") and body.endswith("```") and len(body) >= 6:
        body = body[3:-3].partition("\n")[2] if "\n" in body[3:-3] else body[3:-3]
        body = body.strip()
    body = re.sub(r"^(\*\*|__)(.*)\1$", r"\2", body, flags=re.DOTALL).strip()
    # Emphasis/code marks left over from a decorated tag on the same line: "` text `", "** text **".
    body = re.sub(r"^(?:\*\*+|_+|`+)[ \t]+|[ \t]+(?:\*\*+|_+|`+|#+)$", "", body).strip()
    if not body or _DECOR.match(body):
        raise ParseError(f"<{name}> section is empty")
    return body


_NUMBERED = re.compile(
    r"""^\s*(?:[-*•]\s*)?(?:\*\*|__)?\s*(?:
        (?:q(?:uestion)?\s*\#?\s*)?\(?\d{1,2}\s*[.):\]\-–]   # 1.  1)  (1)  1:  1 -  Q1.  Question 1:
      | \[\d{1,2}\]                                             # [1]
      | \#\s*\d{1,2}\s*[.:)]?                                   # #1
      | (?:q(?:uestion)?\s*\d{1,2})(?=\s)                      # Q1 text
    )\s*(?:\*\*|__)?\s*""",
    re.IGNORECASE | re.VERBOSE,
)
_BULLET = re.compile(r"^\s*[-*•]\s+")


def split_questions(block: str) -> list[str]:
    """Split a question list in any numbering style into its questions (prefixes removed)."""
    lines = [ln for ln in block.splitlines() if ln.strip() and not _DECOR.match(ln)]
    numbered = [bool(_NUMBERED.match(ln)) for ln in lines]
    bulleted = [bool(_BULLET.match(ln)) for ln in lines]
    starts = numbered if any(numbered) else bulleted if any(bulleted) else [True] * len(lines)
    questions: list[str] = []
    for ln, is_start in zip(lines, starts):
        if is_start:
            text = _NUMBERED.sub("", ln, count=1) if any(numbered) else _BULLET.sub("", ln, count=1)
            questions.append(text.strip())
        elif questions:
            questions[-1] = f"{questions[-1]} {ln.strip()}"
        else:
            questions.append(ln.strip())  # text before the first number: counted, so it fails
    return [re.sub(r"^(\*\*|__)(.*)\1$", r"\2", q).strip() for q in questions]


@dataclass(frozen=True)
class Parsed:
    """The usable parts of one response (fields unused by a mode are None)."""

    answer: str
    caption: str | None = None
    questions: tuple[str, ...] | None = None


def _check_finish(finish_reason: str | None) -> None:
    if finish_reason == "length":
        raise ParseError("truncated output (finish_reason=length)")
    if finish_reason == "content_filter":
        raise ParseError("output withheld by content filter")


def parse_laion(text: str, finish_reason: str | None = None) -> Parsed:
    """Caption, exactly five candidate questions, and the answer."""
    _check_finish(finish_reason)
    caption = section(text, "caption")
    questions = [q for q in split_questions(section(text, "questions")) if q]
    if len(questions) != NUM_QUESTIONS:
        raise ParseError(f"expected {NUM_QUESTIONS} candidate questions, found {len(questions)}")
    answer = section(text, "answer")
    return Parsed(answer=answer, caption=caption, questions=tuple(questions))


def parse_vflan(text: str, finish_reason: str | None = None) -> Parsed:
    """Caption and the answer to the given instruction."""
    _check_finish(finish_reason)
    return Parsed(answer=section(text, "answer"), caption=section(text, "caption"))


def parse_text(text: str, finish_reason: str | None = None) -> Parsed:
    """The regenerated answer."""
    _check_finish(finish_reason)
    return Parsed(answer=section(text, "answer"))


PARSERS = {"laion": parse_laion, "vflan": parse_vflan, "text": parse_text}


def parse(mode: str, text: str | None, finish_reason: str | None = None) -> Parsed:
    """Parse ``text`` for ``mode``; raises :class:`ParseError` with the reason."""
    if not text or not text.strip():
        raise ParseError("empty response")
    return PARSERS[mode](text, finish_reason)
