"""`plan`: offline packing (LLaVA-OneVision-1.5). Every sample's token length from tokenizing
alone, packed into rows ahead of training, written as an ArrayRecord file + a JSON manifest.

Lengths come from the training-time ExampleBuilder with `read_images=False` (same template,
truncation and skip rules; image tokens are counted from the record's images, whose files are
never opened), over the same mixture order `check` reads, so a plan's lengths are exactly what the
online pipeline produces. Records that `check` would skip are skipped and counted here; image
files that turn out bad at training time are dropped from their rows then (see offline.py).

The plan file holds one record per row, in a seeded shuffled order: int64 [k, 4] bytes, one line
per member (source id, record index, token length, images). The manifest ``PLAN.json`` pins what
the lengths depend on (each source's realpath, size, mtime, copies, template, subset file; the
tokenizer; seq_len, num_image_tokens, image slots, truncation), so training on a stale plan is a
clear error (`open_plan`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from allava_jax import storage, work_split
from allava_jax.data import binpack, check, native as native_lib, pipeline, sources
from allava_jax.errors import UserError
from allava_jax.files import atomic_write

VERSION = 1
_SOURCE_FIELDS = ("realpath", "size", "mtime_ns", "copies", "template", "split", "subset")


def manifest_path(plan: str) -> str:
    return plan + ".json"


def _file_info(path: str) -> dict[str, Any]:
    """Pins a file (local or remote): ``mtime_ns`` is the object generation on a bucket."""
    name, size, version = storage.file_version(path)
    return {"realpath": name, "size": size, "mtime_ns": version}


def source_entry(spec: sources.SourceSpec) -> dict[str, Any]:
    """What a source contributes to the lengths (a TFDS source is pinned by its dataset_info.json)."""
    target = os.fspath(storage.as_path(spec.path) / "dataset_info.json") if spec.is_tfds else spec.path
    if not storage.as_path(target).exists():
        raise UserError(f"source {spec.name}: {spec.path} does not exist")
    return {"name": spec.name, "path": spec.path, **_file_info(target), "copies": spec.copies,
            "template": spec.template, "split": spec.split,
            "subset": _file_info(spec.subset) if spec.subset else None}


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of the tokenizer's full definition (vocabulary, merges, added tokens)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclasses.dataclass
class Lengths:
    """The usable samples of one epoch of the mixture, in mixture order."""

    keys: np.ndarray  # int64 [n, 2]: (source id, record index)
    lengths: np.ndarray  # int64 [n]: tokens, image tokens included (after truncation)
    images: np.ndarray  # int64 [n]
    patches: np.ndarray  # int64 [n]: vision patches (native resolution; else 0)
    report: check.CheckReport  # records read / usable / skipped by reason
    specs: list[sources.SourceSpec]
    settings: dict[str, Any]  # what the lengths depend on, besides the sources and the tokenizer


def epoch_keys(specs: Sequence[sources.SourceSpec], *, seed: int, cache_dir: str | None = None) -> np.ndarray:
    """(source id, record index) of every element of one epoch of the mixture, in order, reading
    no record: the same mixture (copies, subsets) that training and `check` read."""
    mix = sources.mixture(specs, seed=seed, cache_dir=cache_dir, keys_only=True)
    keys = np.empty((len(mix), 2), np.int64)
    for i in range(len(mix)):
        e = mix[i]
        keys[i] = e["source"], e["index"]
    return keys


CHUNK_SIZE = 65536  # mixture elements per lengths chunk: one process's unit of work and of resume
LENGTHS_IDENTITY = "identity.json"


def lengths_dir(plan: str) -> str:
    """Where a plan's per-chunk lengths go (kept: a re-plan with another row_len or method, or a
    rerun after a kill, reads them instead of tokenizing again)."""
    return plan + ".lengths"


def measure(
    sources_cfg: Sequence[Mapping[str, Any] | str],
    tokenizer: Any,
    *,
    seq_len: int,
    num_image_tokens: int,
    max_images: int,
    seed: int = 0,
    truncate: bool = True,
    chat_template: str = "allava",
    worker_count: int = 0,
    max_bad_fraction: float = 0.05,
    cache_dir: str | None = None,
    chunks_dir: str | None = None,
    shard: tuple[int, int] = (0, 1),
    chunk_size: int = CHUNK_SIZE,
    native: native_lib.NativeSpec | None = None,
    max_patches: int = 0,
) -> Lengths | None:
    """Every sample's token length from tokenizing alone (see module docstring).

    With ``chunks_dir``, the mixture is measured in chunks of ``chunk_size`` elements written
    there (process ``shard[0]`` of ``shard[1]`` measures its share, `work_split`; finished chunks
    are kept), and the result is None until every chunk is present."""
    specs = sources.parse_sources(sources_cfg, chat_template)
    for spec in specs:
        if spec.weights:
            raise UserError(f"source {spec.name}: a weighted source draws new records every epoch, so it "
                            "cannot be planned; sample a subset (curate balance --target N) and plan that")
    tokenizer = pipeline.load_tokenizer(tokenizer)
    keys = epoch_keys(specs, seed=seed, cache_dir=cache_dir)
    if native is not None:
        num_image_tokens = 0  # each image's own count, from its size
    settings = {"seq_len": seq_len, "num_image_tokens": num_image_tokens, "max_images_per_row": max_images,
                "truncate": truncate, "seed": seed}
    kw = dict(worker_count=worker_count, cache_dir=cache_dir, chat_template=chat_template, seed=seed,
              seq_len=seq_len, image_size=1, num_image_tokens=num_image_tokens, max_images_per_sample=max_images,
              truncate=truncate, read_images=False, read_threads=0)
    if native is not None:  # image headers are read for their sizes
        settings.update(native=dataclasses.asdict(native), max_patches_per_row=max_patches)
        kw.update(native=native, max_patches_per_sample=max_patches)
    starts = range(0, len(keys), chunk_size)
    if chunks_dir is None:
        chunks = [_measure_chunk(sources_cfg, tokenizer, slice(0, len(keys)), kw)]
    else:
        chunks = _measured_chunks(storage.as_path(chunks_dir), sources_cfg, tokenizer, kw, starts, chunk_size, shard, {
            "sources": [source_entry(sp) for sp in specs], "tokenizer": tokenizer_fingerprint(tokenizer),
            **settings, "elements": len(keys), "chunk_size": chunk_size})
        if chunks is None:
            return None
    report, usable = _merge_chunks(chunks, max_bad_fraction)
    assert len(usable) == len(keys), (len(usable), len(keys))
    return Lengths(keys[usable], np.asarray(report.lengths, np.int64).reshape(-1),
                   np.asarray(report.num_images, np.int64).reshape(-1),
                   np.asarray(report.num_patches, np.int64).reshape(-1), report, specs, settings)


def _measure_chunk(sources_cfg: Any, tokenizer: Any, positions: slice, kw: dict[str, Any]) -> dict[str, Any]:
    """One slice of the mixture: usable flags, lengths and images of the usable, skips by reason."""
    report, usable = check.tally(check.summaries(sources_cfg, tokenizer, positions=positions, **kw))
    return {"usable": usable, "lengths": np.asarray(report.lengths, np.int64),
            "images": np.asarray(report.num_images, np.int64), "patches": np.asarray(report.num_patches, np.int64),
            "skipped": report.skipped, "first_ids": report.first_ids}


def _measured_chunks(out: Path, sources_cfg: Any, tokenizer: Any, kw: dict[str, Any], starts: range,
                     chunk_size: int, shard: tuple[int, int], ident: dict[str, Any]) -> list[dict] | None:
    """This shard's chunks measured into ``out`` (finished ones reused); every chunk, once all are
    there."""
    work_split.check_identity(out, LENGTHS_IDENTITY, ident, "the lengths of a plan",
                              f"remove it (rm -r {out}) to measure these sources, or use another --out")
    paths = [out / f"{i:06d}.npz" for i in range(len(starts))]
    for i in work_split.my_chunks(len(starts), shard):
        if not paths[i].exists():
            chunk = _measure_chunk(sources_cfg, tokenizer, slice(starts[i], starts[i] + chunk_size), kw)
            _save_chunk(paths[i], chunk)
    if not all(p.exists() for p in paths):
        return None
    return [_load_chunk(p) for p in paths]


def _save_chunk(path: Path, chunk: dict[str, Any]) -> None:
    meta = json.dumps({"skipped": chunk["skipped"], "first_ids": chunk["first_ids"]})
    buf = io.BytesIO()
    np.savez(buf, usable=chunk["usable"], lengths=chunk["lengths"], images=chunk["images"], patches=chunk["patches"],
             meta=np.asarray(meta))
    atomic_write(path, buf.getvalue())


def _load_chunk(path: Path) -> dict[str, Any]:
    with np.load(io.BytesIO(path.read_bytes()), allow_pickle=False) as z:
        chunk = {k: z[k] for k in ("usable", "lengths", "images")}
        chunk["patches"] = z["patches"] if "patches" in z.files else np.zeros_like(chunk["images"])
        chunk.update(json.loads(str(z["meta"])))
    return chunk


def _merge_chunks(chunks: Sequence[dict[str, Any]], max_bad_fraction: float,
                  first_ids: int = 5) -> tuple[check.CheckReport, np.ndarray]:
    """The chunks' counts as one `check.CheckReport` (first ids in mixture order), and the usable flags."""
    report = check.CheckReport(max_bad_fraction=max_bad_fraction)
    for c in chunks:
        report.records += len(c["usable"])
        report.usable += int(c["usable"].sum())
        report.lengths.extend(c["lengths"].tolist())
        report.num_images.extend(c["images"].tolist())
        report.num_patches.extend(c["patches"].tolist())
        for reason, n in c["skipped"].items():
            report.skipped[reason] = report.skipped.get(reason, 0) + n
            ids = report.first_ids.setdefault(reason, [])
            ids.extend(c["first_ids"][reason][: first_ids - len(ids)])
    usable = np.concatenate([c["usable"] for c in chunks]) if chunks else np.zeros(0, bool)
    return report, usable


