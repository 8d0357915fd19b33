"""The demo's native-resolution variant: images in several sizes and aspect ratios, a tokenizer
with Qwen2-VL's chat tokens, packed native rows from ``configs/demo_ov15.py``'s settings, and the
closing report scoring a rice model's greedy answers."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import jax
import numpy as np
from PIL import Image

from allava_jax import checkpoints
from allava_jax.data import demo, pipeline
from allava_jax.models import get_preset, init_params
from allava_jax.train import data as train_data
from allava_jax.train import demo_report
from allava_jax.train.loop import model_config

ROOT = Path(__file__).resolve().parent.parent


def test_native_demo_data_pipeline_and_report(tmp_path):
    root = demo.make_demo_dataset(tmp_path / "demo", num_train=24, num_heldout=4, seed=1, native=True)
    records = demo.heldout_records(root) + json.loads((root / demo.FILES["instruct"]).read_text())
    sizes = {Image.open(root / r["image"]).size for r in records}
    assert len(sizes) >= 4 and any(w != h for w, h in sizes)
    tok = pipeline.load_tokenizer(str(root / demo.FILES["tokenizer"]))
    assert all(len(tok.encode(t, add_special_tokens=False)) == 1 for t in demo.NATIVE_SPECIAL_TOKENS)

    c = runpy.run_path(str(ROOT / "configs" / "demo_ov15.py"))["get_config"](str(root))
    mconf = model_config(c, tok)
    assert mconf.vision.kind == "rice" and mconf.chat_template == "qwen2vl"
    kw = train_data.pipeline_kwargs(c.data.copy_and_resolve_references(), mconf, tok, 0)
    kw.update(sources_cfg=list(c.stages[1]["data"]["sources"]), num_epochs=1, cache_dir=str(tmp_path / "c"))
    batch = next(pipeline.make_pipeline(batch_size=4, **kw))
    assert set(batch) == set(pipeline.NATIVE_BATCH_KEYS)
    assert batch["patches"].shape == (4, c.data.max_patches_per_row, 588)
    assert (batch["image_mask"].sum(1) > 1).any()  # several images in some rows

    # The report on a (random) rice model: native images go through inference's processing.
    small = get_preset("tiny_ov15").replace(text={"vocab_size": len(tok)}, image_token_id=mconf.image_token_id)
    ckpt = checkpoints.save_model(tmp_path / "ckpt", init_params(small, jax.random.key(0)), small,
                                  tokenizer_dir=root / demo.FILES["tokenizer"])
    result = demo_report.heldout_accuracy(ckpt, root, n=2, batch=2)
    assert result["questions"] == 2 and 0.0 <= result["accuracy"] <= 1.0 and len(result["samples"]) == 2
    kinds = [r["demo_answer"]["kind"] for r in demo.heldout_records(root)[:2]]
    assert {k: t["questions"] for k, t in result["by_kind"].items()} == {k: kinds.count(k) for k in set(kinds)}
    correct = sum(t["correct"] for t in result["by_kind"].values())
    assert correct == sum(s["correct"] for s in result["samples"]) == round(result["accuracy"] * 2)
    assert np.all([isinstance(s["answer"], str) for s in result["samples"]])
