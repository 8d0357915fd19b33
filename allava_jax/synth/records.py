"""ALLaVA-4V output files, rebuilt from the journal in input order.

Caption and Instruct records share the item id and the published layout
(``{"id", "image", "conversations": [human, gpt]}``; LAION records also carry ``original_caption`` and
``url`` when the input had them). Text mode writes Evol-Instruct-style records keyed by ``idx``.
Files are written to a temporary name and renamed, so a reader never sees half a file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .items import Item
from .journal import JournalState

CAPTION_FILE = "caption.json"
INSTRUCT_FILE = "instruct.json"
TEXT_FILE = "text.json"
FAILURES_FILE = "failures.jsonl"


def _turns(human: str, gpt: str) -> list[dict]:
    return [{"from": "human", "value": human}, {"from": "gpt", "value": gpt}]


def build_records(mode: str, item: Item, result: dict) -> dict[str, dict]:
    """The output records of one finished item, keyed by output file name."""
    if mode == "text":
        return {TEXT_FILE: {"idx": item.id, "conversations": _turns(item.instruction or "", result["answer"])}}
    extra = dict(item.extra) if mode == "laion" else {}
    caption = {"id": item.id, "image": item.image,
               "conversations": _turns("<image>\n" + result["caption_instruction"], result["caption"]), **extra}
    question = result["question"] if mode == "laion" else item.instruction
    instruct = {"id": item.id, "image": item.image,
                "conversations": _turns("<image>\n" + question, result["answer"]), **extra}
    return {CAPTION_FILE: caption, INSTRUCT_FILE: instruct}


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def export(out: str | Path, mode: str, items: list[Item], state: JournalState) -> dict[str, int]:
    """Write the output files and ``failures.jsonl``; returns record counts per file."""
    out = Path(out)
    files: dict[str, list[dict]] = {TEXT_FILE: []} if mode == "text" else {CAPTION_FILE: [], INSTRUCT_FILE: []}
    failures = []
    for item in items:
        if item.id in state.done:
            for name, rec in build_records(mode, item, state.done[item.id]["result"]).items():
                files[name].append(rec)
        elif item.id in state.failed:
            f = state.failed[item.id]
            failures.append({"id": item.id, "reason": f["reason"], "raw": f.get("raw"),
                             "retryable": f.get("retryable", False)})
    for name, recs in files.items():
        _atomic_write(out / name, json.dumps(recs, ensure_ascii=False, indent=1))
    _atomic_write(out / FAILURES_FILE, "".join(json.dumps(f, ensure_ascii=False) + "\n" for f in failures))
    return {**{n: len(r) for n, r in files.items()}, FAILURES_FILE: len(failures)}
