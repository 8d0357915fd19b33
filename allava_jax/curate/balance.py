"""``curate balance``: LLaVA-OneVision-1.5's concept-balanced sampling over ``embed``'s output.

1. Each concept entry (one per line, MetaCLIP's 500K in the paper) is embedded by the CLIP text
   tower (``--concept-template``, default the bare entry), and each image gets its top-k
   concepts by cosine.
2. ``n_c`` = how many images have concept ``c`` among their top-k. MetaCLIP keeps each match of
   an entry with probability ``p_c = t / max(n_c, t)``; an image survives if any of its matches
   does, so its weight is ``w_i = 1 - prod_{c in topk(i)} (1 - p_c)``. LLaVA-OV-1.5 publishes
   neither k nor the aggregation: this is MetaCLIP's rule, applied to top-k matches.
   ``t`` defaults to ``target * k / C``, C the concepts matched at least once: a flat distribution
   at the target size (``target`` = the number of images with ``--weights-only``).
3. ``--target N``: a seeded weighted sample of N images without replacement (Efraimidis-Spirakis
   keys ``log(u) / w``, the same law as drawing one by one proportionally to weight), written per
   data file as ``subset-FFF.npy`` (sorted record indices); ``--weights-only``: ``weights-FFF.npy``,
   one weight per record, records without an embedding (text-only, bad image) at the mean weight.
   Either plugs into a data source (``{"path": ..., "subset": ...}`` / ``"weights"``).

Reports the concept-frequency distribution before and after (``concepts.png``, rank-frequency,
log-log) and the head/tail share (head = the 10 % most frequent concepts before balancing).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from allava_jax import storage
from allava_jax.curate.embed import load_embeddings
from allava_jax.curate.scorer import ClipScorer
from allava_jax.errors import UserError
from allava_jax.files import atomic_save_npy, atomic_write

HEAD_FRACTION = 0.1


@dataclass
class BalanceSettings:
    """One ``curate balance`` invocation."""

    embeddings: str
    concepts: str
    clip: str
    out: Path
    top_k: int = 1
    target: int | None = None  # None: weights only
    t: float | None = None
    seed: int = 0
    concept_template: str = "{}"
    batch_size: int = 4096


def read_concepts(path: str | Path) -> list[str]:
    """Concept entries: a JSON list, or one per line (blank lines ignored, duplicates refused)."""
    text = storage.as_path(path).read_text(encoding="utf-8")
    entries = json.loads(text) if text.lstrip().startswith("[") else [ln.strip() for ln in text.splitlines()]
    entries = [e for e in entries if isinstance(e, str) and e.strip()]
    if not entries:
        raise UserError(f"{path}: no concept entries")
    if len(set(entries)) != len(entries):
        raise UserError(f"{path}: duplicate concept entries")
    return entries


def top_k_concepts(images: np.ndarray, concepts: np.ndarray, k: int, mesh: jax.sharding.Mesh,
                   batch: int) -> np.ndarray:
    """int32 [n, k]: each image's k nearest concepts by cosine (unit vectors), batches of images
    split over the mesh's devices, the concept matrix replicated."""
    replicated, split = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    n_dev = mesh.devices.size
    batch = -(-min(batch, max(len(images), 1)) // n_dev) * n_dev
    fn = jax.jit(lambda c, x: jax.lax.top_k(x @ c.T, k)[1], in_shardings=(replicated, split),
                 out_shardings=replicated)
    table = jax.device_put(jnp.asarray(concepts, jnp.float32), replicated)
    out = []
    for s in range(0, len(images), batch):
        x = images[s : s + batch]
        pad = batch - len(x)
        x = np.concatenate([x, np.zeros((pad, x.shape[1]), np.float32)]) if pad else x
        out.append(np.asarray(fn(table, x))[: batch - pad])
    return np.concatenate(out).astype(np.int32)


def concept_weights(assigned: np.ndarray, n_concepts: int, t: float) -> tuple[np.ndarray, np.ndarray]:
    """(per-image weights ``1 - prod(1 - t / max(n_c, t))``, concept counts ``n_c``)."""
    counts = np.bincount(assigned.ravel(), minlength=n_concepts)
    keep = t / np.maximum(counts, t)
    return 1.0 - np.prod(1.0 - keep[assigned], axis=1), counts


def weighted_sample(weights: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Indices of ``n`` items drawn without replacement proportionally to ``weights`` (sorted)."""
    positive = np.flatnonzero(weights > 0)
    if n > len(positive):
        raise UserError(f"--target {n} exceeds the {len(positive)} images with a positive weight")
    u = np.random.default_rng(seed).random(len(positive))
    keys = np.log(u) / weights[positive]
    return np.sort(positive[np.argpartition(-keys, n - 1)[:n]])


def head_share(counts: np.ndarray, head: np.ndarray) -> float:
    total = counts.sum()
    return float(counts[head].sum() / total) if total else 0.0


def plot(before: np.ndarray, after: np.ndarray, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for counts, label in ((before, "before"), (after, "after")):
        c = np.sort(counts[counts > 0])[::-1]
        ax.loglog(np.arange(1, len(c) + 1), c, label=label)
    ax.set_xlabel("concept rank")
    ax.set_ylabel("images with the concept in their top-k")
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    atomic_write(path, buf.getvalue())
    plt.close(fig)


def run_balance(s: BalanceSettings) -> dict:
    """Assign, weigh, sample and report; writes ``balance.json`` and the per-file arrays."""
    out = storage.as_path(s.out)
    out.mkdir(parents=True, exist_ok=True)
    manifest, vectors, rows = load_embeddings(s.embeddings)
    good = np.array([not r.get("error") for r in rows])
    if not good.any():
        raise UserError(f"{s.embeddings}: no image was embedded")
    concepts = read_concepts(s.concepts)
    if not 1 <= s.top_k <= len(concepts):
        raise UserError(f"--top-k {s.top_k} must be in [1, {len(concepts)}] (the number of concepts)")
    scorer = ClipScorer(s.clip)
    text = scorer.embed_texts([s.concept_template.format(c) for c in concepts], prefix="")
    assigned = top_k_concepts(vectors[good], text, s.top_k, scorer.mesh, s.batch_size)
    n_images = len(assigned)
    target = s.target if s.target is not None else n_images
    active = int(np.count_nonzero(np.bincount(assigned.ravel(), minlength=len(concepts))))
    t = s.t if s.t is not None else target * s.top_k / active
    weights, counts = concept_weights(assigned, len(concepts), t)
    head = np.argsort(-counts, kind="stable")[: max(1, int(round(HEAD_FRACTION * active)))]
    keys = np.array([tuple(map(int, r["key"].split(":"))) for r, g in zip(rows, good) if g], np.int64)
    files = manifest["data"]
    report = {"formula": "w_i = 1 - prod_{c in topk(i)} (1 - t / max(n_c, t))", "t": t, "top_k": s.top_k,
              "seed": s.seed, "images": n_images, "concepts": len(concepts), "concepts_matched": active,
              "head_concepts": len(head), "head_share_before": head_share(counts, head), "sources": []}
    if s.target is not None:
        chosen = weighted_sample(weights, s.target, s.seed)
        after = np.bincount(assigned[chosen].ravel(), minlength=len(concepts))
        for f, path in enumerate(files):
            idx = np.sort(keys[chosen][keys[chosen][:, 0] == f, 1])
            name = f"subset-{f:03d}.npy"
            atomic_save_npy(out / name, idx)
            report["sources"].append({"path": path, "subset": str((out / name).resolve()), "records": len(idx)})
        report["selected"] = int(len(chosen))
    else:  # the expected count of each concept when an epoch draws len(images) by weight
        after = np.zeros(len(concepts))
        np.add.at(after, assigned.ravel(), np.repeat(weights, s.top_k) * n_images / weights.sum())
        for f, (path, n) in enumerate(zip(files, manifest["records"])):
            per_record = np.full(n, weights.mean(), np.float32)
            mine = keys[:, 0] == f
            per_record[keys[mine, 1]] = weights[mine]
            name = f"weights-{f:03d}.npy"
            atomic_save_npy(out / name, per_record)
            report["sources"].append({"path": path, "weights": str((out / name).resolve()), "records": n})
    report["head_share_after"] = head_share(after, head)
    plot(counts, after, out / "concepts.png")
    atomic_write(out / "concept_counts.json", json.dumps({"concepts": concepts, "before": counts.tolist(),
                                                          "after": np.asarray(after).tolist()}))
    atomic_write(out / "balance.json", json.dumps(report, indent=1))
    return report

