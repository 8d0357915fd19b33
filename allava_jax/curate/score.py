"""``curate score``: CLIPScore (and SSIM) of every image-caption pair, in resumable chunks, then
SynthVLM's selection into a LLaVA-format JSON that training reads as it is.

The run directory holds ``chunks/NNNNNN.jsonl`` (one scored row per pair, written atomically when
the chunk is done: a killed run redoes at most one chunk), ``scores.jsonl`` (all rows, input
order), ``selected.json`` (the kept records, verbatim, best first), ``skipped.jsonl`` (records
that are not pairs) and ``score_run.json`` (what the scores depend on; a rerun with other data,
scorer or SSIM setting is refused, while selection flags may change freely).
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm import tqdm

from allava_jax import storage, work_split
from allava_jax.curate import runs
from allava_jax.curate.pairs import Pair, read_pairs
from allava_jax.curate.scorer import PREFIX, W, ClipScorer, clip_score
from allava_jax.curate.select import LAMBDA, select
from allava_jax.data.images import ImageError, decode_image, read_image_bytes, resize_center_crop
from allava_jax.errors import UserError
from allava_jax.files import atomic_write

RUN_FILE = "score_run.json"


@dataclass
class ScoreSettings:
    """One ``curate score`` invocation."""

    data: Sequence[str]
    image_roots: Sequence[str]
    clip: str
    out: Path
    ssim: bool = False
    per_caption: str = "best"
    top: int | None = None
    min_score: float | None = None
    lam: float = LAMBDA
    w: float = W
    prefix: str = PREFIX
    chunk_size: int = 1024
    batch_size: int = 64
    workers: int = 4
    progress: bool = True
    shard_index: int | None = None  # with num_shards: this process's share of the chunks
    num_shards: int | None = None  # None: jax.distributed's process count (1 for a lone process)
    roots: list[str] = field(init=False)

    def __post_init__(self) -> None:
        self.out = storage.as_path(self.out)
        self.roots = runs.image_roots(self.data, self.image_roots)

    def identity(self) -> dict:
        """What the scores depend on."""
        return {"data": runs.real_paths(self.data), "clip": storage.canonical(self.clip), "ssim": self.ssim,
                "w": self.w, "prefix": self.prefix, "chunk_size": self.chunk_size}


def load_pixels(pair: Pair, roots: list[str], size: int, with_ssim: bool) -> tuple[np.ndarray | None, dict]:
    """(uint8 crop or None, the row's image fields): a bad image gives its reason, not an exception."""
    try:
        img = decode_image(read_image_bytes(pair.image, roots))
    except ImageError as e:
        return None, {"error": e.reason, "detail": e.detail}
    fields = {}
    if with_ssim:
        from allava_jax.curate.ssim import round_trip_ssim

        fields["ssim"] = round_trip_ssim(img)
    return resize_center_crop(img, size), fields


def score_chunk(pairs: Sequence[Pair], scorer: ClipScorer, s: ScoreSettings, pool: ThreadPoolExecutor) -> list[dict]:
    """Scored rows of ``pairs``; each distinct caption is embedded once (N images share it)."""
    loaded = list(pool.map(lambda p: load_pixels(p, s.roots, scorer.image_size, s.ssim), pairs))
    good = [i for i, (px, _) in enumerate(loaded) if px is not None]
    captions = sorted({pairs[i].caption for i in good})
    text = dict(zip(captions, scorer.embed_texts(captions, s.prefix))) if captions else {}
    images = scorer.embed_images(np.stack([loaded[i][0] for i in good])) if good else np.zeros((0, 1))
    rows = []
    for p, (_, fields) in zip(pairs, loaded):
        rows.append({"key": p.key, "id": p.id, "image": p.image, "group": p.group, **fields})
    for j, i in enumerate(good):
        t = text[pairs[i].caption]
        cos = float(np.dot(images[j], t))
        rows[i].update(cos=cos, clipscore=float(clip_score(images[j][None], t[None], s.w)[0]))
    return rows


def run_score(s: ScoreSettings) -> dict:
    """Score this shard's pairs of ``s.data`` into ``s.out`` (resuming finished chunks); once every
    chunk is present, merge and select."""
    s.out.mkdir(parents=True, exist_ok=True)
    work_split.check_identity(s.out, RUN_FILE, s.identity(), "scores")
    (s.out / runs.CHUNKS).mkdir(exist_ok=True)
    shard, n_shards = work_split.shard_of(s.shard_index, s.num_shards)
    pairs, skipped = read_pairs(s.data)
    if not pairs:
        raise UserError(f"{', '.join(map(str, s.data))}: no image-caption pairs ({len(skipped)} records skipped)")
    chunks = [pairs[i : i + s.chunk_size] for i in range(0, len(pairs), s.chunk_size)]
    rows: list[dict] = []
    scorer, reused, missing = None, 0, []
    mine = list(work_split.my_chunks(len(chunks), (shard, n_shards)))
    with tqdm(total=sum(len(chunks[ci]) for ci in mine), desc="score", unit="pair", disable=not s.progress,
              file=sys.stderr) as bar, ThreadPoolExecutor(max(1, s.workers)) as pool:
        for ci, chunk in enumerate(chunks):
            path, is_mine = runs.chunk_path(s.out, ci), ci % n_shards == shard
            done = runs.read_rows(path, [(p.key, p.id, p.image) for p in chunk])
            if is_mine:
                if done is None:
                    scorer = scorer or ClipScorer(s.clip, batch_size=s.batch_size)
                    done = score_chunk(chunk, scorer, s, pool)
                    atomic_write(path, runs.jsonl(done))
                else:
                    reused += 1
                bar.update(len(chunk))
            if done is None:
                missing.append(ci)
            else:
                rows += done
    summary = {"pairs": len(pairs), "chunks": len(chunks), "chunks_reused": reused, "shard": f"{shard}/{n_shards}",
               "out": str(s.out)}
    if missing:  # other shards' chunks are not written yet: the last one to finish merges
        return {**summary, "waiting_for_chunks": len(missing)}
    kept = select(rows, per_caption=s.per_caption, top=s.top, min_score=s.min_score, lam=s.lam)
    by_key = {p.key: p for p in pairs}
    atomic_write(s.out / "scores.jsonl", runs.jsonl(rows))
    atomic_write(s.out / "selected.json", json.dumps([by_key[r["key"]].record for r in kept], ensure_ascii=False,
                                                     indent=1))
    atomic_write(s.out / "skipped.jsonl", runs.jsonl(skipped))
    errors = Counter(r["error"] for r in rows if r.get("error"))
    return {**summary, "scored": len(rows) - sum(errors.values()), "image_errors": dict(errors),
            "skipped_records": len(skipped), "groups": len({p.group for p in pairs}), "selected": len(kept)}
