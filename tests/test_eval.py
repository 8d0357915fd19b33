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

from cli_env import cli_env
from infer_fixtures import png_bytes, serving, shared_checkpoint  # noqa: E402

from allava_jax.eval.scoring import Scorer  # noqa: E402
from allava_jax.infer import media  # noqa: E402
from allava_jax.infer import openai_api as api  # noqa: E402
from allava_jax.infer.engine import Prompt  # noqa: E402
from allava_jax.infer.loading import load_engine  # noqa: E402
from allava_jax.infer.prompts import encode_generation_prompt, single_turn  # noqa: E402
from allava_jax.infer.sampling import SamplingParams  # noqa: E402
from allava_jax.infer.scheduler import Scheduler  # noqa: E402
from allava_jax.infer.server import create_app  # noqa: E402

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


def _greedy_task_yaml(name: str, data: Path, target: str, max_new_tokens: int) -> str:
    """A generate_until task scored by exact match; "@@@" never comes, so answers end at max_new_tokens
    or EOS (lmms-eval's openai model sends no stop strings, so both clients stop alike)."""
    return _task_yaml(name, data, f"""\
        output_type: generate_until
        doc_to_target: {target}
        generation_kwargs:
          max_new_tokens: {max_new_tokens}
          until: ["@@@"]
          do_sample: false
        metric_list:
          - metric: exact_match
            aggregation: mean
            higher_is_better: true
        """)


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
    (tasks / "tiny_gen.yaml").write_text(_greedy_task_yaml("tiny_gen", gen_data, "answer", 6))
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
    env = cli_env(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
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


JUDGED_UTILS = '''
import importlib

from PIL import Image

# lmms-eval's own llava-in-the-wild scoring (its judge prompt, parsing and aggregation).
_w = importlib.import_module("lmms_eval.tasks.llava-in-the-wild.utils")
llava_process_results = _w.llava_process_results
llava_all_aggregation = _w.llava_all_aggregation


def doc_to_visual(doc):
    return [Image.open(doc["image"]).convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]
'''

MULTI_ROUND_UTILS = '''
def multi_doc_to_text(doc, lmms_eval_specific_kwargs=None, previous_output=None, round_idx=None, previous_round_info=None):
    questions = doc["questions"]
    if round_idx is None:
        return questions[0]
    assert len(previous_output) == round_idx
    if round_idx >= len(questions):
        return None, None, True, previous_output, None
    return None, questions[round_idx], False, previous_output, {"round": round_idx}


def multi_process_results(doc, results):
    return {"rounds": len(results[0])}
'''


def test_judged_task_and_multi_round_task_run_end_to_end(tmp_path):
    """A llava-in-the-wild style task scored by lmms-eval's own judge code at a fake judge endpoint
    (--judge-base-url), and a multi-round task, through the CLI."""
    from judge_fixtures import JudgeState, make_judge_app

    from allava_jax.synth.fake_server import FakeServer

    image = tmp_path / "img.png"
    image.write_bytes(png_bytes(7))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "utils.py").write_text(JUDGED_UTILS + MULTI_ROUND_UTILS)
    w_data, mr_data = tmp_path / "w.jsonl", tmp_path / "mr.jsonl"
    w_data.write_text("".join(json.dumps({"question": q, "image": str(image), "gpt_answer": "A cat.", "caption": "a cat",
                                          "category": cat, "question_id": i}) + "\n"
                              for i, (q, cat) in enumerate(zip(QUESTIONS, ["conv", "detail", "complex", "conv"]))))
    conversations = [["What is this?", "Are you sure?", "Why?"], ["Colour?", "And the shape?"]]
    mr_data.write_text("".join(json.dumps({"questions": qs, "image": str(image)}) + "\n" for qs in conversations))
    (tasks / "tiny_llava_w.yaml").write_text(_task_yaml("tiny_llava_w", w_data, """\
        output_type: generate_until
        doc_to_target: gpt_answer
        generation_kwargs:
          max_new_tokens: 6
          do_sample: false
        process_results: !function utils.llava_process_results
        metric_list:
          - metric: gpt_eval_llava_all
            aggregation: !function utils.llava_all_aggregation
            higher_is_better: true
        """))
    (tasks / "tiny_multi.yaml").write_text(_task_yaml("tiny_multi", mr_data, """\
        output_type: generate_until_multi_round
        doc_to_target: questions
        generation_kwargs:
          max_new_tokens: 5
          until: ["@@@"]
          do_sample: false
        process_results: !function utils.multi_process_results
        metric_list:
          - metric: rounds
            aggregation: mean
            higher_is_better: true
        """).replace("utils.doc_to_text", "utils.multi_doc_to_text"))

    out = tmp_path / "results.json"
    state = JudgeState(scores="8 6")
    with FakeServer(state, make_judge_app) as server:
        env = cli_env(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), OPENAI_API_KEY="EMPTY")
        cmd = [sys.executable, "-m", "allava_jax.eval", "--checkpoint", str(shared_checkpoint()),
               "--tasks", "tiny_llava_w,tiny_multi", "--include-path", str(tasks), "--no-default-tasks",
               "--batch-size", "4", "--output", str(out), "--log-samples",
               "--judge-model", "my-judge", "--judge-base-url", server.url]
        run = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    report = json.loads(out.read_text())
    # lmms-eval's aggregation: 100 * mean(our score) / mean(judge's reference score) = 100 * 6 / 8.
    assert report["results"]["tiny_llava_w"]["gpt_eval_llava_all,none"] == pytest.approx(75.0)
    assert state.requests == len(QUESTIONS)
    assert report["results"]["tiny_multi"]["rounds,none"] == pytest.approx(2.5)

    samples = sorted(report["samples"]["tiny_multi"], key=lambda s: s["doc_id"])
    assert [len(s["resps"][0][0]) for s in samples] == [len(qs) for qs in conversations]


