"""ALLaVA-4V output files, rebuilt from the journal in input order.

Caption and Instruct records share the item id and the published layout
(``{"id", "image", "conversations": [human, gpt]}``; LAION records also carry ``original_caption`` and
``url`` when the input had them). Text mode writes Evol-Instruct-style records keyed by ``idx``.
Images mode writes one LLaVA caption record per generated image (``id`` = caption id + ``_k``,
``caption_id``), the SynthVLM candidate pairs that CLIPScore selection later filters. Files are written to a temporary name and renamed, so a reader never sees half a file.
"""

from __future__ import annotations

import json
from pathlib import Path

from allava_jax import storage
from allava_jax.files import atomic_write

from .items import Item
from .journal import JournalState

CAPTION_FILE = "caption.json"
INSTRUCT_FILE = "instruct.json"
TEXT_FILE = "text.json"
IMAGES_FILE = "images.json"
FAILURES_FILE = "failures.jsonl"
OUTPUT_FILES = {"text": (TEXT_FILE,), "images": (IMAGES_FILE,)}  # other modes: caption + instruct


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


def image_records(item: Item, result: dict) -> list[dict]:
    """Images mode: one caption record per image file of the item."""
    human = "<image>\n" + result["caption_instruction"]
    return [{"id": f"{item.id}_{k}", "image": path, "caption_id": item.id,
             "conversations": _turns(human, result["caption"])} for k, path in enumerate(result["images"])]


def _records_of(mode: str, item: Item, result: dict) -> list[tuple[str, dict]]:
    """(output file, record) pairs of one finished item."""
    if mode == "images":
        return [(IMAGES_FILE, rec) for rec in image_records(item, result)]
    return list(build_records(mode, item, result).items())


def export(out: str | Path, mode: str, items: list[Item], state: JournalState) -> dict[str, int]:
    """Write the output files and ``failures.jsonl``; returns record counts per file."""
    out = storage.as_path(out)
    files: dict[str, list[dict]] = {name: [] for name in OUTPUT_FILES.get(mode, (CAPTION_FILE, INSTRUCT_FILE))}
    failures = []
    for item in items:
        if item.id in state.done:
            for name, rec in _records_of(mode, item, state.done[item.id]["result"]):
                files[name].append(rec)
        elif item.id in state.failed:
            f = state.failed[item.id]
            failures.append({"id": item.id, "reason": f["reason"], "raw": f.get("raw"),
                             "retryable": f.get("retryable", False)})
    for name, recs in files.items():
        atomic_write(out / name, json.dumps(recs, ensure_ascii=False, indent=1))
    atomic_write(out / FAILURES_FILE, "".join(json.dumps(f, ensure_ascii=False) + "\n" for f in failures))
    return {**{n: len(r) for n, r in files.items()}, FAILURES_FILE: len(failures)}
