"""`python -m allava_jax.eval` on small local lmms-eval tasks written by the test (no downloads)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("lmms_eval", reason="lmms-eval is optional: pip install -r requirements-eval.txt")

from allava_jax.eval.scoring import Scorer  # noqa: E402
from allava_jax.infer import media  # noqa: E402
from allava_jax.infer.engine import Prompt  # noqa: E402
from allava_jax.infer.loading import load_engine  # noqa: E402
from allava_jax.infer.prompts import encode_generation_prompt, single_turn  # noqa: E402
from allava_jax.infer.sampling import SamplingParams  # noqa: E402
from infer_fixtures import png_bytes, shared_checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = ["What is this?", "Colour?", "How many?", "Where?"]

UTILS = '''
from PIL import Image


def doc_to_visual(doc):
    return [Image.open(doc["image"]).convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]
'''


def _task_yaml(name: str, data: Path, body: str) -> str:
    return textwrap.dedent(f"""\
        task: {name}
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {data}
        test_split: test
        doc_to_visual: !function utils.doc_to_visual
        doc_to_text: !function utils.doc_to_text
        """) + textwrap.dedent(body)


def test_eval_cli_scores_local_tasks_with_lmms_eval_metrics(tmp_path):
    engine = load_engine(shared_checkpoint())
    c = engine.config
    images, prompts = [], []
    for i, q in enumerate(QUESTIONS):
        path = tmp_path / f"img{i}.png"
        path.write_bytes(png_bytes(i))
        images.append(path)
        ids = encode_generation_prompt(engine.tokenizer, single_turn(q, 1), 1, image_token_id=c.image_token_id, num_image_tokens=c.num_image_tokens)
        prompts.append(Prompt(ids, media.load_file(path, c.vision.image_size)[None]))
    answers = [x.text for x in engine.generate(prompts, SamplingParams(max_new_tokens=6, stop=("@@@",)))]
    # Half the references are what the model says: lmms-eval's exact_match must give exactly 0.5.
    refs = [a if i % 2 == 0 else "certainly not this" for i, a in enumerate(answers)]
    scorer = Scorer(engine)
    choices = ["yes", "no", "maybe"]

    def mean_logp(p: Prompt, choice: str) -> float:
        ids = engine.tokenizer(" " + choice, add_special_tokens=False)["input_ids"]
        return scorer.loglikelihood(p, ids)[0] / len(ids)

    best = [max(range(3), key=lambda k: mean_logp(p, choices[k])) for p in prompts]
    gold = [b if i < 3 else (b + 1) % 3 for i, b in enumerate(best)]  # 3 of 4 right: acc = 0.75

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "utils.py").write_text(UTILS)
    gen_data, mc_data = tmp_path / "gen.jsonl", tmp_path / "mc.jsonl"
    gen_data.write_text("".join(json.dumps({"question": q, "image": str(p), "answer": r}) + "\n" for q, p, r in zip(QUESTIONS, images, refs)))
    mc_data.write_text("".join(json.dumps({"question": q, "image": str(p), "label": g}) + "\n" for q, p, g in zip(QUESTIONS, images, gold)))
    (tasks / "tiny_gen.yaml").write_text(_task_yaml("tiny_gen", gen_data, """\
        output_type: generate_until
        doc_to_target: answer
        generation_kwargs:
          max_new_tokens: 6
          until: ["@@@"]
          do_sample: false
        metric_list:
          - metric: exact_match
            aggregation: mean
            higher_is_better: true
        """))
    (tasks / "tiny_mc.yaml").write_text(_task_yaml("tiny_mc", mc_data, """\
        output_type: multiple_choice
        doc_to_target: label
        doc_to_choice: ["yes", "no", "maybe"]
        metric_list:
          - metric: acc
            aggregation: mean
            higher_is_better: true
        """))

    out = tmp_path / "results.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "HF_DATASETS_OFFLINE": "1",
           "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    cmd = [sys.executable, "-m", "allava_jax.eval", "--checkpoint", str(shared_checkpoint()), "--tasks", "tiny_gen,tiny_mc",
           "--include-path", str(tasks), "--no-default-tasks", "--batch-size", "4", "--output", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    results = json.loads(out.read_text())["results"]
    assert results["tiny_gen"]["exact_match,none"] == pytest.approx(0.5)
    assert results["tiny_mc"]["acc,none"] == pytest.approx(0.75)
    assert "tiny_gen" in run.stdout  # lmms-eval's table



def test_eval_cli_rejects_unknown_task(tmp_path, capsys):
    from allava_jax.eval.__main__ import main

    rc = main(["--checkpoint", str(shared_checkpoint()), "--tasks", "no_such_task", "--include-path", str(tmp_path), "--no-default-tasks"])
    assert rc == 2 and "unknown lmms-eval tasks" in capsys.readouterr().err