def write_plan(
    out: str,
    measured: Lengths,
    rows: Sequence[Sequence[int]],
    *,
    seed: int,
    manifest: dict[str, Any],
) -> dict[str, Any]:
    """Writes the rows (in a seeded shuffled order) and the manifest; returns the manifest."""
    from array_record.python import array_record_module  # local: heavy import

    order = np.random.default_rng(seed).permutation(len(rows))
    table = np.stack([measured.keys[:, 0], measured.keys[:, 1], measured.lengths, measured.images], 1)
    # Written locally (next to `out`, or in a temporary dir for a remote `out`), then renamed or
    # uploaded as one object: a reader never sees half a plan.
    with storage.local_output(out) as tmp:
        writer = array_record_module.ArrayRecordWriter(os.fspath(tmp), "group_size:1")
        for r in order:
            writer.write(np.ascontiguousarray(table[np.asarray(rows[r], np.int64)]).tobytes())
        writer.close()
    manifest = {**manifest, "rows": len(rows)}
    atomic_write(manifest_path(out), json.dumps(manifest, indent=1))
    return manifest


def make_plan(
    sources_cfg: Sequence[Mapping[str, Any] | str],
    tokenizer: Any,
    out: str,
    *,
    row_len: int,
    method: str = "best",
    **measure_kw: Any,
) -> tuple[check.CheckReport | None, dict[str, Any] | None]:
    """Measures (`measure_kw`: `measure`'s seq_len, num_image_tokens, ...), packs and writes a plan;
    returns (report, manifest). The manifest is None when nothing was written: more records than
    `max_bad_fraction` are bad, or (report None) other shards' chunks of the lengths are not done
    yet (`measure`'s ``shard``; the lengths go to `lengths_dir(out)`)."""
    if row_len < measure_kw["seq_len"]:
        raise UserError(f"row_len={row_len} must be >= seq_len={measure_kw['seq_len']} (a row holds whole samples)")
    binpack.validate_method(method)
    tokenizer = pipeline.load_tokenizer(tokenizer)
    measured = measure(sources_cfg, tokenizer, chunks_dir=lengths_dir(out), **measure_kw)
    if measured is None:
        return None, None
    report, settings = measured.report, measured.settings
    if not report.ok or not report.usable:
        return report, None
    max_patches = settings.get("max_patches_per_row", 0)
    rows, method = binpack.pack(measured.lengths, measured.images, row_len=row_len,
                                max_images=settings["max_images_per_row"], method=method,
                                patches=measured.patches if max_patches else None, max_patches=max_patches)
    real = int(measured.lengths.sum())
    utilisation, padded = real / (len(rows) * row_len), check.llava_padding(report)
    report.utilisation.update({f"plan ({method}, rows of {row_len})": utilisation, "padding (LLaVA)": padded})
    if max_patches:
        report.utilisation[f"plan's patches ({max_patches} per row)"] = float(measured.patches.sum()) / (
            len(rows) * max_patches)
    manifest = {
        "version": VERSION, "sources": [source_entry(s) for s in measured.specs],
        "tokenizer": tokenizer_fingerprint(tokenizer), **settings, "row_len": row_len, "method": method,
        "counts": {"records": report.records, "usable": report.usable, "skipped": report.skipped,
                   "real_tokens": real, "slots": len(rows) * row_len},
        "utilisation": utilisation, "llava_padded_utilisation": padded,
    }
    return report, write_plan(out, measured, rows, seed=settings["seed"], manifest=manifest)


