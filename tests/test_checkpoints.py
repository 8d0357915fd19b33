"""The shared checkpoint format: save, resolve the step, restore into shards."""

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from allava_jax import checkpoints
from allava_jax.models import get_preset, init_params


def test_save_and_load_round_trip_with_sharded_target(tmp_path):
    config = get_preset("tiny")
    params = init_params(config, jax.random.key(0))
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text("{}")
    root = checkpoints.save_model(tmp_path / "ckpt", params, config, step=3, tokenizer_dir=tok)

    for path in (root, root / "3"):
        assert checkpoints.resolve(path) == (root, 3)
        assert checkpoints.load_config(path) == config
    assert (checkpoints.tokenizer_path(root) / "tokenizer.json").exists()

    mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
    sharding = NamedSharding(mesh, P())
    emb = NamedSharding(mesh, P("fsdp", None))
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), params)
    target["llm"]["embed_tokens"]["embedding"] = jax.ShapeDtypeStruct((128, 64), np.float32, sharding=emb)
    restored = checkpoints.load_params(root, target)
    assert restored["llm"]["embed_tokens"]["embedding"].sharding == emb
    jax.tree.map(np.testing.assert_array_equal, restored, params)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(checkpoints.CheckpointNotFound, match="no such checkpoint"):
        checkpoints.resolve(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(checkpoints.CheckpointNotFound, match="no checkpoint steps"):
        checkpoints.resolve(tmp_path / "empty")
