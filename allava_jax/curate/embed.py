"""``curate embed``: the CLIP image embedding of every record, for concept balancing.

The run directory holds, per chunk of records, ``chunks/NNNNNN.npy`` (float16 unit embeddings
[n, projection_dim]: half the disk of float32, ample for cosine ranking) and then
``chunks/NNNNNN.jsonl`` (one row per record: key, id, image, or the image's ``error``; its row's
vector is zero), the jsonl written last so that it marks the chunk done. ``embed_run.json`` names
the data files, their record counts, the scorer and the chunk size: ``balance`` maps weights back
to records with it. Chunks are split across processes or hosts as ``runs`` describes.
"""

from __future__ import annotations

import io
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm import tqdm

from allava_jax import storage, work_split
from allava_jax.curate import runs
from allava_jax.curate.pairs import Pair, read_pairs
from allava_jax.curate.score import load_pixels
from allava_jax.curate.scorer import ClipScorer
from allava_jax.errors import UserError
from allava_jax.files import atomic_save_npy, atomic_write

RUN_FILE = "embed_run.json"


@dataclass
class EmbedSettings:
    """One ``curate embed`` invocation."""

    data: Sequence[str]
    image_roots: Sequence[str]
    clip: str
    out: Path
    chunk_size: int = 4096
    batch_size: int = 64
    workers: int = 4
    progress: bool = True
    shard_index: int | None = None
    num_shards: int | None = None


def record_counts(paths: Sequence[str], pairs: Sequence[Pair], skipped: Sequence[dict]) -> list[int]:
    """Records per data file (every record is a pair or a skipped one)."""
    counts = [0] * len(paths)
    index_of = {str(p): f for f, p in enumerate(paths)}
    for p in pairs:
        f, i = map(int, p.key.split(":"))
        counts[f] = max(counts[f], i + 1)
    for s in skipped:
        f = index_of[s["file"]]
        counts[f] = max(counts[f], s["index"] + 1)
    return counts


def embed_chunk(pairs: Sequence[Pair], scorer: ClipScorer, roots: list[str],
                pool: ThreadPoolExecutor) -> tuple[np.ndarray, list[dict]]:
    """(float16 embeddings [n, dim], rows) of one chunk; a bad image's row has its error."""
    loaded = list(pool.map(lambda p: load_pixels(p, roots, scorer.image_size, False), pairs))
    good = [i for i, (px, _) in enumerate(loaded) if px is not None]
    vectors = np.zeros((len(pairs), scorer.config.projection_dim), np.float16)
    if good:
        vectors[good] = scorer.embed_images(np.stack([loaded[i][0] for i in good])).astype(np.float16)
    rows = [{"key": p.key, "id": p.id, "image": p.image, **fields} for p, (_, fields) in zip(pairs, loaded)]
    return vectors, rows


def run_embed(s: EmbedSettings) -> dict:
    """Embed this shard's chunks of ``s.data`` into ``s.out``, resuming finished ones."""
    out = storage.as_path(s.out)
    out.mkdir(parents=True, exist_ok=True)
    pairs, skipped = read_pairs(s.data, need_caption=False)
    if not pairs:
        raise UserError(f"{', '.join(map(str, s.data))}: no records with an image ({len(skipped)} skipped)")
    ident = {"data": runs.real_paths(s.data), "records": record_counts(s.data, pairs, skipped),
             "clip": storage.canonical(s.clip), "chunk_size": s.chunk_size}
    work_split.check_identity(out, RUN_FILE, ident, "embeddings")
    (out / runs.CHUNKS).mkdir(exist_ok=True)
    shard, n_shards = work_split.shard_of(s.shard_index, s.num_shards)
    roots = runs.image_roots(s.data, s.image_roots)
    chunks = [pairs[i : i + s.chunk_size] for i in range(0, len(pairs), s.chunk_size)]
    mine = list(work_split.my_chunks(len(chunks), (shard, n_shards)))
    scorer, computed, errors = None, 0, 0
    with tqdm(total=sum(len(chunks[ci]) for ci in mine), desc="embed", unit="image", disable=not s.progress,
              file=sys.stderr) as bar, ThreadPoolExecutor(max(1, s.workers)) as pool:
        for ci in mine:
            chunk = chunks[ci]
            npy, rows_path = runs.chunk_path(out, ci, ".npy"), runs.chunk_path(out, ci)
            rows = runs.read_rows(rows_path, [(p.key, p.id, p.image) for p in chunk])
            if rows is None or not npy.exists():
                scorer = scorer or ClipScorer(s.clip, batch_size=s.batch_size)
                vectors, rows = embed_chunk(chunk, scorer, roots, pool)
                atomic_save_npy(npy, vectors)
                atomic_write(rows_path, runs.jsonl(rows))
                computed += 1
            errors += sum(1 for r in rows if r.get("error"))
            bar.update(len(chunk))
    missing = [ci for ci in range(len(chunks)) if not runs.chunk_path(out, ci).exists()]
    return {"records": len(pairs), "skipped_records": len(skipped), "chunks": len(chunks), "computed": computed,
            "image_errors_in_my_chunks": errors, "shard": f"{shard}/{n_shards}",
            "chunks_missing": len(missing), "out": str(out)}


def load_embeddings(directory: str | Path) -> tuple[dict, np.ndarray, list[dict]]:
    """(the run's manifest, float32 embeddings [n, dim], rows) of a finished ``embed`` run; rows
    with an ``error`` keep their place (zero vector)."""
    directory = storage.as_path(directory)
    if not (directory / RUN_FILE).exists():
        raise UserError(f"{directory}: no {RUN_FILE} (not a `curate embed` output)")
    manifest = json.loads((directory / RUN_FILE).read_text())
    names = sorted(p.name for p in (directory / runs.CHUNKS).glob("*.jsonl"))
    if not names or names != [f"{i:06d}.jsonl" for i in range(len(names))]:
        raise UserError(f"{directory}: chunks missing or out of order ({len(names)} found): finish `curate embed` first")
    vectors, rows = [], []
    for name in names:
        chunk_rows = [json.loads(ln) for ln in (directory / runs.CHUNKS / name).read_text().splitlines() if ln.strip()]
        v = np.load(io.BytesIO((directory / runs.CHUNKS / name.replace(".jsonl", ".npy")).read_bytes()),
                    allow_pickle=False)
        if len(v) != len(chunk_rows):
            raise UserError(f"{directory / runs.CHUNKS / name}: {len(chunk_rows)} rows but {len(v)} vectors")
        vectors.append(v.astype(np.float32))
        rows += chunk_rows
    return manifest, np.concatenate(vectors), rows
