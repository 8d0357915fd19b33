"""The whole chain on a bucket (the GCS emulator): ``convert import --out gs://`` ->
``train --config.init_from=gs://`` with a ``gs://`` workdir -> ``generate --checkpoint gs://``."""

import jax
import numpy as np

import test_convert_support as S
import train_fixtures
from allava_jax import storage
from allava_jax.convert.__main__ import main as convert_main
from allava_jax.infer.loading import load_engine
from allava_jax.infer.prompts import single_turn
from allava_jax.infer.sampling import SamplingParams
from allava_jax.train.loop import train


def test_import_train_and_generate_on_a_bucket(gcs, tmp_path, tmp_path_factory, monkeypatch):
    monkeypatch.setenv("ALLAVA_CACHE", str(tmp_path / "cache"))
    data_dir = train_fixtures.demo_dir(tmp_path_factory)
    bucket = gcs.bucket()
    src, _ = S.llava_dir(tmp_path / "hf")
    assert convert_main(["import", "--src", str(src), "--out", f"{bucket}/ckpt", "--no-progress"]) == 0

    cfg = train_fixtures.config(data_dir, total_steps=3, checkpoint_every=3, log_every=1,
                                init_from=f"{bucket}/ckpt", tokenizer="")
    cfg.model_overrides = {"dtype": "float32"}  # the imported model's shapes, not the tiny preset's
    summary = train(cfg, f"{bucket}/run")
    assert summary["step"] == 3 and np.isfinite(summary["loss"])
    assert not (train_fixtures.ROOT / "gs:").exists() and not any(p.name.startswith("gs:") for p in tmp_path.iterdir())

    imported = S.checkpoint_params(f"{bucket}/ckpt")
    trained = S.checkpoint_params(f"{bucket}/run")
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), imported["llm"], trained["llm"])
    assert any(jax.tree.leaves(changed))  # it trained from the imported weights
    jax.tree.map(np.testing.assert_array_equal, imported["vision"], trained["vision"])  # frozen

    # generate from the bucket = generate from a local copy of the same checkpoint
    remote_engine = load_engine(f"{bucket}/run")
    local_engine = load_engine(storage.local_dir(f"{bucket}/run/checkpoints"))
    params = SamplingParams(max_new_tokens=6)
    prompts = [e.prompt(single_turn("What is this?", 0)) for e in (remote_engine, local_engine)]
    a = remote_engine.generate([prompts[0]], params)[0]
    b = local_engine.generate([prompts[1]], params)[0]
    assert a.token_ids == b.token_ids and len(a.token_ids) > 0
