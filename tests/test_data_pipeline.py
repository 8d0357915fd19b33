"""The grain pipeline end to end: batch contract, exactly-once, resume, hosts, bad inputs, mesh."""

import json
import logging
import os

import jax
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec

from allava_jax.data import images as images_lib
from allava_jax.data import pipeline, quality, sources, templates
from allava_jax.data.__main__ import main as data_main
from data_fixtures import image_bytes, make_tokenizer, write_dataset

SEQ, NIMG, SIZE, M = 96, 8, 32, 3
KEY = 1 << 40  # ExampleBuilder's source stride


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def ds_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("allava")
    path, _ = write_dataset(str(root), n_image=40, n_text=20, seed=1)
    return str(root), path


def _kw(tok, tmp_cache, **over):
    kw = dict(seq_len=SEQ, batch_size=4, image_token_id=tok.convert_tokens_to_ids("<image>"),
              image_size=SIZE, num_image_tokens=NIMG, max_images_per_row=M, seed=0,
              shard_index=0, shard_count=1, keep_meta=True, cache_dir=tmp_cache, read_threads=2)
    kw.update(over)
    return kw


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("index_cache"))


def _epoch(srcs, tok, cache, **over):
    it = pipeline.make_pipeline(srcs, tok, **_kw(tok, cache, num_epochs=1, drop_remainder=False, **over))
    batches = list(it)
    return batches, it


def _segments(batch):
    """Yields (row, segment slice, sample key) for every packed segment."""
    for b in range(batch["tokens"].shape[0]):
        seg = batch["segment_ids"][b]
        for s in range(1, seg.max() + 1):
            idx = np.nonzero(seg == s)[0]
            yield b, slice(idx[0], idx[-1] + 1), int(batch["sample"][b, idx[0]]), idx


def test_batch_contract_and_every_token_once(ds_dir, tok, cache):
    root, path = ds_dir
    batches, it = _epoch([{"path": path, "image_root": root}], tok, cache)
    image_id = tok.convert_tokens_to_ids("<image>")
    records = json.load(open(path))
    seen = {}
    for batch in batches:
        B = batch["tokens"].shape[0]
        assert set(batch) == set(pipeline.BATCH_KEYS) | {"sample"}
        assert batch["images"].shape == (B, M, SIZE, SIZE, 3) and batch["images"].dtype == np.float32
        for k in ("tokens", "targets", "segment_ids", "positions"):
            assert batch[k].shape == (B, SEQ) and batch[k].dtype == np.int32
        assert batch["loss_mask"].dtype == bool and batch["image_mask"].shape == (B, M)
        for b in range(B):
            seg = batch["segment_ids"][b]
            n_real = int((seg > 0).sum())
            # segments are contiguous 1..k, padding (0) only at the end
            assert (seg[:n_real] > 0).all() and (seg[n_real:] == 0).all()
            assert (np.diff(seg[:n_real]) >= 0).all() and (np.diff(seg[:n_real]) <= 1).all()
            assert not batch["loss_mask"][b, n_real:].any()
            n_img_tokens = int((batch["tokens"][b] == image_id).sum())
            assert n_img_tokens == NIMG * batch["image_mask"][b].sum()
            # image_mask is a prefix: real slots first
            mask = batch["image_mask"][b]
            assert (mask[: mask.sum()]).all()
            slot = 0
            for s in range(1, seg.max() + 1):
                idx = np.nonzero(seg == s)[0]
                toks = batch["tokens"][b, idx]
                np.testing.assert_array_equal(batch["positions"][b, idx], np.arange(len(idx)))
                np.testing.assert_array_equal(batch["targets"][b, idx[:-1]], toks[1:])  # in-segment
                assert not batch["loss_mask"][b, idx[-1]]  # last token: no next token in-segment
                key = int(batch["sample"][b, idx[0]])
                assert (batch["sample"][b, idx] == key).all()
                assert key not in seen, "sample appears twice (or crosses rows)"
                seen[key] = toks
                # images: in placeholder order, equal to the preprocessed file
                record = records[key - 1]
                for p in templates.image_paths(record):
                    want = images_lib.normalize(images_lib.load_image(
                        open(os.path.join(root, p), "rb").read(), SIZE))
                    np.testing.assert_allclose(batch["images"][b, slot], want, atol=1e-6)
                    slot += 1
            assert slot == mask.sum()
    # every sample exactly once, with exactly its own tokens
    assert sorted(seen) == list(range(1, len(records) + 1))
    for key, toks in seen.items():
        record = records[key - 1]
        want = templates.encode_record(
            record, tok, template="allava", num_images=len(templates.image_paths(record)),
            seq_len=SEQ, eos_id=tok.eos_token_id, image_token_id=image_id, num_image_tokens=NIMG)
        np.testing.assert_array_equal(toks, want["tokens"])
    st = it.stats()
    assert st["samples"] == len(records) and st["skipped_total"] == 0
    assert 0.5 < st["packing_utilisation"] <= 1.0


