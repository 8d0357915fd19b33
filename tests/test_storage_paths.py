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
from allava_jax.errors import UserError
from cli_env import cli_env
from data_fixtures import make_tokenizer, write_dataset

SEQ, NIMG, SIZE, M = 96, 8, 32, 3


def first_batch_with(sources_cfg, tok, cache, **kw):
    """The first batch of the training pipeline (the batch builder itself, no training run), read
    in this thread: no read-ahead left running after the test."""
    it = pipeline.make_pipeline(sources_cfg, tok, seq_len=SEQ, batch_size=2, image_token_id=tok.convert_tokens_to_ids("<image>"),
                                image_size=SIZE, num_image_tokens=NIMG, max_images_per_row=M, seed=0, shard_index=0,
                                shard_count=1, keep_meta=True, cache_dir=cache, read_threads=0, **kw)
    return next(iter(it))


def first_batch(sources_cfg, tok, cache):
    return first_batch_with(sources_cfg, tok, cache, num_packing_bins=4)


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
    from transformers import AutoTokenizer

    assert engine.tokenizer.get_vocab() == AutoTokenizer.from_pretrained(src).get_vocab()
    with pytest.raises(UserError, match=r"^gs://no-such-bucket-9/ckpt: bucket gs://no-such-bucket-9 does not exist"):
        load_engine("gs://no-such-bucket-9/ckpt")
    # export --checkpoint gs://... --out gs://...: the same files as a local export.
    assert convert_main(["export", "--checkpoint", bucket + "/ckpt", "--out", bucket + "/hf", "--no-progress"]) == 0
    assert convert_main(["export", "--checkpoint", str(local), "--out", str(tmp_path / "hf_local"), "--no-progress"]) == 0
    names = sorted(p.name for p in storage.as_path(bucket + "/hf").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "hf_local").iterdir())
    assert (storage.as_path(bucket + "/hf/model.safetensors").read_bytes()
            == (tmp_path / "hf_local" / "model.safetensors").read_bytes())


def test_missing_bucket_is_one_error_line(gcs, tmp_path):
    gcs.bucket()
    cmd = [sys.executable, "-m", "allava_jax.convert", "import", "--src", str(tmp_path), "--out",
           "gs://no-such-bucket-7/ckpt"]
    proc = subprocess.run(cmd, env=cli_env(**gcs.env), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: gs://no-such-bucket-7/ckpt: bucket gs://no-such-bucket-7 does not exist")
    assert "Traceback" not in proc.stderr


def test_prepare_and_plan_write_a_bucket_and_training_reads_them(gcs, tmp_path, monkeypatch):
    """`data prepare --out gs://` and `data plan --out gs://` from sources on the bucket; the
    offline (plan) pipeline reads the bucket's plan and gives the local plan's first batch."""
    monkeypatch.setenv("ALLAVA_CACHE", str(tmp_path / "cache"))
    tok = make_tokenizer()
    tok.save_pretrained(tmp_path / "tok")
    root = tmp_path / "data"
    path, _ = write_dataset(str(root), n_image=8, n_text=4, seed=5)
    bucket = gcs.bucket()
    storage.upload_dir(root, bucket + "/data")
    storage.upload_dir(tmp_path / "tok", bucket + "/tok")
    remote_src = ["--data", bucket + "/data/data.json", "--image-root", bucket + "/data"]
    assert data_main(["prepare", *remote_src, "--out", bucket + "/tfds", "--cache-dir", str(tmp_path / "c")]) == 0
    assert (storage.as_path(bucket) / "tfds/allava_records/1.0.0/dataset_info.json").is_file()
    plan_args = ["--seq-len", str(SEQ), "--num-image-tokens", str(NIMG), "--max-images", str(M),
                 "--cache-dir", str(tmp_path / "c")]
    assert data_main(["plan", *remote_src, "--tokenizer", bucket + "/tok", "--out", bucket + "/p.plan", *plan_args]) == 0
    assert data_main(["plan", "--data", path, "--image-root", str(root), "--tokenizer", str(tmp_path / "tok"),
                      "--out", str(tmp_path / "p.plan"), *plan_args]) == 0
    assert not list(tmp_path.glob("gs:*")) and not list(root.glob("gs:*"))

    def offline_batch(src, plan):
        return first_batch_with(src, tok, str(tmp_path / "c"), packing_method="offline", plan=plan)

    local = offline_batch([{"path": path, "image_root": str(root)}], str(tmp_path / "p.plan"))
    remote = offline_batch([{"path": bucket + "/data/data.json", "image_root": bucket + "/data"}], bucket + "/p.plan")
    assert_same_batch(local, remote)
