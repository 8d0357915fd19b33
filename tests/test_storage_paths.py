"""Every non-training command on gs:// paths, against the GCS emulator (tests/gcs_fixtures.py): data
sources and prepared datasets, convert in/out and loading a checkpoint from a bucket, and a
missing bucket reported as one line by a CLI."""

import subprocess
import sys

import numpy as np
import pytest

from allava_jax import checkpoints, storage
from allava_jax.data import pipeline
from allava_jax.data.__main__ import main as data_main
from cli_env import cli_env
from data_fixtures import make_tokenizer, write_dataset

SEQ, NIMG, SIZE, M = 96, 8, 32, 3


def first_batch(sources_cfg, tok, cache):
    it = pipeline.make_pipeline(sources_cfg, tok, seq_len=SEQ, batch_size=2, image_token_id=tok.convert_tokens_to_ids("<image>"),
                                image_size=SIZE, num_image_tokens=NIMG, max_images_per_row=M, seed=0, shard_index=0,
                                shard_count=1, keep_meta=True, cache_dir=cache, read_threads=2, num_packing_bins=4)
    return next(iter(it))


def assert_same_batch(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)


def test_sources_on_gcs_give_the_local_first_batch(gcs, tmp_path):
    tok = make_tokenizer()
    root = tmp_path / "data"
    path, _ = write_dataset(str(root), n_image=10, n_text=4, seed=3)
    bucket = gcs.bucket()
    storage.upload_dir(root, bucket + "/data")
    local = first_batch([{"path": path, "image_root": str(root)}], tok, str(tmp_path / "c1"))
    remote = first_batch([{"path": bucket + "/data/data.json", "image_root": bucket + "/data"}], tok,
                         str(tmp_path / "c2"))
    assert_same_batch(local, remote)
    assert local["image_mask"].any()  # the batch has images, read from the bucket
    # A prepared ArrayRecord (TFDS) dataset, read from the bucket by array_record/TFDS themselves.
    assert data_main(["prepare", "--data", path, "--image-root", str(root), "--out", str(tmp_path / "tfds"),
                      "--cache-dir", str(tmp_path / "c1")]) == 0
    prepared = tmp_path / "tfds" / "allava_records" / "1.0.0"
    storage.upload_dir(prepared, bucket + "/tfds/allava_records/1.0.0")
    local = first_batch([{"path": str(prepared)}], tok, str(tmp_path / "c1"))
    remote = first_batch([{"path": bucket + "/tfds/allava_records/1.0.0"}], tok, str(tmp_path / "c2"))
    assert_same_batch(local, remote)
    # A missing image on the bucket is a skipped sample naming the object, never a local path.
    from allava_jax.data import images

    with pytest.raises(images.ImageError, match=rf"not found: {bucket}/data/nope.jpg"):
        images.read_image_bytes("nope.jpg", [bucket + "/data"])
    with pytest.raises(images.ImageError, match="image_path_escapes"):
        images.read_image_bytes("../other/x.jpg", [bucket + "/data"])


def test_convert_import_to_gcs_then_load_and_export(gcs, tmp_path, monkeypatch):
    import test_convert_support as S
    from allava_jax.convert.__main__ import main as convert_main
    from allava_jax.infer.loading import load_engine

    monkeypatch.setenv("ALLAVA_CACHE", str(tmp_path / "cache"))
    src, _ = S.llava_dir(tmp_path / "hf")
    bucket = gcs.bucket()
    assert convert_main(["import", "--src", str(src), "--out", bucket + "/ckpt", "--no-progress"]) == 0
    assert not any(p.name.startswith("gs:") for p in tmp_path.iterdir())
    local = tmp_path / "ckpt"
    assert convert_main(["import", "--src", str(src), "--out", str(local), "--no-progress"]) == 0
    root, step = checkpoints.resolve(bucket + "/ckpt")
    assert str(root) == bucket + "/ckpt" and step == 0
    S.assert_trees_equal(S.checkpoint_params(local), S.checkpoint_params(bucket + "/ckpt"))
    engine = load_engine(bucket + "/ckpt")  # what generate / serve / eval use
    assert engine.tokenizer.get_vocab() == load_engine(str(local)).tokenizer.get_vocab()
    # export --checkpoint gs://... --out gs://...: the same files as a local export.
    assert convert_main(["export", "--checkpoint", bucket + "/ckpt", "--out", bucket + "/hf", "--no-progress"]) == 0
    assert convert_main(["export", "--checkpoint", str(local), "--out", str(tmp_path / "hf_local"), "--no-progress"]) == 0
    names = sorted(p.name for p in storage.as_path(bucket + "/hf").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "hf_local").iterdir())
    assert (storage.as_path(bucket + "/hf/model.safetensors").read_bytes()
            == (tmp_path / "hf_local" / "model.safetensors").read_bytes())


@pytest.mark.parametrize("cli,args", [
    ("convert", ["import", "--src", "{tmp}", "--out", "gs://no-such-bucket-7/ckpt"]),
    ("generate", ["--checkpoint", "gs://no-such-bucket-7/ckpt", "--prompt", "hi"]),
])
def test_missing_bucket_is_one_error_line(gcs, tmp_path, cli, args):
    gcs.bucket()
    cmd = [sys.executable, "-m", f"allava_jax.{cli}", *[a.replace("{tmp}", str(tmp_path)) for a in args]]
    proc = subprocess.run(cmd, env=cli_env(**gcs.env), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: gs://no-such-bucket-7/ckpt: bucket gs://no-such-bucket-7 does not exist")
    assert "Traceback" not in proc.stderr
