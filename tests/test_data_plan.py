"""Offline packing: `plan` lengths and rows, and the pipeline that trains on a plan."""

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from allava_jax.data import binpack, images as images_lib, pipeline, plan as plan_lib, templates
from allava_jax.data.__main__ import main as data_main
from allava_jax.errors import UserError
from data_fixtures import image_bytes, make_bpe_tokenizer, make_tokenizer, write_dataset
from test_data_pipeline import _segments, _write_bad_dataset

SEQ, ROW, NIMG, SIZE, M = 96, 160, 8, 32, 3


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A dataset, its tokenizer directory, and a plan of it made through the CLI."""
    root = tmp_path_factory.mktemp("plan")
    path, _ = write_dataset(str(root), n_image=40, n_text=20, seed=1)
    tok_dir = str(root / "tok")
    make_tokenizer().save_pretrained(tok_dir)
    out = str(root / "plans" / "p.plan")
    assert _plan_cli(path, str(root), tok_dir, out, str(root / "cache")) == 0
    return {"root": str(root), "path": path, "tok_dir": tok_dir, "plan": out, "cache": str(root / "cache")}


def _plan_cli(data_arg, root, tok_dir, out, cache, *extra):
    return data_main(["plan", "--data", data_arg, "--image-root", root, "--tokenizer", tok_dir,
                      "--seq-len", str(SEQ), "--row-len", str(ROW), "--num-image-tokens", str(NIMG),
                      "--max-images", str(M), "--out", out, "--cache-dir", cache, *extra])


def _kw(tok, data, **over):
    kw = dict(seq_len=SEQ, batch_size=4, image_token_id=tok.convert_tokens_to_ids("<image>"), image_size=SIZE,
              num_image_tokens=NIMG, max_images_per_row=M, seed=0, shard_index=0, shard_count=1,
              keep_meta=True, cache_dir=data["cache"], read_threads=2, packing_method="offline", plan=data["plan"])
    kw.update(over)
    return kw


def _srcs(data):
    return [{"path": data["path"], "image_root": data["root"]}]


def _offline_epoch(tok, data, srcs=None, **over):
    it = pipeline.make_pipeline(srcs or _srcs(data), tok, **_kw(tok, data, num_epochs=1, drop_remainder=False, **over))
    return list(it), it


def _plan_members(plan):
    from array_record.python import array_record_module

    reader = array_record_module.ArrayRecordReader(plan)
    rows = [np.frombuffer(r, np.int64).reshape(-1, 4) for r in reader.read_all()]
    reader.close()
    return rows


def test_plan_rows_keep_the_batch_contract_and_every_sample_once(tok, data):
    batches, it = _offline_epoch(tok, data)
    records = json.load(open(data["path"]))
    image_id = tok.convert_tokens_to_ids("<image>")
    seen = {}
    for batch in batches:
        B = len(batch["tokens"])
        assert set(batch) == set(pipeline.BATCH_KEYS) | {"sample"}
        for k in ("tokens", "targets", "segment_ids", "positions"):
            assert batch[k].shape == (B, ROW) and batch[k].dtype == np.int32
        assert batch["images"].shape == (B, M, SIZE, SIZE, 3) and batch["images"].dtype == np.float32
        for b in range(B):
            seg = batch["segment_ids"][b]
            n = int((seg > 0).sum())
            assert (seg[:n] > 0).all() and (seg[n:] == 0).all() and set(np.diff(seg[:n])) <= {0, 1}
            assert not batch["loss_mask"][b, n:].any() and not batch["tokens"][b, n:].any()
            mask = batch["image_mask"][b]
            assert mask[: mask.sum()].all() and (batch["tokens"][b] == image_id).sum() == NIMG * mask.sum()
        slot = {}
        for b, sl, key, idx in _segments(batch):
            toks = batch["tokens"][b, sl]
            np.testing.assert_array_equal(batch["positions"][b, sl], np.arange(len(idx)))
            np.testing.assert_array_equal(batch["targets"][b, idx[:-1]], toks[1:])
            assert not batch["loss_mask"][b, idx[-1]] and (batch["sample"][b, sl] == key).all()
            assert key not in seen, "a sample appears twice"
            seen[key] = toks
            for p in templates.image_paths(records[key - 1]):  # images in placeholder order
                want = images_lib.normalize(images_lib.load_image(open(os.path.join(data["root"], p), "rb").read(), SIZE))
                np.testing.assert_allclose(batch["images"][b, slot.setdefault(b, 0)], want, atol=1e-6)
                slot[b] += 1
        assert sum(slot.values()) == batch["image_mask"].sum()
    assert sorted(seen) == list(range(1, len(records) + 1))
    for key, toks in seen.items():
        record = records[key - 1]
        want = templates.encode_record(record, tok, template="allava", num_images=len(templates.image_paths(record)),
                                       seq_len=SEQ, eos_id=tok.eos_token_id, image_token_id=image_id, num_image_tokens=NIMG)
        np.testing.assert_array_equal(toks, want["tokens"])
    st = it.stats()
    manifest = json.load(open(plan_lib.manifest_path(data["plan"])))
    assert st["samples"] == 60 and st["skipped_total"] == 0
    assert st["packing_utilisation"] == pytest.approx(manifest["utilisation"]) and manifest["utilisation"] > 0.9


def test_plan_lengths_equal_the_online_pipeline(tok, data):
    it = pipeline.make_pipeline(_srcs(data), tok, **_kw(tok, data, packing_method="best_fit", plan=None,
                                                         num_epochs=1, drop_remainder=False))
    online = {key: len(idx) for batch in it for _, _, key, idx in _segments(batch)}
    planned = {int(s) * (1 << 40) + int(i) + 1: int(n) for row in _plan_members(data["plan"]) for s, i, n, _ in row}
    assert len(online) == 60 and planned == online
    short = str(os.path.join(data["root"], "truncating.plan"))  # seq_len 40 truncates or skips (too_long) samples
    rc = data_main(["plan", "--data", data["path"], "--tokenizer", data["tok_dir"], "--seq-len", "40",
                    "--num-image-tokens", str(NIMG), "--max-images", str(M), "--out", short,
                    "--cache-dir", data["cache"], "--max-bad-fraction", "0.5"])
    assert rc == 0
    it = pipeline.make_pipeline(_srcs(data), tok, **_kw(tok, data, seq_len=40, packing_method="best_fit", plan=None,
                                                         num_epochs=1, drop_remainder=False, max_bad_fraction=0.5))
    online = {key: len(idx) for batch in it for _, _, key, idx in _segments(batch)}
    planned = {int(s) * (1 << 40) + int(i) + 1: int(n) for row in _plan_members(short) for s, i, n, _ in row}
    assert planned == online and max(online.values()) == 40
    skipped = json.load(open(plan_lib.manifest_path(short)))["counts"]["skipped"]
    assert skipped == {"too_long": it.stats()["skipped"]["too_long"]} and skipped["too_long"] > 0


def assert_resumes_exactly(make_iterator, before: int, after: int) -> list:
    """Takes `before` batches, saves the state, takes `after` more; a fresh iterator restored to
    that state gives the same `after` batches. Returns every batch taken."""
    it = make_iterator()
    first = [next(it) for _ in range(before)]
    state = it.get_state()
    json.dumps(state)  # must be checkpointable as JSON (grain.checkpoint / orbax)
    expected = [next(it) for _ in range(after)]
    it.close()
    fresh = make_iterator()
    fresh.set_state(state)
    for e in expected:
        g = next(fresh)
        for k in e:
            np.testing.assert_array_equal(e[k], g[k], err_msg=k)
    fresh.close()
    return first + expected


def test_offline_resume_gives_the_same_remaining_stream(tok, data):
    assert len(_plan_members(data["plan"])) < 7 * 4  # the 7 batches below cross into epoch 2
    assert_resumes_exactly(lambda: pipeline.make_pipeline(_srcs(data), tok, **_kw(tok, data, seed=7)), 2, 5)
    # grain worker processes (worker_count > 0) get the row builder pickled: it must survive that.
    kw = {k: v for k, v in _kw(tok, data).items() if k in ("seq_len", "image_size", "num_image_tokens", "image_token_id")}
    rows = pipeline._offline_rows(_srcs(data), tok, data["plan"], chat_template="allava", seed=0, shard_index=0,
                                  shard_count=1, num_epochs=1, cache_dir=data["cache"], keep_meta=True,
                                  max_images_per_sample=M, truncate=True, **kw)
    for k, v in rows[3].items():
        np.testing.assert_equal(pickle.loads(pickle.dumps(rows))[3][k], v, err_msg=k)


def test_epochs_reshuffle_rows_deterministically(tok, data):
    def keys(seed):
        it = pipeline.make_pipeline(_srcs(data), tok, **_kw(tok, data, seed=seed, num_epochs=2, batch_size=1))
        return [tuple(sorted({k for _, _, k, _ in _segments(b)})) for b in it]

    a, b, other = keys(3), keys(3), keys(4)
    rows = len(_plan_members(data["plan"]))
    assert a == b and a != other and len(a) == 2 * rows
    assert sorted(a[:rows]) == sorted(a[rows:]) and a[:rows] != a[rows:]  # same rows, new order


def test_two_hosts_disjoint_and_cover_the_epoch(tok, data):
    keys = []
    for host in range(2):
        batches, _ = _offline_epoch(tok, data, shard_index=host, shard_count=2)
        keys.append({k for batch in batches for _, _, k, _ in _segments(batch)})
    assert keys[0] and keys[1] and not keys[0] & keys[1]
    assert keys[0] | keys[1] == set(range(1, 61))


def test_a_mismatched_plan_is_a_clear_error(tok, data, tmp_path):
    srcs = _srcs(data)
    for over, match in [
        (dict(seq_len=SEQ + 1), "seq_len=96"),
        (dict(num_image_tokens=NIMG * 2), "num_image_tokens"),
        (dict(max_images_per_row=M - 1), "max_images_per_row"),
        (dict(plan=str(tmp_path / "none.plan")), "no plan there"),
        (dict(plan=None), "needs data.plan"),
    ]:
        with pytest.raises(UserError, match=match):
            pipeline.make_pipeline(srcs, tok, **_kw(tok, data, **over))
    with pytest.raises(UserError, match="another tokenizer"):
        pipeline.make_pipeline(srcs, make_bpe_tokenizer(), **_kw(tok, data))
    with pytest.raises(UserError, match="copies"):
        pipeline.make_pipeline([{**srcs[0], "copies": 2}], tok, **_kw(tok, data))
    with pytest.raises(UserError, match="made for 1 sources"):
        pipeline.make_pipeline(srcs * 2, tok, **_kw(tok, data))
    with pytest.raises(UserError, match="too few for data shard"):
        pipeline.make_pipeline(srcs, tok, **_kw(tok, data, shard_index=99, shard_count=100))
    changed = str(tmp_path / "changed.json")
    records = json.load(open(data["path"]))
    json.dump(records, open(changed, "w"))
    plan = str(tmp_path / "changed.plan")
    assert _plan_cli(changed, data["root"], data["tok_dir"], plan, data["cache"]) == 0
    json.dump(records[:-1], open(changed, "w"))
    with pytest.raises(UserError, match=r"source 0 \(.*changed.json\): size"):
        pipeline.make_pipeline([{"path": changed, "image_root": data["root"]}], tok, **_kw(tok, data, plan=plan))


def test_shards_measure_their_chunks_and_the_last_one_writes_the_same_plan(data, tmp_path, capsys):
    out = str(tmp_path / "sharded.plan")
    shard = ["--num-shards", "2", "--chunk-size", "16"]  # 60 records: chunks 0, 2 and 1, 3
    assert _plan_cli(data["path"], data["root"], data["tok_dir"], out, data["cache"], *shard, "--shard-index", "0") == 0
    chunks = Path(plan_lib.lengths_dir(out))
    assert sorted(p.name for p in chunks.glob("*.npz")) == ["000000.npz", "000002.npz"]
    assert not os.path.exists(out) and "other shards' chunks are not done yet" in capsys.readouterr().out
    assert _plan_cli(data["path"], data["root"], data["tok_dir"], out, data["cache"], *shard, "--shard-index", "1") == 0
    assert [m.tolist() for m in _plan_members(out)] == [m.tolist() for m in _plan_members(data["plan"])]
    one, two = (json.load(open(plan_lib.manifest_path(p))) for p in (data["plan"], out))
    assert two == one

    stamps = {p.name: p.stat().st_mtime_ns for p in chunks.glob("*.npz")}
    os.remove(out)  # a rerun (after a kill, or with another row length) reads the chunks back
    assert _plan_cli(data["path"], data["root"], data["tok_dir"], out, data["cache"], *shard, "--shard-index", "0") == 0
    assert {p.name: p.stat().st_mtime_ns for p in chunks.glob("*.npz")} == stamps
    assert [m.tolist() for m in _plan_members(out)] == [m.tolist() for m in _plan_members(data["plan"])]

    capsys.readouterr()  # lengths of other settings are refused, with what to do
    assert _plan_cli(data["path"], data["root"], data["tok_dir"], out, data["cache"], *shard, "--shard-index", "0",
                     "--seed", "1") == 2
    assert f"rm -r {chunks}" in capsys.readouterr().err


def test_bad_records_skipped_at_plan_time_and_bad_images_at_build_time(tok, tmp_path, capsys):
    root = str(tmp_path / "data")
    os.makedirs(root)
    path, jsonl, expected = _write_bad_dataset(root)
    tok_dir = str(tmp_path / "tok")
    tok.save_pretrained(tok_dir)
    cache, out = str(tmp_path / "cache"), str(tmp_path / "bad.plan")
    common = ["plan", "--data", path, "--data", jsonl, "--image-root", root, "--tokenizer", tok_dir, "--seq-len", str(SEQ),
              "--num-image-tokens", str(NIMG), "--max-images", str(M), "--out", out, "--cache-dir", cache,
              "--chunk-size", "5"]  # skip counts merged over 10 chunks of lengths
    assert data_main(common) == 1 and not os.path.exists(out)  # 14 of 46 bad: above 5 %
    assert "no plan written" in capsys.readouterr().out
    assert data_main(common + ["--max-bad-fraction", "0.5"]) == 0
    image_reasons = {"missing_image", "corrupt_image", "empty_image", "image_too_large", "image_path_escapes"}
    manifest = json.load(open(plan_lib.manifest_path(out)))
    assert manifest["counts"]["skipped"] == {r: n for r, n in expected.items() if n and r not in image_reasons}
    srcs = [{"path": path, "image_root": root}, {"path": jsonl}]
    data = {"plan": out, "cache": cache}
    batches, it = _offline_epoch(tok, data, srcs, max_bad_fraction=0.5, min_samples_for_bad_check=20)
    st = it.stats()  # the image failures, found while building rows, dropped from them
    assert st["skipped"] == {r: (expected[r] if r in image_reasons else 0) for r in expected}
    assert st["samples"] == 32 == sum(len(list(_segments(b))) for b in batches)


def test_a_member_whose_image_broke_after_planning_is_dropped(tok, data, tmp_path):
    records = json.load(open(data["path"]))
    broken = os.path.join(data["root"], records[0]["image"])
    good = open(broken, "rb").read()
    try:
        open(broken, "wb").write(image_bytes(40, 40)[:300])  # truncated JPEG
        batches, it = _offline_epoch(tok, data)
    finally:
        open(broken, "wb").write(good)
    keys = {k for b in batches for _, _, k, _ in _segments(b)}
    assert keys == set(range(2, 61)) and it.stats()["skipped"]["corrupt_image"] == 1


def test_packers_fill_rows_within_limits():
    rng = np.random.default_rng(0)
    lengths, images = rng.integers(1, 200, 3000), rng.integers(0, 3, 3000)
    found = {}
    for method, fn in binpack.METHODS.items():
        for imgs in (images, np.zeros_like(images)):
            rows = fn(lengths, imgs, row_len=256, max_images=4)
            assert sorted(i for r in rows for i in r) == list(range(3000)), method
            assert max(lengths[r].sum() for r in rows) <= 256 and max(imgs[r].sum() for r in rows) <= 4, method
            found[method, imgs is images] = binpack.utilisation(rows, lengths, 256)
    # bound: sum(lengths) / 256 = 1197.6 rows; without the image limit both need 1198
    assert found["bfd", False] == found["bucket", False] == lengths.sum() / (1198 * 256)
    assert found["bfd", True] > 0.94 and found["bucket", True] > 0.91  # 4 images a row bind here
    rows, method = binpack.pack(lengths, images, row_len=256, max_images=4)
    assert method == "bfd" and binpack.utilisation(rows, lengths, 256) == found["bfd", True]
    with pytest.raises(UserError, match="image slots"):
        binpack.best_fit_decreasing([5], [5], row_len=8, max_images=4)
    with pytest.raises(UserError, match="row_len=8"):
        binpack.bucket([9], [0], row_len=8, max_images=4)
