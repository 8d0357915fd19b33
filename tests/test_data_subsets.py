"""Per-record subsets and weights on a source (what `curate balance` writes)."""

import json
from collections import Counter

import numpy as np
import pytest

from allava_jax.data import check, pipeline, plan as plan_lib, sources
from allava_jax.data.__main__ import main as data_main
from allava_jax.errors import UserError
from data_fixtures import make_tokenizer, write_dataset
from test_data_pipeline import _segments
from test_data_plan import _plan_members, assert_resumes_exactly

SEQ, NIMG, SIZE, M = 96, 8, 32, 3


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("subsets")
    a, _ = write_dataset(str(root), n_image=10, n_text=10, seed=5, name="a.json")  # 20 records
    b, _ = write_dataset(str(root), n_image=0, n_text=8, seed=6, name="b.json")
    return {"root": str(root), "a": a, "b": b, "cache": str(root / "cache")}


def _npy(data, name, arr):
    path = f"{data['root']}/{name}.npy"
    np.save(path, arr)
    return path


def _keys(srcs, data, seed=0):
    specs = sources.parse_sources(srcs)
    return plan_lib.epoch_keys(specs, seed=seed, cache_dir=data["cache"])


def _draws(data, weights_path, num_samples, seed, epochs):
    """One weighted source's record indices, epoch after epoch, as the pipeline indexes them."""
    specs = sources.parse_sources([{"path": data["a"], "weights": weights_path, "num_samples": num_samples}])
    mix = sources.mixture(specs, seed=seed, cache_dir=data["cache"], keys_only=True)
    return np.array([mix[i]["index"] for i in range(epochs * len(mix))]).reshape(epochs, -1)


def test_subset_restricts_the_source_in_order(data, tok):
    subset = _npy(data, "sub", np.array([7, 3, 19, 0], np.int64))
    keys = _keys([{"path": data["a"], "subset": subset}, {"path": data["b"]}], data)
    assert keys[:4].tolist() == [[0, 7], [0, 3], [0, 19], [0, 0]] and keys[4:, 0].tolist() == [1] * 8
    srcs = [{"path": data["a"], "image_root": data["root"], "subset": subset, "copies": 2}]
    it = pipeline.make_pipeline(srcs, tok, seq_len=SEQ, batch_size=2, image_token_id=tok.convert_tokens_to_ids("<image>"),
                                image_size=SIZE, num_image_tokens=NIMG, max_images_per_row=M, num_epochs=1,
                                drop_remainder=False, keep_meta=True, cache_dir=data["cache"], shard_index=0, shard_count=1)
    seen = Counter(k for batch in it for _, _, k, _ in _segments(batch))
    assert seen == {8: 2, 4: 2, 20: 2, 1: 2}  # sample key = record index + 1, twice (copies)
    report = check.run_check([{"path": data["a"], "image_root": data["root"], "subset": subset}], tok, seq_len=SEQ,
                             image_size=SIZE, num_image_tokens=NIMG, cache_dir=data["cache"])
    assert report.records == report.usable == 4


def test_plan_honours_the_subset(data, tmp_path):
    subset = _npy(data, "plan_sub", np.array([2, 11, 5], np.int64))
    tok_dir = str(tmp_path / "tok")
    make_tokenizer().save_pretrained(tok_dir)
    out = str(tmp_path / "s.plan")
    src = json.dumps({"path": data["a"], "subset": subset})
    assert data_main(["plan", "--data", src, "--tokenizer", tok_dir, "--seq-len", str(SEQ), "--num-image-tokens",
                      str(NIMG), "--max-images", str(M), "--out", out, "--cache-dir", data["cache"]]) == 0
    assert sorted(int(i) for row in _plan_members(out) for _, i, _, _ in row) == [2, 5, 11]
    assert json.load(open(plan_lib.manifest_path(out)))["sources"][0]["subset"]["realpath"].endswith("plan_sub.npy")
    np.save(subset, np.array([2, 11], np.int64))  # the subset changed: the plan no longer matches
    specs = sources.parse_sources([{"path": data["a"], "subset": subset}])
    with pytest.raises(UserError, match="subset"):
        plan_lib.open_plan(out, specs, make_tokenizer(), seq_len=SEQ, num_image_tokens=NIMG, max_images_per_row=M)
    weighted = json.dumps({"path": data["a"], "weights": _npy(data, "pw", np.ones(20, np.float32))})
    assert data_main(["plan", "--data", weighted, "--tokenizer", tok_dir, "--out", out]) == 2  # a UserError