def test_multi_round_rounds_see_their_history():
    """Round k's prompt is the conversation so far: every earlier question and our answer to it."""
    from lmms_eval.api.instance import Instance

    from allava_jax.eval.model import AllavaJax

    engine = load_engine(shared_checkpoint())
    seen: list[list[int]] = []

    class Recording:
        """The engine, recording the prompt ids of every generation."""

        def __getattr__(self, name):
            return getattr(engine, name)

        def generate(self, prompts, sampling):
            seen.extend(p.ids for p in prompts)
            return engine.generate(prompts, sampling)

    namespace: dict = {}
    exec(MULTI_ROUND_UTILS, namespace)
    docs = [{"questions": ["What is this?", "Are you sure?", "Why?"]}, {"questions": ["Colour?", "And the shape?"]}]
    model = AllavaJax(engine=Recording(), batch_size=2)
    model.task_dict = {"t": {"test": docs}}
    gen_kwargs = {"max_new_tokens": 5, "until": ["@@@"], "do_sample": False}
    requests = [Instance(request_type="generate_until_multi_round", idx=0, metadata={"task": "t", "doc_id": i, "repeats": 1},
                         arguments=(d["questions"][0], dict(gen_kwargs), lambda doc: [], namespace["multi_doc_to_text"], i, "t", "test"))
                for i, d in enumerate(docs)]
    answers = model.generate_until_multi_round(requests)
    assert [len(a) for a in answers] == [3, 2]
    expected = []
    for doc, said in zip(docs, answers):
        history = []
        for q, a in zip(doc["questions"], said):
            expected.append(engine.prompt(history + [(q, None)]).ids)
            history.append((q, a))
    assert sorted(map(tuple, seen)) == sorted(map(tuple, expected))
    # The history is really in there: the last round's prompt holds the earlier answers' tokens.
    last = engine.prompt([(q, a) for q, a in zip(docs[0]["questions"][:2], answers[0][:2])] + [("Why?", None)]).ids
    assert tuple(last) in set(map(tuple, seen)) and len(last) > len(engine.prompt([("Why?", None)]).ids) + 8


MULTI_IMAGE_UTILS = '''
from PIL import Image


def doc_to_visual(doc):
    return [Image.open(path).convert("RGB") for path in doc["images"]]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]
'''


def test_lmms_eval_openai_model_on_our_server_gives_our_plugins_answers(tmp_path):
    """lmms-eval's own `openai` model, run as a user runs it (`python -m lmms_eval --model openai`),
    is a real client of our server: PNG data URLs, [images..., text] parts, several images per item.
    Greedy, it must answer every item as our plugin does, with no failed request."""
    images = []
    for i in range(4):
        images.append(str(tmp_path / f"img{i}.png"))
        Path(images[-1]).write_bytes(png_bytes(i))
    docs = [("What is this?", images[:1]), ("Compare them.", images[1:3]), ("Compare them.", images[1:2]),
            ("Which one differs?", images[1:4])]
    data = tmp_path / "multi.jsonl"
    data.write_text("".join(json.dumps({"question": q, "images": paths}) + "\n" for q, paths in docs))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "utils.py").write_text(MULTI_IMAGE_UTILS)
    (tasks / "tiny_images.yaml").write_text(_greedy_task_yaml("tiny_images", data, "question", 8))

    engine = load_engine(shared_checkpoint())
    scheduler = Scheduler(engine, max_batch=4).start()
    out = tmp_path / "out"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf"), "OPENAI_API_KEY": "EMPTY"}
    try:
        with serving(create_app(scheduler, "tiny", api.ServerLimits(max_images=3, max_new_tokens=16))) as url:
            cmd = [sys.executable, "-m", "lmms_eval", "--model", "openai",
                   "--model_args", f"model_version=tiny,base_url={url},timeout=120,max_retries=1",
                   "--tasks", "tiny_images", "--include_path", str(tasks), "--batch_size", "1",
                   "--log_samples", "--output_path", str(out), "--verbosity", "WARNING"]
            run = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    finally:
        scheduler.stop()
    assert run.returncode == 0, run.stderr[-4000:]
    [samples_file] = out.glob("*/*_samples_tiny_images.jsonl")
    served = _answers(json.loads(line) for line in samples_file.read_text().splitlines())
    assert not any(a.startswith("[LMMS_EVAL_REQUEST_FAILED") for a in served.values()), served

    from allava_jax.eval.runner import evaluate

    ours = evaluate(None, ["tiny_images"], include_path=str(tasks), include_defaults=False, engine=engine, log_samples=True)
    assert served == _answers(ours["samples"]["tiny_images"]) and len(served) == len(docs)
    assert served[1] != served[2]  # the second image reaches the model


def _answers(samples) -> dict[int, str]:
    """doc_id -> the answer lmms-eval recorded (its filtered response)."""
    answers = {}
    for s in samples:
        r = s["filtered_resps"]
        answers[s["doc_id"]] = r[0] if isinstance(r, list) else r
    return answers