def test_deterministic_for_a_seed(ds_dir, tok, cache):
    root, path = ds_dir
    srcs = [{"path": path, "image_root": root}]
    runs = [[next(it)["tokens"] for _ in range(3)] for it in (
        pipeline.make_pipeline(srcs, tok, **_kw(tok, cache, seed=s)) for s in (3, 3, 4))]
    for a, b in zip(runs[0], runs[1]):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(runs[0], runs[2]))


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_gives_the_same_remaining_stream(ds_dir, tok, cache, workers):
    root, path = ds_dir
    srcs = [{"path": path, "image_root": root}]
    kw = _kw(tok, cache, seed=7, worker_count=workers)
    it = pipeline.make_pipeline(srcs, tok, **kw)
    for _ in range(2):
        next(it)
    state = it.get_state()
    json.dumps(state)  # must be checkpointable as JSON (grain.checkpoint / orbax)
    expected = [next(it) for _ in range(3)]
    it.close()
    fresh = pipeline.make_pipeline(srcs, tok, **kw)
    fresh.set_state(state)
    got = [next(fresh) for _ in range(3)]
    fresh.close()
    for e, g in zip(expected, got):
        for k in e:
            np.testing.assert_array_equal(e[k], g[k], err_msg=k)
    # A state saved before the native-resolution skip reasons were appended (11 of them) resumes too.
    older = _with_shorter_skip_counts(state, 11)
    assert older != state
    fresh = pipeline.make_pipeline(srcs, tok, **kw)
    fresh.set_state(older)
    got = [next(fresh) for _ in range(3)]
    assert set(fresh.stats()["skipped"]) == set(quality.REASONS)
    fresh.close()
    for e, g in zip(expected, got):
        np.testing.assert_array_equal(e["tokens"], g["tokens"])


def _with_shorter_skip_counts(state, n):
    """``state`` with every per-reason count list cut to its first ``n`` reasons."""
    if isinstance(state, dict):
        return {k: v[:n] if k in ("skipped", "counts") and isinstance(v, list) and len(v) == len(quality.REASONS)
                else _with_shorter_skip_counts(v, n) for k, v in state.items()}
    if isinstance(state, list):
        return [_with_shorter_skip_counts(v, n) for v in state]
    return state


def test_two_hosts_disjoint_and_cover_the_epoch(ds_dir, tok, cache):
    root, path = ds_dir
    srcs = [{"path": path, "image_root": root}]
    keys = []
    for host in range(2):
        batches, _ = _epoch(srcs, tok, cache, shard_index=host, shard_count=2)
        keys.append({k for batch in batches for _, _, k, _ in _segments(batch)})
    assert keys[0] and keys[1] and not keys[0] & keys[1]
    assert keys[0] | keys[1] == set(range(1, 61))


def test_mixture_copies(tmp_path, tok, cache):
    a, _ = write_dataset(str(tmp_path), n_image=4, n_text=6, seed=2, name="a.json")
    b, _ = write_dataset(str(tmp_path), n_image=0, n_text=10, seed=3, name="b.json")
    srcs = [{"path": a, "image_root": str(tmp_path), "copies": 2}, {"path": b, "copies": 0.5}]
    batches, _ = _epoch(srcs, tok, cache)
    counts = {}
    for batch in batches:
        for _, _, k, _ in _segments(batch):
            counts[k] = counts.get(k, 0) + 1
    assert {k: n for k, n in counts.items() if k < KEY} == {i: 2 for i in range(1, 11)}
    b_keys = [k for k in counts if k > KEY]
    assert len(b_keys) == 5 and all(counts[k] == 1 for k in b_keys)


