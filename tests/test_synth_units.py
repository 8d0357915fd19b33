"""Synthesis building blocks: journal, records, prompts, prices/estimates, limiter, images, redaction."""

import base64
import io
import json
import logging

import pytest
from PIL import Image

from allava_jax.synth import prompts as P
from allava_jax.synth.items import Item, jpeg_data_url, laion_from_manifest, text_from_questions, vflan_from_records
from allava_jax.synth.journal import Journal
from allava_jax.synth.limits import TokenBucket
from allava_jax.synth.records import CAPTION_FILE, INSTRUCT_FILE, TEXT_FILE, build_records, export
from allava_jax.synth.redact import RedactingFormatter, redact, register_secret
from allava_jax.synth.usage import Price, image_tokens, load_price


def test_journal_torn_last_line_is_ignored_and_cut(tmp_path):
    path = tmp_path / "journal.jsonl"
    with Journal(path) as j:
        j.append({"k": "done", "id": "a", "result": {"answer": "x"}, "usage": {"prompt_tokens": 3, "completion_tokens": 4}, "cost": 0.5})
    with open(path, "ab") as f:
        f.write(b'{"k": "done", "id": "b", "res')  # killed mid-write
    with Journal(path) as j:
        assert set(j.state.done) == {"a"} and j.state.totals.cost == 0.5
        j.append({"k": "done", "id": "c", "result": {"answer": "y"}})
    lines = path.read_text().splitlines()
    assert [json.loads(ln)["id"] for ln in lines] == ["a", "c"]  # the torn bytes are gone, c is on its own line


def test_journal_torn_line_with_newline_but_bad_json(tmp_path):
    path = tmp_path / "journal.jsonl"
    path.write_text('{"k": "done", "id": "a", "result": {}}\n{"k": "do\n')
    with Journal(path) as j:
        assert set(j.state.done) == {"a"}


def test_journal_corrupt_middle_line_is_an_error(tmp_path):
    path = tmp_path / "journal.jsonl"
    path.write_text('{"k": "done", "id": "a", "result": {}}\nnot json\n{"k": "done", "id": "b", "result": {}}\n')
    with pytest.raises(RuntimeError, match="corrupt"):
        Journal(path)


def test_journal_is_exclusive(tmp_path):
    with Journal(tmp_path / "j.jsonl"):
        with pytest.raises(RuntimeError, match="locked"):
            Journal(tmp_path / "j.jsonl")


def test_journal_state_semantics(tmp_path):
    with Journal(tmp_path / "j.jsonl") as j:
        j.append({"k": "bad", "id": "a", "reason": "r", "raw": "x", "usage": {"prompt_tokens": 1}, "cost": 0.1})
        j.append({"k": "failed", "id": "a", "reason": "r", "retryable": False})
        j.append({"k": "failed", "id": "b", "reason": "429", "retryable": True})
        st = j.state
        assert st.finished("a") and not st.finished("a", retry_failed=True)
        assert not st.finished("b")  # an unpaid transient failure is retried by a later run
        assert st.bad["a"] == 0 and st.totals.requests == 1
        j.append({"k": "done", "id": "b", "result": {"answer": "z"}})
        assert "b" not in st.failed and st.finished("b")


def test_records_match_allava_layout(tmp_path):
    item = Item(id="100277305", image="allava_laion/images/100277305.jpeg",
                extra={"original_caption": "a bike", "url": "http://x/1.jpg"})
    result = {"caption": "Cap.", "caption_instruction": "Describe the image in detail.", "answer": "Ans.",
              "questions": ["q1", "q2", "q3", "q4", "q5"], "question_number": 2, "question": "q2"}
    recs = build_records("laion", item, result)
    assert recs[CAPTION_FILE] == {
        "id": "100277305", "image": "allava_laion/images/100277305.jpeg",
        "conversations": [{"from": "human", "value": "<image>\nDescribe the image in detail."},
                          {"from": "gpt", "value": "Cap."}],
        "original_caption": "a bike", "url": "http://x/1.jpg"}
    assert recs[INSTRUCT_FILE]["id"] == "100277305"
    assert recs[INSTRUCT_FILE]["conversations"] == [{"from": "human", "value": "<image>\nq2"},
                                                    {"from": "gpt", "value": "Ans."}]
    v = build_records("vflan", Item(id="v1", image="v/1.jpg", instruction="Count the cars."),
                      {"caption": "C", "caption_instruction": "D", "answer": "3"})
    assert v[INSTRUCT_FILE]["conversations"][0]["value"] == "<image>\nCount the cars."
    assert "original_caption" not in v[CAPTION_FILE]
    t = build_records("text", Item(id="7", instruction="Why?"), {"answer": "Because."})
    assert t == {TEXT_FILE: {"idx": "7", "conversations": [{"from": "human", "value": "Why?"},
                                                          {"from": "gpt", "value": "Because."}]}}


def test_export_writes_input_order_and_failures(tmp_path):
    items = [Item(id=str(i), instruction=f"q{i}") for i in range(4)]
    with Journal(tmp_path / "j.jsonl") as j:
        for i in (3, 0):
            j.append({"k": "done", "id": str(i), "result": {"answer": f"a{i}"}})
        j.append({"k": "failed", "id": "1", "reason": "unusable output", "raw": "garbage"})
        counts = export(tmp_path, "text", items, j.state)
    assert counts == {TEXT_FILE: 2, "failures.jsonl": 1}
    assert [r["idx"] for r in json.loads((tmp_path / TEXT_FILE).read_text())] == ["0", "3"]
    fail = json.loads((tmp_path / "failures.jsonl").read_text())
    assert fail["id"] == "1" and fail["raw"] == "garbage" and fail["reason"] == "unusable output"


