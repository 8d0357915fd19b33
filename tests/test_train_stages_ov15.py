"""The three LLaVA-OneVision-1.5 stage configs run in turn on ``tiny_ov15``, each from the previous
stage's checkpoint (stage 1 from a stage-0 checkpoint): the parameters a stage freezes get no
optimizer state and come out bit-identical to what it started from; the ones it trains move.
Stage 1.5 also resumes from a mid-run checkpoint with the losses of the uninterrupted run."""

from __future__ import annotations

import json
import runpy
import shutil
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from ml_collections import ConfigDict

import ov15_fixtures as F
from allava_jax import checkpoints
from allava_jax.models import get_preset, init_params
from allava_jax.train import optim
from allava_jax.train.loop import train
from test_train_native import _write

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("llava_ov15_stage1", "llava_ov15_stage1_5", "llava_ov15_stage2")
RESUMED = "llava_ov15_stage1_5"


def _losses(workdir: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def _params(path) -> dict:
    return optim.flatten(jax.device_get(checkpoints.load_params(path)))


def _opt_state_paths(workdir: Path) -> list[str]:
    """Every '/'-joined path of the saved optimizer state (read raw, no target)."""
    mngr = ocp.CheckpointManager(workdir / "checkpoints", item_names=("opt_state",))
    state = mngr.restore(mngr.latest_step(), args=ocp.args.Composite(opt_state=ocp.args.StandardRestore()))
    mngr.close()
    return ["/".join(str(getattr(k, "key", k)) for k in path) for path, _ in jax.tree_util.tree_flatten_with_path(
        state["opt_state"])[0]]


def test_stages_run_in_turn_with_the_right_parameters_frozen(tmp_path):
    tok = F.qwen_tokenizer()
    tok_dir = tmp_path / "tokenizer"
    tok.save_pretrained(tok_dir)
    data = tmp_path / "data"
    path, _ = _write(str(data))
    config = get_preset("tiny_ov15").replace(
        text={"vocab_size": max(len(tok), 128)}, image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"))
    previous = tmp_path / "stage0"
    checkpoints.save_model(previous, init_params(config, jax.random.key(0)), config, tokenizer_dir=tok_dir)

    for name in STAGES:
        c = runpy.run_path(str(ROOT / "configs" / f"{name}.py"))["get_config"](str(data))
        rules = [tuple(r) for r in c.param_rules]
        with c.unlocked():
            c.init_from = str(previous)
            c.model_overrides = ConfigDict({"dtype": "float32", "remat_policy": "none", "attention": "xla"})
            c.total_steps, c.batch_size, c.micro_batch_size, c.num_devices = (4 if name == RESUMED else 2), 2, 0, 2
            c.checkpoint_every, c.log_every, c.compile_cache_dir, c.hang_timeout_s = 2, 1, "", 0.0
            c.data.sources = ({"name": "tiny", "path": path, "image_root": str(data)},)
            c.data.seq_len, c.data.max_patches_per_row, c.data.max_images_per_row = 256, 128, 4
            c.data.worker_count, c.data.packing_bins = 0, 4
        workdir = tmp_path / name
        before = _params(previous)
        summary = train(c, workdir)
        assert summary["step"] == c.total_steps and np.isfinite(summary["loss"])
        if name == RESUMED:  # as if killed after step 2's checkpoint: rerun, same losses
            first = _losses(workdir)
            shutil.rmtree(workdir / "checkpoints" / "4")
            assert train(c, workdir)["start_step"] == 2
            assert [s for s, _ in first] == [1, 2, 3, 4] and _losses(workdir) == first
        after = _params(workdir / "checkpoints")
        frozen = [p for p in before if optim.multiplier(p, rules) is None]  # first match wins
        trained = [p for p in before if p not in frozen]
        assert frozen and trained, name
        assert all(np.array_equal(before[p], after[p]) for p in frozen), name
        assert any(not np.array_equal(before[p], after[p]) for p in trained), name
        # The class token and its angles are frozen in every stage.
        assert {"vision/class_embedding", "vision/class_pos_emb"} <= set(frozen)
        opt_paths = _opt_state_paths(workdir)
        assert not [q for q in opt_paths for p in frozen if q.endswith(p) or f"/{p}/" in f"/{q}/"], name
        assert any(q.endswith(p) or p in q for q in opt_paths for p in trained), name
        previous = workdir / "checkpoints"


def test_a_preempted_stage_ends_a_staged_run(monkeypatch, tmp_path):
    """A SIGTERM-saved stage is unfinished: the next stage must not start from its checkpoint."""
    from allava_jax.train.stages import run_stages
    from allava_jax.train import loop
    from allava_jax.train.config import base_config

    started = []

    def fake_train(cfg, workdir):
        started.append(workdir.name)
        return {"preempted_at": 3} if workdir.name == "a" else {"step": 5}

    monkeypatch.setattr(loop, "train", fake_train)
    c = base_config()
    with c.unlocked():
        c.stages = ({"name": "a", "total_steps": 5}, {"name": "b", "total_steps": 5})
    summaries = run_stages(c, tmp_path)
    assert started == ["a"] and summaries == [{"stage": "a", "preempted_at": 3}]