def test_weighted_draws_are_seeded_per_epoch(data):
    w = _npy(data, "w", np.arange(20, dtype=np.float32))
    a, b, c = (_draws(data, w, 50, seed, epochs=2) for seed in (1, 1, 2))
    np.testing.assert_array_equal(a, b)
    assert (a != c).any() and (a[0] != a[1]).any()  # another seed, another epoch: another draw
    assert not (a == 0).any()  # record 0 has weight 0


def test_weighted_draw_frequencies_match_the_weights(data):
    weights = np.array([0, 1, 2, 3, 4, 0, 10, 0.5] + [0] * 12, np.float32)
    n = 20_000
    counts = np.bincount(_draws(data, _npy(data, "wf", weights), n, seed=0, epochs=1)[0], minlength=20)
    p = weights / weights.sum()
    # Tolerance: each count is Binomial(n, p); 4.5 standard deviations (a false alarm ~1e-5 per record).
    np.testing.assert_array_less(np.abs(counts - n * p), 4.5 * np.sqrt(n * p * (1 - p)) + 1e-9)
    assert counts[weights == 0].sum() == 0


def test_weighted_source_splits_across_hosts_and_resumes(data, tok):
    w = _npy(data, "wh", np.linspace(0.1, 1, 20).astype(np.float32))
    specs = sources.parse_sources([{"path": data["a"], "weights": w, "num_samples": 30}, {"path": data["b"]}])
    epoch = sorted(map(tuple, plan_lib.epoch_keys(specs, seed=3, cache_dir=data["cache"]).tolist()))
    hosts = [sources.mixture(specs, seed=3, cache_dir=data["cache"], keys_only=True)[h::2] for h in range(2)]
    split = sorted((e["source"], e["index"]) for ds in hosts for e in (ds[i] for i in range(len(ds))))
    assert split == epoch and len(epoch) == 38
    srcs = [{"path": data["a"], "image_root": data["root"], "weights": w, "num_samples": 30}]
    kw = dict(seq_len=SEQ, batch_size=2, image_token_id=tok.convert_tokens_to_ids("<image>"), image_size=SIZE,
              num_image_tokens=NIMG, max_images_per_row=M, seed=5, cache_dir=data["cache"], shard_index=0,
              shard_count=1, read_threads=2, keep_meta=True)
    taken = assert_resumes_exactly(lambda: pipeline.make_pipeline(srcs, tok, **kw), 3, 12)
    assert sum(len(list(_segments(b))) for b in taken) > 30  # into the second epoch's draw


@pytest.mark.parametrize("spec, arr, match", [
    ({"subset": "s"}, np.array([0, 20]), r"s\.npy: index 20 \(entry 1\) is out of range"),
    ({"subset": "s"}, np.array([-1]), r"s\.npy: index -1"),
    ({"subset": "s"}, np.array([3, 3]), r"s\.npy: repeats record indices"),
    ({"subset": "s"}, np.array([0.5]), r"s\.npy: needs integer record indices"),
    ({"weights": "w"}, np.ones(19), r"w\.npy: has 19 weights for a source of 20 records"),
    ({"weights": "w"}, np.r_[np.ones(19), -1.0], r"w\.npy: weight -1.0 at record 19"),
    ({"weights": "w"}, np.r_[np.ones(19), np.nan], r"w\.npy: weight nan at record 19"),
    ({"weights": "w"}, np.zeros(20), r"w\.npy: all weights are zero"),
    ({"weights": "w"}, np.ones((20, 2)), r"w\.npy: needs a 1-D array"),
])
def test_bad_subset_or_weights_files_are_clear_errors(data, spec, arr, match):
    key, name = next(iter(spec.items()))
    src = {"path": data["a"], key: _npy(data, name, arr)}
    with pytest.raises(UserError, match=match):
        _keys([src], data)


def test_bad_subset_and_weights_specs_are_clear_errors(data):
    s, w = _npy(data, "ok_s", np.array([1])), _npy(data, "ok_w", np.ones(20))
    for src, match in [
        ({"subset": s, "weights": w}, "either 'subset' or 'weights'"),
        ({"subset": s, "num_samples": 5}, "num_samples=5 needs 'weights'"),
        ({"weights": w, "num_samples": 0}, "must be > 0"),
        ({"subset": f"{data['root']}/missing.npy"}, "missing.npy: cannot read it"),
    ]:
        with pytest.raises(UserError, match=match):
            _keys([{"path": data["a"], **src}], data)