def test_inputs_readers(tmp_path):
    (tmp_path / "m.jsonl").write_text('{"id": 5, "image": "a.jpg", "caption": "orig", "url": "u"}\n')
    it = laion_from_manifest(tmp_path / "m.jsonl", prefix="allava_laion/")[0]
    assert it.id == "5" and it.image == "allava_laion/a.jpg" and it.image_path == tmp_path / "a.jpg"
    assert it.extra == {"original_caption": "orig", "url": "u"}
    (tmp_path / "v.json").write_text(json.dumps([{"id": "v", "image": "b.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhat is shown?"}, {"from": "gpt", "value": "old"}]}]))
    assert vflan_from_records(tmp_path / "v.json", tmp_path / "imgs")[0].instruction == "What is shown?"
    (tmp_path / "q.json").write_text(json.dumps([{"idx": "e1", "instruction": "Sort a list."}]))
    assert text_from_questions(tmp_path / "q.json")[0] == Item(id="e1", instruction="Sort a list.")
    (tmp_path / "d.jsonl").write_text('{"idx": 1, "question": "a"}\n{"idx": 1, "question": "b"}\n')
    with pytest.raises(ValueError, match="duplicate"):
        text_from_questions(tmp_path / "d.jsonl")


def test_prompts_override_and_per_item_choices(tmp_path):
    default = P.load_prompts()
    assert "{question_number}" in default.laion and len(default.caption_instructions) >= 5
    (tmp_path / "text.txt").write_text("Answer briefly: {question}\n<answer>\n...\n</answer>\n")
    custom = P.load_prompts(tmp_path)
    assert custom.text.startswith("Answer briefly") and custom.laion == default.laion
    assert P.user_text(custom, "text", item_id="1", seed=0, instruction="Why?").startswith("Answer briefly: Why?")
    k = P.question_number(0, "img1")
    assert f"question number {k}" in P.user_text(default, "laion", item_id="img1", seed=0)
    assert {P.question_number(0, str(i)) for i in range(200)} == {1, 2, 3, 4, 5}
    assert P.question_number(0, "img1") == P.question_number(0, "img1")  # stable across runs
    (tmp_path / "laion.txt").write_text("Describe the image.")  # lacks the tags the parser needs
    with pytest.raises(ValueError, match="<caption>"):
        P.load_prompts(tmp_path)


def test_default_prompts_state_the_protocol():
    p = P.load_prompts()
    for phrase in ("five", "violence", "advertis", "privat", "discomfort", "gender", "unbiased", "only in what"):
        assert phrase in p.laion.lower(), phrase
    assert "inappropriate" in p.vflan and "decline" in p.vflan and "reasoning" in p.vflan


def test_prices_and_estimates(tmp_path):
    price = load_price("gpt-4o-2024-08-06")
    assert price == Price(2.5, 10.0, 0.5)
    assert load_price("gpt-4o-mini").input == 0.15  # longest prefix wins over gpt-4o
    assert load_price("my-local-model") is None
    assert load_price("anything", price_in=1.0, price_out=2.0).cost(1_000_000, 500_000) == pytest.approx(2.0)
    assert price.cost(1_000_000, 0, batch=True) == pytest.approx(1.25)
    assert image_tokens(1024, 1024) == 765 and image_tokens(512, 512) == 255 and image_tokens(4000, 10, "low") == 85


def test_token_bucket_waits_by_rate():
    now = [0.0]
    b = TokenBucket(600, clock=lambda: now[0])  # ten per second, holds one second's worth
    assert b.capacity == 10
    b.take(10)
    assert b.wait_time(1) == pytest.approx(0.1)
    now[0] += 0.05
    assert b.wait_time(1) == pytest.approx(0.05)
    now[0] += 100
    assert b.wait_time(10) == 0.0 and b.wait_time(1000) == 0.0  # oversize requests go once the bucket is full
    b.take(30)  # ... and push the level negative, so the average rate holds
    assert b.wait_time(1) == pytest.approx(2.1)


def test_images_downscaled_jpeg(tmp_path):
    Image.new("RGBA", (3000, 1000), (10, 20, 30, 128)).save(tmp_path / "a.png")
    url = jpeg_data_url(tmp_path / "a.png", max_side=1024)
    assert url.startswith("data:image/jpeg;base64,")
    im = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert im.format == "JPEG" and im.size == (1024, 341) and im.mode == "RGB"
    Image.new("L", (100, 50)).save(tmp_path / "b.png")
    im = Image.open(io.BytesIO(base64.b64decode(jpeg_data_url(tmp_path / "b.png", 1024).split(",", 1)[1])))
    assert im.size == (100, 50)  # never upscaled


def test_redaction_of_text_and_logs():
    register_secret("sk-unit-SECRET-123456")
    assert redact("key=sk-unit-SECRET-123456!") == "key=***!"
    rec = logging.LogRecord("x", logging.ERROR, __file__, 1, "bad key %s", ("sk-unit-SECRET-123456",), None)
    assert "SECRET" not in RedactingFormatter().format(rec)