def padding_ratio(utilisation: float, padded_utilisation: float) -> float:
    """How many times less padding than LLaVA's length-grouped batches (padding slots over padding slots)."""
    return (1 - padded_utilisation) / max(1 - utilisation, 1e-9)


def open_plan(
    plan: str,
    specs: Sequence[sources.SourceSpec],
    tokenizer: Any,
    *,
    seq_len: int,
    num_image_tokens: int,
    max_images_per_row: int,
    truncate: bool = True,
    native: native_lib.NativeSpec | None = None,
    max_patches_per_row: int = 0,
) -> dict[str, Any]:
    """The plan's manifest, after checking it matches this run; a UserError names any mismatch."""
    path = manifest_path(plan)
    if not (storage.as_path(plan).is_file() and storage.as_path(path).is_file()):
        raise UserError(f"data.plan={plan}: no plan there (needs {plan} and {path}; "
                        "write one with python -m allava_jax.data plan ... --out PLAN)")
    manifest = json.loads(storage.as_path(path).read_text())
    redo = " Rebuild it with python -m allava_jax.data plan for these sources and settings."
    if manifest.get("version") != VERSION:
        raise UserError(f"plan {plan}: version {manifest.get('version')}, this code reads {VERSION}." + redo)
    for key, want in (("seq_len", seq_len), ("num_image_tokens", num_image_tokens), ("truncate", truncate)):
        if manifest[key] != want:
            raise UserError(f"plan {plan}: made with {key}={manifest[key]}, this run has {key}={want}." + redo)
    want_native = dataclasses.asdict(native) if native is not None else None
    if manifest.get("native") != want_native:
        raise UserError(f"plan {plan}: made for native-resolution images {manifest.get('native')}, this run has "
                        f"{want_native}." + redo)
    if native is not None and manifest["max_patches_per_row"] > max_patches_per_row:
        raise UserError(f"plan {plan}: rows hold up to {manifest['max_patches_per_row']} patches, this run has "
                        f"max_patches_per_row={max_patches_per_row}." + redo)
    if manifest["max_images_per_row"] > max_images_per_row:
        raise UserError(f"plan {plan}: rows hold up to {manifest['max_images_per_row']} images, this run has "
                        f"max_images_per_row={max_images_per_row}." + redo)
    planned, configured = manifest["sources"], [source_entry(s) for s in specs]
    if len(planned) != len(configured):
        raise UserError(f"plan {plan}: made for {len(planned)} sources "
                        f"({', '.join(s['path'] for s in planned)}), this run has {len(configured)}." + redo)
    for i, (p, c) in enumerate(zip(planned, configured)):
        for key in _SOURCE_FIELDS:
            if p[key] != c[key]:
                raise UserError(f"plan {plan}: source {i} ({c['path']}): {key} is {c[key]!r} now, "
                                f"{p[key]!r} in the plan (a changed source or config)." + redo)
    if manifest["tokenizer"] != tokenizer_fingerprint(tokenizer):
        raise UserError(f"plan {plan}: made with another tokenizer (lengths would differ); plan with the "
                        "run's tokenizer." + redo)
    return manifest
