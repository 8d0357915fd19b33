"""Inputs for the three modes, and images as downscaled JPEG data URLs.

``laion``: a folder of images (id = path without extension) or a manifest (JSON list or JSONL of
``{"id", "image", "original_caption"?, "url"?}``; ``caption`` is accepted for ``original_caption``).
``vflan``: Vision-FLAN-style records ``{"id", "image", "instruction"}`` or LLaVA-style records whose
first human turn is the instruction. ``text``: ``{"idx" or "id", "instruction" or "question"}`` or
conversations. ``images``: captions, from ALLaVA/LLaVA caption records (``{"id", "image"?,
"conversations"}``: the first gpt turn is the caption) or ``{"id", "caption"}`` rows. Images resolve
against ``--image-root`` (default: the file's folder).
"""

from __future__ import annotations

import base64
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


@dataclass(frozen=True)
class Item:
    """One unit of work: one request per item."""

    id: str
    image_path: Path | None = None  # file to send
    image: str | None = None  # value of the records' "image" field
    instruction: str | None = None  # vflan instruction / text question / images: the caption (prompt)
    extra: dict = field(default_factory=dict)  # LAION original_caption, url


def read_records(path: str | Path) -> list[dict]:
    """A JSON list or JSONL file of dicts; errors name the file and the line or record."""
    text = Path(path).read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    else:
        records = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}: line {n} is not valid JSON ({e.msg})") from None
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise ValueError(f"{path}: record {i} is not a JSON object")  # noqa: TRY004 - an input error
    return records


def _check_unique(items: list[Item], source: str | Path | None = None) -> list[Item]:
    """Ids must be unique: the journal and the outputs are keyed by them."""
    seen: dict[str, int] = {}
    for i, it in enumerate(items):
        if it.id in seen:
            where = f"{source}: records {seen[it.id]} and {i}" if source else "the input"
            raise ValueError(f"duplicate item id {it.id!r} in {where}")
        seen[it.id] = i
    return items


def _first_turn(rec: dict, speaker: str) -> str | None:
    """The value of the first ``speaker`` ("human"/"gpt") turn of a LLaVA-style record."""
    for turn in rec.get("conversations") or []:
        if isinstance(turn, dict) and turn.get("from") == speaker:
            return turn.get("value")
    return None


def _first_human(rec: dict) -> str | None:
    text = _first_turn(rec, "human")
    return None if text is None else text.replace("<image>", "").strip()


def laion_from_folder(images: str | Path, prefix: str = "") -> list[Item]:
    """Every image under ``images`` (sorted), id = relative path without extension."""
    root = Path(images)
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file())
    return _check_unique([Item(id=p.relative_to(root).with_suffix("").as_posix(), image_path=p,
                               image=prefix + p.relative_to(root).as_posix()) for p in paths])


def laion_from_manifest(manifest: str | Path, image_root: str | Path | None = None, prefix: str = "") -> list[Item]:
    """Manifest rows -> items; ``original_caption`` and ``url`` ride along into the records."""
    root = Path(image_root) if image_root else Path(manifest).parent
    items = []
    for rec in read_records(manifest):
        extra = {}
        cap = rec.get("original_caption", rec.get("caption"))
        if cap is not None:
            extra["original_caption"] = cap
        if rec.get("url") is not None:
            extra["url"] = rec["url"]
        items.append(Item(id=str(rec["id"]), image_path=root / rec["image"], image=prefix + rec["image"], extra=extra))
    return _check_unique(items, manifest)


def vflan_from_records(records: str | Path, image_root: str | Path | None = None, prefix: str = "") -> list[Item]:
    """Records with an image and an instruction."""
    root = Path(image_root) if image_root else Path(records).parent
    items = []
    for rec in read_records(records):
        instruction = rec.get("instruction") or _first_human(rec)
        if not instruction:
            raise ValueError(f"record {rec.get('id')!r} has no instruction")
        items.append(Item(id=str(rec["id"]), image_path=root / rec["image"], image=prefix + rec["image"],
                          instruction=instruction))
    return _check_unique(items, records)


def text_from_questions(questions: str | Path) -> list[Item]:
    """Text questions (Evol-Instruct style)."""
    items = []
    for i, rec in enumerate(read_records(questions)):
        q = rec.get("instruction") or rec.get("question") or _first_human(rec)
        if not q:
            raise ValueError(f"question record {i} has no text")
        items.append(Item(id=str(rec.get("idx", rec.get("id", i))), instruction=q))
    return _check_unique(items, questions)


def captions_from_file(captions: str | Path) -> list[Item]:
    """Captions to draw (images mode): the caption is the record's ``caption`` or first gpt turn."""
    items = []
    for i, rec in enumerate(read_records(captions)):
        if rec.get("id") is None:
            raise ValueError(f"{captions}: record {i} has no id")
        caption = rec["caption"] if "caption" in rec else _first_turn(rec, "gpt")
        if not isinstance(caption, str) or not caption.strip():
            raise ValueError(f"{captions}: record {i} (id {rec['id']!r}) has no caption "
                             "(a 'caption' field or a gpt turn in 'conversations')")
        items.append(Item(id=str(rec["id"]), instruction=caption.strip()))
    return _check_unique(items, captions)


def scaled_size(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    """Size after downscaling so the longest side is at most ``max_side`` (never upscales)."""
    w, h = size
    scale = min(1.0, max_side / max(w, h))
    return max(1, round(w * scale)), max(1, round(h * scale))


def image_size(path: Path) -> tuple[int, int]:
    """Pixel size from the header only (cheap; used by --dry-run)."""
    with Image.open(path) as im:
        return im.size


def jpeg_data_url(path: Path, max_side: int = 1024, quality: int = 90) -> str:
    """Downscale to ``max_side`` and encode as a base64 JPEG data URL (alpha flattened on white)."""
    with Image.open(path) as im:
        im.load()
        if im.mode in ("RGBA", "LA", "P"):
            im = im.convert("RGBA")
            bg = Image.new("RGB", im.size, (255, 255, 255))
            bg.paste(im, mask=im.getchannel("A"))
            im = bg
        elif im.mode != "RGB":
            im = im.convert("RGB")
        new = scaled_size(im.size, max_side)
        if new != im.size:
            im = im.resize(new, Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