def _write_bad_dataset(root):
    """30 good records + one of every bad kind; returns (json path, expected counts)."""
    path, _ = write_dataset(root, n_image=20, n_text=10, seed=4, max_words=10, multi_turn=False)
    records = json.load(open(path))
    img = os.path.join(root, "images")
    open(os.path.join(img, "corrupt.jpg"), "wb").write(b"\xff\xd8\xff garbage" * 10)
    open(os.path.join(img, "empty.jpg"), "wb").write(b"")
    open(os.path.join(img, "truncated.jpg"), "wb").write(image_bytes(64, 64, seed=9)[:400])
    from test_data_images import _png_with_size
    open(os.path.join(img, "bomb.png"), "wb").write(_png_with_size(30000, 30000))
    open(os.path.join(root, "..", "outside.jpg"), "wb").write(image_bytes(40, 40))

    def rec(rid, image=None, conv=None):
        r = {"id": rid, "conversations": conv if conv is not None else [
            {"from": "human", "value": ("<image>\n" if image else "") + "w1 w2"},
            {"from": "gpt", "value": "w3"}]}
        if image is not None:
            r["image"] = image
        return r

    long_q = " ".join(["w5"] * 120)
    records += [
        rec("bad-missing", "images/nope.jpg"),
        rec("bad-corrupt", "images/corrupt.jpg"),
        rec("bad-empty", "images/empty.jpg"),
        rec("bad-truncated", "images/truncated.jpg"),
        rec("bad-bomb", "images/bomb.png"),
        rec("bad-escape", "../outside.jpg"),
        {"id": "bad-noturns", "image": records[0]["image"]},
        rec("bad-misordered", conv=[{"from": "gpt", "value": "w1"}, {"from": "human", "value": "w2"}]),
        rec("bad-count", records[0]["image"], conv=[{"from": "human", "value": "w1"}, {"from": "gpt", "value": "w2"}]),
        rec("bad-empty-answer", conv=[{"from": "human", "value": "w1"}, {"from": "gpt", "value": ""}]),
        rec("bad-long-image", [records[0]["image"], records[1]["image"]], conv=[
            {"from": "human", "value": "<image> " + long_q + " <image>"}, {"from": "gpt", "value": "w1"}]),
        rec("bad-long-text", conv=[{"from": "human", "value": long_q}, {"from": "gpt", "value": "w1"}]),
        rec("bad-many-images", [records[0]["image"]] * 4, conv=[
            {"from": "human", "value": "<image>" * 4}, {"from": "gpt", "value": "w1"}]),
    ]
    json.dump(records, open(path, "w"))
    expected = {r: 0 for r in quality.REASONS}
    expected.update(missing_image=1, corrupt_image=2, empty_image=1, image_too_large=1,
                    image_path_escapes=1, bad_turns=2, image_count_mismatch=1, empty_answer=1,
                    too_long=2, too_many_images=1, bad_json=1)
    jsonl = os.path.join(root, "extra.jsonl")
    with open(jsonl, "w") as f:
        f.write(json.dumps(rec("j1")) + "\n{not json\n" + json.dumps(rec("j2")) + "\n")
    return path, jsonl, expected


def test_bad_inputs_are_skipped_and_counted(tmp_path, tok, cache, caplog):
    root = str(tmp_path / "data")
    os.makedirs(root)
    path, jsonl, expected = _write_bad_dataset(root)
    srcs = [{"path": path, "image_root": root}, {"path": jsonl}]
    with caplog.at_level(logging.WARNING, logger="allava_jax.data.quality"):
        batches, it = _epoch(srcs, tok, cache, max_bad_fraction=0.5, min_samples_for_bad_check=20)
    st = it.stats()
    assert st["skipped"] == expected
    assert st["samples"] == 32  # 30 good + 2 good JSONL lines
    assert sum(len(list(_segments(b))) for b in batches) == 32
    assert "id=bad-escape" in caplog.text and path in caplog.text and "image_path_escapes" in caplog.text
    assert f"file={jsonl}" in caplog.text and "bad_json" in caplog.text


