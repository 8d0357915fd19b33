"""CLIP scoring (SynthVLM): CLIPModel parity, CLIPScore against transformers, selection, resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from skimage.metrics import structural_similarity

import clip_fixtures as C
from allava_jax import checkpoints
from allava_jax.convert.__main__ import main as convert_main
from allava_jax.curate.__main__ import main as curate_main
from allava_jax.data.__main__ import main as data_main
from allava_jax.models.clip import ClipModel
from data_fixtures import make_tokenizer

LONG = " ".join(["a very long caption about the red bike and the wall"] * 12)  # > 77 tokens
CAPTIONS = ["a red bike by a white wall", "two cats on a sofa", LONG, "the sea at dusk"]


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """(HF directory, torch model, tokenizer, our scorer checkpoint)."""
    root = tmp_path_factory.mktemp("clip")
    src, model, tok = C.clip_dir(root / "hf")
    assert convert_main(["import", "--clip", str(src), "--out", str(root / "scorer"), "--no-progress"]) == 0
    return src, model, tok, root / "scorer"


def _torch_embeds(model, processor, texts, images):
    """transformers' own procedure: CLIPProcessor, then CLIPModel's projections, L2-normalised."""
    enc = processor(text=texts, images=images, return_tensors="pt", padding=True, truncation=True, max_length=77)
    with torch.no_grad():
        out = model(**enc)
    return out.text_embeds.numpy(), out.image_embeds.numpy(), out.logits_per_image.numpy(), enc


def test_clip_model_parity_with_transformers(clip):
    src, model, _, ckpt = clip
    processor = transformers.CLIPProcessor.from_pretrained(src)
    images = [C.picture(i) for i in range(3)]
    texts, imgs, logits, enc = _torch_embeds(model, processor, CAPTIONS, images)
    config, params = checkpoints.load_clip_config(ckpt), checkpoints.load_params(ckpt)
    ours = ClipModel(config).apply({"params": params}, enc["input_ids"].numpy().astype(np.int32),
                                   enc["attention_mask"].numpy().astype(np.int32),
                                   enc["pixel_values"].numpy().transpose(0, 2, 3, 1))
    assert enc["input_ids"].shape[1] == 77  # the long caption was cut at CLIP's context
    np.testing.assert_allclose(ours["text_embeds"], texts, atol=1e-4)
    np.testing.assert_allclose(ours["image_embeds"], imgs, atol=1e-4)
    np.testing.assert_allclose(ours["logits_per_image"], logits, rtol=1e-4, atol=1e-4)


def _write_pairs(root, n_images: int = 3, bad: bool = True):
    """ALLaVA-format records, ``n_images`` per caption (``caption_id`` as synth images writes),
    plus a corrupt image and a record without a caption."""
    (root / "img").mkdir(parents=True, exist_ok=True)
    records = []
    for c, caption in enumerate(CAPTIONS):
        for k in range(n_images):
            name = f"img/c{c}_{k}.png"
            C.picture(10 * c + k, size=(40 + 8 * k, 48)).save(root / name)
            records.append({"id": f"c{c}_{k}", "image": name, "caption_id": f"c{c}",
                            "conversations": [{"from": "human", "value": "<image>\nDescribe the image."},
                                              {"from": "gpt", "value": caption}]})
    if bad:
        (root / "img/broken.png").write_bytes(b"\x89PNG not really")
        records.append({"id": "broken", "image": "img/broken.png", "caption_id": "c9",
                        "conversations": [{"from": "human", "value": "<image>\nx"}, {"from": "gpt", "value": "y"}]})
        records.append({"id": "nocap", "image": "img/c0_0.png", "conversations": [{"from": "human", "value": "x"}]})
    path = root / "pairs.json"
    path.write_text(json.dumps(records))
    return path, records


def _reference_rows(model, processor, records, root):
    """CLIPScore = 2.5 * max(cos, 0) (Hessel et al.) and SynthVLM's round-trip SSIM, computed
    here with transformers and scikit-image, for every record with a usable image and caption."""
    rows = {}
    for r in records:
        caption = next((t["value"] for t in r["conversations"] if t["from"] == "gpt"), None)
        try:
            img = Image.open(root / r["image"]).convert("RGB")
        except OSError:
            continue
        if caption is None:
            continue
        text, image, _, _ = _torch_embeds(model, processor, ["A photo depicts " + caption], [img])
        gray = img.convert("L").resize((768, 768), Image.Resampling.BICUBIC)
        trip = gray.resize((336, 336), Image.Resampling.BICUBIC).resize((768, 768), Image.Resampling.BICUBIC)
        ssim = structural_similarity(np.asarray(gray), np.asarray(trip), data_range=255)
        cos = float((text * image).sum())
        rows[r["id"]] = {"cos": cos, "clipscore": 2.5 * max(cos, 0.0), "ssim": ssim, "group": r["caption_id"]}
    return rows


def _score(tmp_path, data, ckpt, *extra):
    out = tmp_path / "scored"
    code = curate_main(["score", "--data", str(data), "--clip", str(ckpt), "--out", str(out), "--no-progress",
                        "--chunk-size", "5", "--batch-size", "8", *extra])
    return code, out


def test_clipscore_and_selection_match_the_reference(clip, tmp_path, capsys):
    src, model, _, ckpt = clip
    data, records = _write_pairs(tmp_path)
    ref = _reference_rows(model, transformers.CLIPProcessor.from_pretrained(src), records, tmp_path)
    code, out = _score(tmp_path, data, ckpt, "--ssim", "--top", "3")
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["image_errors"] == {"corrupt_image": 1} and summary["skipped_records"] == 1
    rows = [json.loads(ln) for ln in (out / "scores.jsonl").read_text().splitlines()]
    assert len(rows) == len(records) - 1
    assert 0 < sum(r["clipscore"] > 0 for r in ref.values()) < len(ref)  # both sides of max(cos, 0)
    for row in rows:
        if row["id"] == "broken":
            assert row["error"] == "corrupt_image" and "clipscore" not in row
            continue
        assert row["cos"] == pytest.approx(ref[row["id"]]["cos"], abs=1e-4)
        assert row["clipscore"] == pytest.approx(ref[row["id"]]["clipscore"], abs=1e-4)
        assert row["ssim"] == pytest.approx(ref[row["id"]]["ssim"], abs=1e-6)

    def expected(top=None, min_score=None):  # SynthVLM: best CLIPScore per caption, then rank
        best = {}
        for rid, r in ref.items():
            if r["group"] not in best or r["clipscore"] > ref[best[r["group"]]]["clipscore"]:
                best[r["group"]] = rid
        ranked = sorted(best.values(), key=lambda i: ref[i]["clipscore"] + 0.5 * ref[i]["ssim"], reverse=True)
        if min_score is not None:
            ranked = [i for i in ranked if ref[i]["clipscore"] + 0.5 * ref[i]["ssim"] >= min_score]
        return ranked[:top] if top else ranked

    selected = json.loads((out / "selected.json").read_text())
    assert [r["id"] for r in selected] == expected(top=3)
    assert selected[0] == next(r for r in records if r["id"] == selected[0]["id"])  # records verbatim
    kept = expected()
    threshold = (ref[kept[1]]["clipscore"] + 0.5 * ref[kept[1]]["ssim"]
                 + ref[kept[2]]["clipscore"] + 0.5 * ref[kept[2]]["ssim"]) / 2
    code, out = _score(tmp_path, data, ckpt, "--ssim", "--min-score", str(threshold))
    assert code == 0
    assert [r["id"] for r in json.loads((out / "selected.json").read_text())] == kept[:2]
    capsys.readouterr()

    # The selected JSON is training data as it is.
    tok_dir = tmp_path / "vlm_tok"
    make_tokenizer().save_pretrained(tok_dir)
    assert data_main(["check", "--data", str(out / "selected.json"), "--image-root", str(tmp_path), "--tokenizer",
                      str(tok_dir), "--seq-len", "64", "--image-size", "32", "--num-image-tokens", "4",
                      "--template", "allava"]) == 0
    assert "usable:       2" in capsys.readouterr().out


def test_score_resumes_by_chunk_and_refuses_other_settings(clip, tmp_path, capsys, monkeypatch):
    *_, ckpt = clip
    data, _ = _write_pairs(tmp_path, bad=False)
    code, out = _score(tmp_path, data, ckpt)
    assert code == 0
    first = (out / "scores.jsonl").read_text()
    chunks = sorted((out / "chunks").iterdir())
    assert len(chunks) == 3  # 12 pairs in chunks of 5
    chunks[1].unlink()  # a kill before chunk 1 was written ...
    torn = chunks[2].read_text()
    chunks[2].write_text(torn[: len(torn) // 2])  # ... or a torn file from another writer
    capsys.readouterr()
    code, out = _score(tmp_path, data, ckpt)
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and summary["chunks_reused"] == 1 and summary["chunks"] == 3
    assert (out / "scores.jsonl").read_text() == first
    # All chunks done: a rerun (e.g. another --top) does not even load the scorer.
    import allava_jax.curate.score as score_mod

    monkeypatch.setattr(score_mod, "ClipScorer", None)
    assert _score(tmp_path, data, ckpt, "--top", "2")[0] == 0
    assert len(json.loads((out / "selected.json").read_text())) == 2
    capsys.readouterr()
    assert _score(tmp_path, data, ckpt, "--ssim")[0] == 2
    assert "other ssim" in capsys.readouterr().err


def test_scorer_batches_over_the_mesh_match_one_device(clip):
    """8 devices, a batch that is not a multiple of them: same embeddings as one device."""
    from allava_jax.curate.scorer import ClipScorer

    *_, ckpt = clip
    many = ClipScorer(ckpt, batch_size=8)
    one = ClipScorer(ckpt, batch_size=8, devices=jax.local_devices()[:1])
    assert len(many.mesh.devices.flat) == 8
    texts = CAPTIONS + ["x"] * 7  # 11: two batches, the second padded
    np.testing.assert_allclose(many.embed_texts(texts), one.embed_texts(texts), atol=1e-5)
    pixels = np.stack([np.asarray(C.picture(i, (32, 32))) for i in range(11)])
    np.testing.assert_allclose(many.embed_images(pixels), one.embed_images(pixels), atol=1e-5)


def test_import_errors_are_clear(tmp_path, capsys):
    vision = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64,
                                                                        num_hidden_layers=1, num_attention_heads=4,
                                                                        image_size=32, patch_size=8))
    vision.save_pretrained(tmp_path / "vision_only")
    assert convert_main(["import", "--clip", str(tmp_path / "vision_only"), "--out", str(tmp_path / "x")]) == 2
    assert "text_config" in capsys.readouterr().err
    src, *_ = C.clip_dir(tmp_path / "siglip_like")
    processor = json.loads((src / "preprocessor_config.json").read_text())
    (src / "preprocessor_config.json").write_text(json.dumps({**processor, "image_mean": [0.5, 0.5, 0.5]}))
    assert convert_main(["import", "--clip", str(src), "--out", str(tmp_path / "y")]) == 2
    assert "image_mean" in capsys.readouterr().err


def test_synth_images_output_is_scored_and_selected(clip, tmp_path):
    """SynthVLM end to end: ``synth images`` (fake Images API) -> ``curate score`` -> best image per
    caption, as training data."""
    from allava_jax.synth.fake_server import FakeServer

    *_, ckpt = clip
    captions = tmp_path / "caps.jsonl"
    captions.write_text("".join(json.dumps({"id": f"c{i}", "caption": c}) + "\n" for i, c in enumerate(CAPTIONS)))
    synth = tmp_path / "synth"
    # A subprocess, as a user runs it (its CLI takes over the process's logging).
    env = {**os.environ, "OPENAI_API_KEY": "EMPTY", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    with FakeServer() as srv:
        subprocess.run([sys.executable, "-m", "allava_jax.synth", "images", "--captions", str(captions), "--out",
                        str(synth), "--model", "sdxl", "--base-url", srv.url, "--n", "3", "--no-progress"],
                       env=env, check=True, capture_output=True, timeout=120)
    assert curate_main(["score", "--data", str(synth / "images.json"), "--image-root", str(synth), "--clip",
                        str(ckpt), "--out", str(tmp_path / "sel"), "--no-progress"]) == 0
    rows = [json.loads(ln) for ln in (tmp_path / "sel" / "scores.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and not any(r.get("error") for r in rows)
    best = {}
    for r in rows:  # the first of the highest per caption, as the reference's max()
        if r["group"] not in best or r["clipscore"] > best[r["group"]]["clipscore"]:
            best[r["group"]] = r
    selected = json.loads((tmp_path / "sel" / "selected.json").read_text())
    assert sorted(r["id"] for r in selected) == sorted(r["id"] for r in best.values())
    assert {r["caption_id"] for r in selected} == {"c0", "c1", "c2", "c3"}


def test_embed_matches_transformers_in_two_shards(clip, tmp_path, capsys):
    from allava_jax.curate.embed import load_embeddings

    src, model, _, ckpt = clip
    data, records = _write_pairs(tmp_path)
    base = ["embed", "--data", str(data), "--clip", str(ckpt), "--out", str(tmp_path / "emb"), "--no-progress",
            "--chunk-size", "5", "--batch-size", "8", "--num-shards", "2"]
    assert curate_main(base + ["--shard-index", "1"]) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert first["chunks"] == 3 and first["computed"] == 1 and first["chunks_missing"] == 2
    assert curate_main(base + ["--shard-index", "0"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["chunks_missing"] == 0
    manifest, vectors, rows = load_embeddings(tmp_path / "emb")
    assert manifest["records"] == [len(records)] and len(rows) == len(records)  # captionless records too
    processor = transformers.CLIPProcessor.from_pretrained(src)
    for row, v in zip(rows, vectors):
        if row["id"] == "broken":
            assert row["error"] == "corrupt_image" and not v.any()
            continue
        _, image, _, _ = _torch_embeds(model, processor, ["x"], [Image.open(tmp_path / row["image"]).convert("RGB")])
        np.testing.assert_allclose(v, image[0], atol=2e-3)  # stored as float16


def _planted_embeddings(root, scorer, concepts, per_concept, noise_seed=0):
    """An ``embed`` output built here: each image's embedding is its planted concept's text
    embedding plus a little noise, so its nearest concept is known."""
    from allava_jax.curate import runs
    from allava_jax.curate.embed import RUN_FILE

    text = scorer.embed_texts(concepts, prefix="")
    rng = np.random.default_rng(noise_seed)
    planted = np.repeat(np.arange(len(concepts)), per_concept)
    vectors = text[planted] + 1e-4 * rng.standard_normal((len(planted), text.shape[1]))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    data = root / "data.json"
    data.write_text(json.dumps([{"id": f"r{i}", "image": f"img{i}.jpg"} for i in range(len(planted))]))
    out = root / "emb"
    (out / runs.CHUNKS).mkdir(parents=True)
    np.save(out / runs.CHUNKS / "000000.npy", vectors.astype(np.float16))
    (out / runs.CHUNKS / "000000.jsonl").write_text(runs.jsonl(
        [{"key": f"0:{i}", "id": f"r{i}", "image": f"img{i}.jpg"} for i in range(len(planted))]))
    (out / RUN_FILE).write_text(json.dumps({"data": [str(data)], "records": [len(planted)], "clip": str(scorer),
                                            "chunk_size": len(planted)}))
    return out, planted


def test_balance_samples_rare_concepts_at_the_expected_rate(clip, tmp_path, capsys):
    """A planted set: 3 frequent concepts of 150 images and 30 rare ones of 3. MetaCLIP's rule with
    k = 1 gives image i the weight min(1, t / n_c(i)); the reference draw is numpy's sequential
    weighted sampling without replacement, repeated 2000 times; ours must land within 4 standard
    deviations of its mean number of rare images, and one seed must give one subset."""
    from allava_jax.curate.scorer import ClipScorer

    *_, ckpt = clip
    concepts = ["red bike", "two cats", "the sea"] + [f"rare thing {i}" for i in range(30)]
    per_concept = [150] * 3 + [3] * 30
    emb, planted = _planted_embeddings(tmp_path, ClipScorer(ckpt), concepts, per_concept)
    (tmp_path / "concepts.txt").write_text("\n".join(concepts) + "\n")
    target = 90
    args = ["balance", "--embeddings", str(emb), "--concepts", str(tmp_path / "concepts.txt"), "--clip", str(ckpt),
            "--top-k", "1", "--target", str(target)]
    subsets = []
    for seed, out in ((0, "a"), (0, "b"), (1, "c")):
        assert curate_main(args + ["--seed", str(seed), "--out", str(tmp_path / out)]) == 0
        subsets.append(np.load(tmp_path / out / "subset-000.npy"))
    report = json.loads((tmp_path / "a" / "balance.json").read_text())
    np.testing.assert_array_equal(subsets[0], subsets[1])
    assert not np.array_equal(subsets[0], subsets[2]) and len(subsets[0]) == target == len(set(subsets[0]))

    counts = np.bincount(planted)
    t = target * 1 / len(concepts)
    assert report["t"] == pytest.approx(t)
    weights = np.minimum(1.0, t / counts[planted])
    rng = np.random.default_rng(123)
    rare = planted >= 3
    draws = [rare[rng.choice(len(planted), target, replace=False, p=weights / weights.sum())].sum()
             for _ in range(2000)]
    mean, std = np.mean(draws), np.std(draws)
    for subset in subsets:
        assert abs(rare[subset].sum() - mean) <= 4 * std, (rare[subset].sum(), mean, std)
    assert mean > 0.75 * target  # the tail is 1/6 of the images and about 5/6 of the subset
    assert report["head_share_before"] == pytest.approx(450 / 540)
    assert report["head_share_after"] == pytest.approx(1 - rare[subsets[0]].mean())
    assert (tmp_path / "a" / "concepts.png").read_bytes()[:4] == b"\x89PNG"

    # Weights only: one weight per record, MetaCLIP's rule.
    assert curate_main(args[:-2] + ["--weights-only", "--out", str(tmp_path / "w")]) == 0
    w = np.load(tmp_path / "w" / "weights-000.npy")
    t_all = len(planted) / len(concepts)
    np.testing.assert_allclose(w, np.minimum(1.0, t_all / counts[planted]), rtol=1e-6)
    capsys.readouterr()


def test_score_and_embed_read_and_write_a_bucket(clip, gcs, tmp_path, capsys):
    """Data, images and outputs on gs:// (the GCS emulator): the same scores, selection and
    embeddings as a local run."""
    from allava_jax import storage
    from allava_jax.curate.embed import load_embeddings

    *_, ckpt = clip
    data, _ = _write_pairs(tmp_path / "local")
    bucket = gcs.bucket()
    storage.upload_dir(tmp_path / "local", bucket + "/d")
    for where, src, out in (("local", str(data), str(tmp_path / "out")), ("gcs", bucket + "/d/pairs.json", bucket + "/out")):
        for cmd in ("score", "embed"):
            assert curate_main([cmd, "--data", src, "--clip", str(ckpt), "--out", f"{out}/{cmd}", "--no-progress",
                                "--chunk-size", "5", "--batch-size", "8"]) == 0, where
    capsys.readouterr()
    local, remote = storage.as_path(tmp_path / "out"), storage.as_path(bucket + "/out")
    def rows(path):  # an error's detail may name a Python object's address; "file" names the input
        return [{k: v for k, v in json.loads(ln).items() if k not in ("detail", "file")}
                for ln in path.read_text().splitlines()]

    for name in ("score/scores.jsonl", "score/skipped.jsonl"):
        assert rows(remote / name) == rows(local / name), name
    assert json.loads((remote / "score/skipped.jsonl").read_text())["file"] == bucket + "/d/pairs.json"
    assert (remote / "score/selected.json").read_text() == (local / "score/selected.json").read_text()
    _, v_local, rows_local = load_embeddings(local / "embed")
    _, v_remote, rows_remote = load_embeddings(remote / "embed")
    np.testing.assert_array_equal(v_remote, v_local)
    assert [{k: v for k, v in r.items() if k != "detail"} for r in rows_remote] == \
        [{k: v for k, v in r.items() if k != "detail"} for r in rows_local]
    assert not list(tmp_path.glob("gs:*"))
