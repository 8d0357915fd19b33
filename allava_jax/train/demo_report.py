"""The demo's closing report: greedy answers to held-out questions, scored, with samples.

Scoring (``allava_jax.data.demo.score``): a held-out question asks for the shape's colour or its
kind; the greedy answer is correct iff it names the true value and no other value of that
attribute. Accuracy = correct / questions, also per kind of question (``by_kind``: colour and
shape are learned at very different speeds, see docs/llava_ov15_training.md, "The demo").
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from allava_jax.data import demo
from allava_jax.infer import media, prompts
from allava_jax.infer.loading import load_engine
from allava_jax.infer.sampling import SamplingParams


def heldout_accuracy(checkpoint: str | Path, demo_dir: str | Path, n: int, batch: int = 16) -> dict[str, Any]:
    engine = load_engine(checkpoint)
    config = engine.config
    records = demo.heldout_records(demo_dir)[:n]
    answers: list[str] = []
    for start in range(0, len(records), batch):
        chunk = records[start : start + batch]
        batch_prompts = []
        for r in chunk:
            question = r["conversations"][0]["value"].replace("<image>\n", "")
            image = media.load_file(Path(demo_dir) / r["image"], config.vision)  # native: its own size
            batch_prompts.append(engine.prompt(prompts.single_turn(question, 1), media.stack([image], config.vision)))
        answers += [c.text for c in engine.generate(batch_prompts, SamplingParams(max_new_tokens=48))]
    correct = [demo.score(r, a) for r, a in zip(records, answers)]
    by_kind: dict[str, dict[str, int]] = {}
    for r, ok in zip(records, correct):
        tally = by_kind.setdefault(r["demo_answer"]["kind"], {"correct": 0, "questions": 0})
        tally["correct"] += int(ok)
        tally["questions"] += 1
    return {
        "accuracy": sum(correct) / max(len(records), 1),
        "questions": len(records),
        "by_kind": by_kind,
        "samples": [
            {"question": r["conversations"][0]["value"].split("\n", 1)[-1], "answer": a, "correct": ok}
            for r, a, ok in list(zip(records, answers, correct))[:4]
        ],
    }


def report(cfg: Any, workdir: Path) -> dict[str, Any]:
    """Score the last stage's final checkpoint and print the result to stdout."""
    last = workdir / (dict(cfg.stages[-1]).get("name", f"stage{len(cfg.stages)}") if cfg.stages else "")
    result = heldout_accuracy(last / "checkpoints", cfg.demo_dir, cfg.demo_questions)
    print(f"\nheld-out answer accuracy: {result['accuracy']:.1%} of {result['questions']} questions "
          "(correct = the greedy answer names the asked colour/shape and no other); "
          + ", ".join(f"{kind} {t['correct']}/{t['questions']}" for kind, t in sorted(result["by_kind"].items())))
    for s in result["samples"]:
        print(f"  Q: {s['question']}\n  A: {s['answer']}  [{'ok' if s['correct'] else 'wrong'}]")
    (workdir / "demo_report.json").write_text(json.dumps(result, indent=2))
    sys.stdout.flush()
    return result
