"""The pairwise judge (both orders, exact win / tie / loss rates, resume after kill -9 without
paying a judged pair twice) against a fake judge that prefers a known side and sometimes fails."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from judge_fixtures import JudgeState, make_judge_app

from allava_jax import storage
from allava_jax.eval import pairwise
from allava_jax.synth.fake_server import FakeServer

ROOT = Path(__file__).resolve().parents[1]
# (preference, count) -> the outcome both orders give: a position-biased judge ("first") flips
# with the order and so counts as a tie; "garbage" never gives a verdict and is reported failed.
PLAN = [("ours", 4), ("anchor", 3), ("first", 3), ("tie", 2)]


def _files(tmp_path: Path, plan=PLAN, garbage: int = 0) -> tuple[Path, Path, Path]:
    questions, ours, anchor = [], [], []
    n = 0
    for pref, count in plan + [("garbage", garbage)]:
        for _ in range(count):
            qid = f"q{n:03d}"
            questions.append({"question_id": qid, "text": f"Question {n} {{braces}} prefer:{pref}", "category": pref})
            ours.append({"question_id": qid, "text": f"OURS answer {n}"})
            anchor.append({"question_id": qid, "answer_id": f"a{n}", "model_id": "llama-2-7b-chat", "text": f"ANCHOR answer {n}"})
            n += 1
    paths = tmp_path / "questions.jsonl", tmp_path / "ours.jsonl", tmp_path / "anchor.jsonl"
    for path, rows in zip(paths, (questions, ours, anchor)):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths


def _expected(plan=PLAN) -> dict:
    counts = {"ours": "win", "anchor": "loss", "first": "tie", "tie": "tie"}
    n = sum(c for _, c in plan)
    out = {"win": 0, "tie": 0, "loss": 0}
    for pref, c in plan:
        out[counts[pref]] += c
    return {**out, "win_rate": round(out["win"] / n, 6), "tie_rate": round(out["tie"] / n, 6),
            "loss_rate": round(out["loss"] / n, 6), "judged": n}


@pytest.mark.parametrize("where", ["local", "gcs"])
def test_pairwise_rates_with_position_swap_faults_and_resume(tmp_path, monkeypatch, request, where):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-judge-key")
    # --out on a bucket (the GCS emulator): the judge journal is an AppendLog there.
    run = storage.as_path(request.getfixturevalue("gcs").bucket() + "/run" if where == "gcs" else tmp_path / "run")
    q_path, ours_path, anchor_path = _files(tmp_path, garbage=1)
    questions = pairwise.load_questions(q_path)
    ours, anchor = pairwise.load_answers(ours_path), pairwise.load_answers(anchor_path)
    state = JudgeState(fail_rate=0.15, malformed_rate=0.2, seed=3)
    with FakeServer(state, make_judge_app) as server:
        settings = pairwise.JudgeSettings(model="judge", base_url=server.url, concurrency=4, max_attempts=12,
                                          max_retries=10, timeout=30)
        summary = pairwise.judge(questions, ours, anchor, run, settings, progress=False)
        assert {k: summary[k] for k in _expected()} == _expected()
        assert summary["failed"] == 1 and summary["pending"] == 0 and summary["items"] == 13
        # Position bias shows in the per-order verdicts: "first" items say A in both orders.
        assert summary["verdicts"]["ours_first"] == {"A": 4 + 3, "B": 3, "C": 2}
        assert summary["verdicts"]["anchor_first"] == {"A": 3 + 3, "B": 4, "C": 2}
        assert sum(state.malformed.values()) > 0 and state.requests > sum(state.delivered.values())  # faults happened
        # Every pair with a verdict was paid for exactly once beside its malformed answers.
        rows = [json.loads(line) for line in (run / pairwise.RESULTS_FILE).read_text().splitlines()]
        for pair in pairwise.pairs(questions, ours, anchor):
            if "garbage" not in pair.question.text:
                assert state.delivered[pair.request_id] - state.malformed[pair.request_id] == 1
        by_id = {r["question_id"]: r for r in rows}
        assert by_id["q007"]["ours_first"]["verdict"] == "A" and by_id["q007"]["anchor_first"]["verdict"] == "A"
        assert by_id["q007"]["outcome"] == "tie" and by_id["q012"]["outcome"] == "failed"
        assert "no verdict" in by_id["q012"]["ours_first"]["error"]
        # A rerun requests nothing: every pair is finished.
        before = state.requests
        again = pairwise.judge(questions, ours, anchor, run, settings, progress=False)
        assert state.requests == before and {k: again[k] for k in _expected()} == _expected()
    assert "sk-test-judge-key" not in (run / pairwise.JOURNAL_FILE).read_text()


def test_cost_cap_stops_before_the_budget_is_passed(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "EMPTY")
    q_path, ours_path, anchor_path = _files(tmp_path)
    questions = pairwise.load_questions(q_path)
    ours, anchor = pairwise.load_answers(ours_path), pairwise.load_answers(anchor_path)
    price = pairwise.Price(1000.0, 1000.0)  # USD per 1M tokens: a 120-token answer costs $0.12
    with FakeServer(JudgeState(), make_judge_app) as server:
        settings = pairwise.JudgeSettings(model="judge", base_url=server.url, concurrency=2, max_tokens=100,
                                          max_cost=1.0, price=price)
        summary = pairwise.judge(questions, ours, anchor, tmp_path / "run", settings, progress=False)
    assert summary["stopped"] == "max_cost $1 reached" and summary["pending"] > 0
    assert 0 < summary["cost"] <= 1.0 and summary["requests"] < 2 * len(questions)


def test_kill_9_then_rerun_pays_no_judged_pair_twice(tmp_path):
    plan = [("ours", 6), ("anchor", 5), ("first", 4), ("tie", 3)]
    q_path, ours_path, anchor_path = _files(tmp_path, plan)
    state = JudgeState(latency=0.15, fail_rate=0.1, malformed_rate=0.1, seed=5)
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OPENAI_API_KEY": "EMPTY"}
    with FakeServer(state, make_judge_app) as server:
        cmd = [sys.executable, "-m", "allava_jax.eval", "pairwise", "--questions", str(q_path), "--anchor",
               str(anchor_path), "--answers", str(ours_path), "--out", str(out), "--judge-model", "judge",
               "--judge-base-url", server.url, "--concurrency", "2", "--max-attempts", "12", "--max-retries", "10",
               "--no-progress"]
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        journal = out / pairwise.JOURNAL_FILE
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if journal.exists() and journal.read_text().count('"k": "done"') >= 6:
                break
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        judged = {json.loads(line)["id"] for line in journal.read_text().splitlines()
                  if line.endswith("}") and json.loads(line)["k"] == "done"}
        total_pairs = 2 * sum(c for _, c in plan)
        assert 6 <= len(judged) < total_pairs
        paid_at_kill = {rid: state.delivered[rid] for rid in judged}

        rerun = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        summary = json.loads(rerun.stdout)
    assert {k: summary[k] for k in _expected(plan)} == _expected(plan)
    assert all(state.delivered[rid] == n for rid, n in paid_at_kill.items())  # nothing judged was asked again


def test_bad_inputs_name_file_and_line(tmp_path):
    bad = tmp_path / "q.jsonl"
    bad.write_text('{"question_id": 1, "text": "ok"}\n{"question_id": 2}\n')
    with pytest.raises(ValueError, match=r"q.jsonl:2: no question text"):
        pairwise.load_questions(bad)
    prompt = tmp_path / "prompt.json"
    prompt.write_text(json.dumps({"system": "judge [[A]]", "user": "{question} {answer_a}"}))
    with pytest.raises(ValueError, match=r"lacks \['\{answer_b\}'\]"):
        pairwise.load_prompt(prompt)
    assert pairwise.parse_verdict("so [[B]].") == "B"
    with pytest.raises(ValueError):
        pairwise.parse_verdict("[[A]] or maybe [[B]]")
    assert pairwise.outcome("A", "B") == "win" and pairwise.outcome("B", "A") == "loss"
    assert pairwise.outcome("A", "A") == "tie" and pairwise.outcome("A", "C") == "tie"


def test_our_answers_are_generated_in_the_chat_template_and_resume(tmp_path):
    from allava_jax.infer import media
    from allava_jax.infer.loading import load_engine
    from allava_jax.infer.prompts import single_turn
    from allava_jax.infer.sampling import SamplingParams
    from infer_fixtures import png_bytes, shared_checkpoint

    engine = load_engine(shared_checkpoint())
    (tmp_path / "cat.png").write_bytes(png_bytes(2))
    q_path = tmp_path / "q.jsonl"
    q_path.write_text(json.dumps({"question_id": 1, "text": "Tell me a story."}) + "\n"
                      + json.dumps({"question_id": 2, "question": "What is this?", "image": "cat.png"}) + "\n")
    questions = pairwise.load_questions(q_path)
    out = tmp_path / "answers.jsonl"
    answers = pairwise.generate_answers(engine, questions[:1], out, max_new_tokens=8)
    answers = pairwise.generate_answers(engine, questions, out, max_new_tokens=8)  # generates question 2 only
    assert len(out.read_text().splitlines()) == 2 and pairwise.load_answers(out) == answers
    pixels = media.load_file(tmp_path / "cat.png", engine.config.vision.image_size)[None]
    expected = [engine.generate([engine.prompt(single_turn("Tell me a story.", 0))], SamplingParams(max_new_tokens=8))[0].text,
                engine.generate([engine.prompt(single_turn("What is this?", 1), pixels)], SamplingParams(max_new_tokens=8))[0].text]
    assert [answers["1"], answers["2"]] == expected