def test_too_many_bad_samples_stop_with_a_clear_message(ds_dir, tok, cache, tmp_path):
    _, path = ds_dir
    srcs = [{"path": path, "image_root": str(tmp_path)}]  # wrong root: every image is missing
    it = pipeline.make_pipeline(srcs, tok, **_kw(tok, cache, min_samples_for_bad_check=20))
    with pytest.raises(quality.BadDataError, match="wrong image_root"):
        for _ in range(50):
            next(it)


def test_json_index_is_cached(tmp_path):
    path, _ = write_dataset(str(tmp_path), n_image=0, n_text=3, name="x.jsonl.json")
    cache_dir = str(tmp_path / "cache")
    first = sources.index_json(path, cache_dir)
    mtime = os.stat(first).st_mtime_ns
    assert sources.index_json(path, cache_dir) == first and os.stat(first).st_mtime_ns == mtime
    src = sources.open_source(sources.parse_sources([{"path": path}])[0], cache_dir)
    assert len(src) == 3 and json.loads(src[2])["idx"] == "txt-0-2"
    with open(path, "a") as f:
        f.write(" ")  # file changed -> re-indexed
    assert sources.index_json(path, cache_dir) != first


def test_tfds_prepared_source_equals_json(ds_dir, tok, cache, tmp_path):
    root, path = ds_dir
    rc = data_main(["prepare", "--data", path, "--image-root", root, "--out", str(tmp_path),
                    "--cache-dir", cache])
    assert rc == 0
    tfds_dir = str(tmp_path / "allava_records" / "1.0.0")
    kw = dict(seq_len=SEQ, image_size=SIZE, num_image_tokens=NIMG, image_token_id=5,
              num_epochs=1, shuffle=False, cache_dir=cache)

    def examples(srcs):
        return {tuple(x["tokens"]): x["images"] for x in pipeline.build_examples(srcs, tok, **kw)}

    from_json = examples([{"path": path, "image_root": root}])
    from_tfds = examples([{"path": tfds_dir}])
    assert len(from_json) == 60 and from_json.keys() == from_tfds.keys()
    for k in from_json:
        np.testing.assert_array_equal(from_json[k], from_tfds[k])


def test_to_global_batch_on_mesh(ds_dir, tok, cache):
    root, path = ds_dir
    it = pipeline.make_pipeline([{"path": path, "image_root": root}], tok,
                                **_kw(tok, cache, batch_size=8, keep_meta=False))
    batch = next(it)
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
    out = pipeline.to_global_batch(batch, mesh)
    for k, v in batch.items():
        assert out[k].shape == v.shape and out[k].dtype == v.dtype
        assert out[k].sharding.spec == PartitionSpec(("data", "fsdp"))
        np.testing.assert_array_equal(np.asarray(out[k]), v)
        assert out[k].addressable_shards[0].data.shape[0] == 2  # 8 rows over data*fsdp = 4


def test_check_command(ds_dir, tok, cache, tmp_path, capsys):
    root, path = ds_dir
    tok_dir = str(tmp_path / "tok")
    tok.save_pretrained(tok_dir)
    base = ["check", "--data", path, "--tokenizer", tok_dir, "--seq-len", str(SEQ),
            "--image-size", str(SIZE), "--num-image-tokens", str(NIMG), "--cache-dir", cache]
    assert data_main(base + ["--image-root", f"{path}={root}"]) == 0
    out = capsys.readouterr().out
    assert "records read: 60" in out and "usable:       60" in out and "best_fit" in out
    assert data_main(base + ["--image-root", str(tmp_path), "--no-decode"]) == 1
    out = capsys.readouterr().out
    assert "missing_image" in out and "img-1-0" in out and "wrong image_root" in out
