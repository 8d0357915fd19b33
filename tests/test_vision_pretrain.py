"""The vision_pretrain stage (train/vision_pretrain.py): a from-scratch rice tower learns its
images' caption words, the stage after it starts from that tower, a bad image is skipped and
counted, a finished stage is skipped on rerun, and the stage is deterministic."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import jax
import numpy as np
import pytest

from allava_jax import checkpoints
from allava_jax.data import demo, pipeline
from allava_jax.errors import UserError
from allava_jax.models import init_params
from allava_jax.train import vision_pretrain
from allava_jax.train.loop import model_config
from allava_jax.train.stages import run_stages

ROOT = Path(__file__).resolve().parent.parent


def _flat(tree) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _config(root: Path):
    """configs/demo_ov15.py's stage 0 and stage 1 on the tiny model, a few images and steps."""
    c = runpy.run_path(str(ROOT / "configs" / "demo_ov15.py"))["get_config"](str(root))
    tok = pipeline.load_tokenizer(str(root / demo.FILES["tokenizer"]))
    with c.unlocked():
        c.model = "tiny_ov15"
        c.model_overrides.text = {"vocab_size": len(tok)}
        c.vision_pretrain.update({"epochs": 4, "batch_images": 8, "images_per_row": 4})
        c.batch_size, c.data.seq_len, c.checkpoint_every, c.demo_questions = 8, 160, 2, 0
        stage0, stage1 = c.stages[0], dict(c.stages[1])
        # Stage 1 with the tower frozen: its tower must then be stage 0's, bit for bit.
        stage1.update(total_steps=2, param_rules=(("vision/.*", None), (".*", 1.0)))
        c.stages = (stage0, stage1)
    return c


def test_vision_pretrain_trains_the_tower_and_the_next_stage_starts_from_it(tmp_path):
    root = demo.make_demo_dataset(tmp_path / "demo", num_train=17, num_heldout=2, seed=1, native=True)
    captions = json.loads((root / demo.FILES["caption"]).read_text())
    captions[3]["image"] = "images/not_there.png"  # skipped and counted, the rest go on
    (root / demo.FILES["caption"]).write_text(json.dumps([*captions, "not a record"]))
    c = _config(root)

    summaries = run_stages(c, tmp_path / "run")
    first = summaries[0]
    assert first["stage"] == "stage0" and first["images"] == 16
    assert first["skipped"] == {"missing_image": 1, "bad_json": 1} and first["skipped_total"] == 2
    assert first["words"] == len({w for r in captions for w in vision_pretrain.caption_words(r)})
    assert first["epoch_losses"][-1] < first["epoch_losses"][0]
    assert summaries[1]["stage"] == "stage1" and summaries[1]["step"] == 2

    # Stage 0's checkpoint: the tower trained, projector and decoder at the seeded random init.
    config, pretrained = checkpoints.load_model(tmp_path / "run" / "stage0")
    assert config == model_config(c, pipeline.load_tokenizer(c.tokenizer))
    init = init_params(config, jax.random.key(c.seed))
    for part in ("projector", "llm"):
        assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(init[part]), jax.tree.leaves(pretrained[part])))
    changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(init["vision"]), jax.tree.leaves(pretrained["vision"]))]
    assert sum(changed) > len(changed) // 2

    # Stage 1 started from it: with its tower frozen, the tower is still stage 0's.
    _, after = checkpoints.load_model(tmp_path / "run" / "stage1")
    before_tower, after_tower = _flat(pretrained["vision"]), _flat(after["vision"])
    assert before_tower.keys() == after_tower.keys()
    assert all(np.array_equal(before_tower[k], after_tower[k]) for k in before_tower)

    # Rerun: the finished stage 0 is skipped, its checkpoint untouched.
    assert run_stages(c, tmp_path / "run")[0] == {"stage": "stage0", "status": "finished before"}
    _, again = checkpoints.load_model(tmp_path / "run" / "stage0")
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(pretrained), jax.tree.leaves(again)))

    # Deterministic: a killed stage 0 is redone from the start with the same result.
    stage0 = c.copy_and_resolve_references()
    with stage0.unlocked():
        stage0.update_from_flattened_dict({"data.sources": c.stages[0]["data"]["sources"]})
    vision_pretrain.run(stage0, tmp_path / "redo")
    _, redone = checkpoints.load_model(tmp_path / "redo")
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(pretrained), jax.tree.leaves(redone)))

    # epochs 0: the seeded random init, as a stage that trains from scratch would draw it.
    with stage0.unlocked():
        stage0.vision_pretrain.epochs = 0
    assert vision_pretrain.run(stage0, tmp_path / "none") == {"epochs": 0}
    _, saved = checkpoints.load_model(tmp_path / "none")
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(init), jax.tree.leaves(saved)))


def test_vision_pretrain_refuses_a_clip_tower(tmp_path):
    root = demo.make_demo_dataset(tmp_path / "demo", num_train=4, num_heldout=1, seed=1)
    c = runpy.run_path(str(ROOT / "configs" / "demo.py"))["get_config"](str(root))
    with c.unlocked():
        c.data.sources = tuple(demo.sources(root, stage=1))
    with pytest.raises(UserError, match="needs a rice tower"):
        vision_pretrain.run(c, tmp_path / "run")
