"""What clients rely on from the server (the openai SDK, lmms-eval's `openai` model, vLLM's
`bench serve`): n, seed, logprobs, stop rules, streaming chunks, several images, /metrics, and a
4xx with an OpenAI error body for everything refused. One server for the whole module.

The random tiny model never emits EOS, so its engine here also stops at the character "7": the
greedy answer to ``SAY_YES`` is "dEA" and then "7" (asserted), which shows the stop-token rules.
"""

from __future__ import annotations

import base64
import threading
import time

import httpx
import jax
import numpy as np
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from allava_jax import checkpoints
from allava_jax.infer import media
from allava_jax.infer import openai_api as api
from allava_jax.infer.engine import Engine, Prompt
from allava_jax.infer.loading import load_engine
from allava_jax.infer.prompts import single_turn
from allava_jax.infer.sampling import SamplingParams
from allava_jax.infer.scheduler import DECODE_STEPS, Scheduler
from allava_jax.infer.server import create_app
from allava_jax.models import Llava
from infer_fixtures import png_bytes, serving, shared_checkpoint

MODEL = "tiny-allava"
SAY_YES = "Say yes."
MAX_TOKENS = 24
LIMITS = api.ServerLimits(max_images=2, max_new_tokens=MAX_TOKENS, max_n=4)
REFERENCE_LEN = 96


@pytest.fixture(scope="module")
def engine() -> Engine:
    base = load_engine(shared_checkpoint())
    seven = base.tokenizer.convert_tokens_to_ids("7")
    return Engine(base.config, base.params, base.tokenizer, stop_token_ids=(base.eos_id, seven))


@pytest.fixture(scope="module")
def scheduler(engine):
    scheduler = Scheduler(engine, max_batch=4, max_len=128).start()
    yield scheduler
    scheduler.stop()


@pytest.fixture(scope="module")
def server(scheduler):
    with serving(create_app(scheduler, MODEL, LIMITS)) as url:
        yield url


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model_logprobs(engine):
    """log_softmax of the model's logits by one plain forward pass over prompt + answer (no cache,
    no sampling code): row j is the distribution the answer's token j was drawn from. Inputs are
    padded to one shape (causal attention: the padding changes nothing before it), so one compile."""
    model = Llava(engine.config)
    forward = jax.jit(lambda params, tokens, images, mask: jax.nn.log_softmax(
        model.apply({"params": params}, tokens, images, mask), axis=-1))
    size = engine.config.vision.image_size
    params = checkpoints.load_params(shared_checkpoint())  # the checkpoint's tree (the engine splits the layers)

    def logprobs(prompt: Prompt, answer: list[int]) -> np.ndarray:
        ids = prompt.ids + answer[:-1]
        assert len(ids) <= REFERENCE_LEN
        tokens = np.zeros((1, REFERENCE_LEN), np.int32)
        tokens[0, : len(ids)] = ids
        images, mask = np.zeros((1, LIMITS.max_images, size, size, 3), np.float32), np.zeros((1, LIMITS.max_images), bool)
        images[0, : prompt.num_images], mask[0, : prompt.num_images] = prompt.images, True
        return np.asarray(forward(params, tokens, images, mask))[0, len(prompt.ids) - 1 : len(ids)]

    return logprobs


def _url(seed: int) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(seed)).decode()


def _image(seed: int) -> dict:
    return {"type": "image_url", "image_url": {"url": _url(seed)}}


def _pixels(engine: Engine, *seeds: int) -> np.ndarray:
    return np.stack([media.load_pixels(png_bytes(s), engine.config.vision.image_size) for s in seeds])


def _text_prompt(engine: Engine, text: str) -> Prompt:
    return engine.prompt([(text, None)])


def _user(text: str) -> list:
    return [{"role": "user", "content": text}]


def _texts_by_choice(chunks: list) -> dict[int, str]:
    texts: dict[int, str] = {}
    for chunk in chunks:
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
    return texts


def test_n_choices_with_a_seed_are_reproducible(client, engine):
    """Choice i samples with seed + i (vLLM's rule), whatever else shares the batch."""
    kw = dict(model=MODEL, messages=_user("Tell me more."), max_tokens=8, temperature=1.5, n=3, seed=11,
              extra_body={"ignore_eos": True})
    first, again = client.chat.completions.create(**kw), client.chat.completions.create(**kw)
    texts = [c.message.content for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert texts == [c.message.content for c in again.choices] and len(set(texts)) > 1
    prompt = _text_prompt(engine, "Tell me more.")
    alone = engine.generate([prompt] * 3, [SamplingParams(8, 1.5, seed=11 + i, ignore_eos=True) for i in range(3)])
    assert texts == [c.text for c in alone]
    assert first.usage.completion_tokens == 3 * 8 and first.usage.prompt_tokens == len(prompt.ids)

    chunks = list(client.chat.completions.create(**kw, stream=True))
    assert _texts_by_choice(chunks) == dict(enumerate(texts))
    for i in range(3):  # each choice's first chunk carries the role and its first text
        head = next(c.choices[0] for c in chunks if c.choices and c.choices[0].index == i)
        assert head.delta.role == "assistant" and head.delta.content

    unseeded = [[c.message.content for c in client.chat.completions.create(**{**kw, "seed": None}).choices] for _ in range(2)]
    assert unseeded[0] != unseeded[1]  # without a seed the server draws one


def test_logprobs_are_the_model_log_softmax(client, engine, model_logprobs):
    """Chosen and top logprobs equal the raw model distribution's (before temperature, top-k/p)
    within 1e-5, greedy and sampled, streamed (one entry per token of each chunk) and not."""
    greedy = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": [_image(3), {"type": "text", "text": "What is it?"}]}],
        max_completion_tokens=10, logprobs=True, top_logprobs=4, extra_body={"return_tokens_as_token_ids": True})
    entries = greedy.choices[0].logprobs.content
    assert len(entries) == greedy.usage.completion_tokens > 1
    _check_logprobs(entries, model_logprobs(engine.prompt(single_turn("What is it?", 1), _pixels(engine, 3)),
                                            [int(e.token.split(":")[1]) for e in entries]), 4, greedy=True)

    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": [_image(1), _image(2), {"type": "text", "text": "Compare."}]}],
        max_tokens=12, temperature=1.7, top_p=0.9, seed=5, logprobs=True, top_logprobs=3, stream=True,
        stream_options={"include_usage": True}, extra_body={"top_k": 10, "return_tokens_as_token_ids": True, "ignore_eos": True})
    chunks = list(stream)
    per_chunk = [c.choices[0].logprobs.content for c in chunks if c.choices and c.choices[0].logprobs]
    sizes = [len(x) for x in per_chunk]  # the prefill's token, then up to one decode chunk per event
    assert sum(sizes) == 12 == chunks[-1].usage.completion_tokens and sizes[0] == 1 and max(sizes) <= DECODE_STEPS
    entries = [e for x in per_chunk for e in x]
    answer = [int(e.token.split(":")[1]) for e in entries]
    _check_logprobs(entries, model_logprobs(engine.prompt(single_turn("Compare.", 2), _pixels(engine, 1, 2)), answer), 3, greedy=False)
    assert len(set(answer)) > 2

    plain = client.chat.completions.create(model=MODEL, messages=_user(SAY_YES), max_tokens=6, logprobs=True,
                                           extra_body={"ignore_eos": True})
    tokens = [e.token for e in plain.choices[0].logprobs.content]
    assert all(e.bytes == list(e.token.encode()) and e.top_logprobs == [] for e in plain.choices[0].logprobs.content)
    assert "".join(tokens).strip() == plain.choices[0].message.content and len(tokens) == 6


def _check_logprobs(entries: list, reference: np.ndarray, k: int, *, greedy: bool) -> None:
    for j, e in enumerate(entries):
        token = int(e.token.split(":")[1])
        row = reference[j]
        assert abs(e.logprob - row[token]) < 1e-5, j
        best = np.argsort(-row)[:k]
        assert [int(t.token.split(":")[1]) for t in e.top_logprobs] == best.tolist()
        assert np.abs(np.asarray([t.logprob for t in e.top_logprobs]) - row[best]).max() < 1e-5
        if greedy:
            assert token == int(best[0])


def test_streaming_chunks_first_content_then_usage(client):
    """No role-only chunk: the first chunk holds text; include_usage adds a last chunk with no choices."""
    kw = dict(model=MODEL, messages=_user("Tell me more."), max_tokens=9, stream=True, extra_body={"ignore_eos": True})
    chunks = list(client.chat.completions.create(**kw, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content
    assert all(c.choices[0].delta.role is None for c in chunks[1:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 9
    assert chunks[-2].choices[0].finish_reason == "length" and all(c.usage is None for c in chunks[:-1])
    plain = list(client.chat.completions.create(**kw))
    assert all(c.choices and c.usage is None for c in plain)
    assert _texts_by_choice(plain) == _texts_by_choice(chunks)


def test_stop_tokens_stop_strings_min_tokens_ignore_eos(client, engine):
    prompt = _text_prompt(engine, SAY_YES)

    def ask(**kw):
        r = client.chat.completions.create(model=MODEL, messages=_user(SAY_YES), **{"max_tokens": 12, **kw})
        return r.choices[0].message.content, r.choices[0].finish_reason, r.usage.completion_tokens

    def expect(max_new_tokens: int = 12, **kw) -> str:
        return engine.generate([prompt], SamplingParams(max_new_tokens, **kw))[0].text

    assert ask() == ("dEA", "stop", 4)  # three tokens, then the stop token (counted, as vLLM does)
    assert ask(stop="A") == ask(stop=["zz", "A"]) == ("dE", "stop", 3)
    banned = ask(extra_body={"min_tokens": 6})  # stop tokens banned for 6 tokens
    assert banned[0] == expect(min_tokens=6) and len(banned[0]) > 3 and banned[0].startswith("dEA")
    late = ask(stop="A", extra_body={"min_tokens": 4})  # an "A" within the first 4 tokens does not count
    assert late[0] == expect(stop=("A",), min_tokens=4) and len(late[0]) > 2
    ignored = ask(max_tokens=9, extra_body={"ignore_eos": True})
    assert ignored == (expect(9, ignore_eos=True), "length", 9) and "7" in ignored[0]
    assert ask(max_completion_tokens=2)[2] == 2  # max_completion_tokens wins over max_tokens


def test_images_anywhere_among_text_parts(client, engine, model_logprobs):
    """lmms-eval's [images..., text] and text/image interleavings: each image stands in its place
    (the answer's logprobs are those of the prompt so built, and not of the images swapped)."""
    def logprobs(content: list) -> tuple[list[int], np.ndarray]:
        r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}], max_tokens=4,
                                           logprobs=True, extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True})
        entries = r.choices[0].logprobs.content
        return [int(e.token.split(":")[1]) for e in entries], np.asarray([e.logprob for e in entries])

    def model(text: str, seeds: tuple, answer: list[int]) -> np.ndarray:
        rows = model_logprobs(engine.prompt([(text, None)], _pixels(engine, *seeds)), answer)
        return rows[np.arange(len(answer)), answer]

    for content, text, seeds in (
        ([_image(1), _image(2), {"type": "text", "text": "Compare."}], "<image>\n<image>\nCompare.", (1, 2)),
        ([{"type": "text", "text": "Left:"}, _image(2), {"type": "text", "text": " right:"}, _image(1)],
         "Left:<image>\n right:<image>\n", (2, 1)),
    ):
        answer, got = logprobs(content)
        assert np.abs(got - model(text, seeds, answer)).max() < 1e-5
        assert np.abs(got - model(text, seeds[::-1], answer)).max() > 1e-3


def test_metrics_in_prometheus_text_format(client, server, scheduler, engine):
    label = (("model_name", MODEL),)

    def scrape() -> dict:
        text = httpx.get(server.removesuffix("/v1") + "/metrics").text
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    before = scrape()
    r = client.chat.completions.create(model=MODEL, messages=_user("Tell me more."), max_tokens=7, extra_body={"ignore_eos": True})
    after = scrape()

    def grew(name: str) -> float:
        return after[(name, label)] - before[(name, label)]

    assert grew("allava:generation_tokens_total") == r.usage.completion_tokens == 7
    assert grew("allava:prompt_tokens_total") == r.usage.prompt_tokens
    assert grew("allava:time_to_first_token_seconds_count") == 1
    assert grew("allava:inter_token_latency_seconds_count") == 6
    assert after[("allava:time_to_first_token_seconds_bucket", (("le", "+Inf"),) + label)] >= 1
    assert after[("allava:num_requests_running", label)] == 0 == after[("allava:num_requests_waiting", label)]

    # Hold the scheduler inside its first token's hand-off: one sequence runs, the next one waits.
    release, done = threading.Event(), threading.Event()

    def held(event) -> None:
        release.wait(60)
        if event.finish_reason:
            done.set()

    prompt = _text_prompt(engine, "hi")
    try:
        scheduler.submit(prompt, SamplingParams(max_new_tokens=2), held)
        while not any(scheduler.slots):  # in its slot, the scheduler blocked in ``held``
            time.sleep(0.01)
        scheduler.submit(prompt, SamplingParams(max_new_tokens=2), lambda e: None)
        now = scrape()
        assert now[("allava:num_requests_running", label)] == 1 == now[("allava:num_requests_waiting", label)]
    finally:
        release.set()
    assert done.wait(60)


REFUSED = [  # (request fields, param named in the error, words in its message)
    ({"n": 5}, "n", "n=5 is out of range"),
    ({"n": "2"}, "n", "must be an integer"),
    ({"max_tokens": 0}, "max_tokens", "out of range"),
    ({"max_completion_tokens": MAX_TOKENS + 1}, "max_completion_tokens", "out of range"),
    ({"temperature": "hot"}, "temperature", "must be a number"),
    ({"temperature": 2.5}, "temperature", "out of range"),
    ({"top_p": 0}, "top_p", "out of range"),
    ({"seed": 1.5}, "seed", "must be an integer"),
    ({"stop": 7}, "stop", "a string or a list"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "up to 4"),
    ({"logprobs": "yes"}, "logprobs", "must be a boolean"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", "out of range"),
    ({"top_logprobs": 2}, "top_logprobs", "needs logprobs=true"),
    ({"stream_options": {"include_usage": True}}, "stream_options", "only allowed with stream=true"),
    ({"extra_body": {"top_k": -2}}, "top_k", "out of range"),
    ({"extra_body": {"min_tokens": -1}}, "min_tokens", "out of range"),
    ({"max_tokens": 4, "extra_body": {"min_tokens": 5}}, "min_tokens", "out of range"),
    ({"extra_body": {"ignore_eos": "no"}}, "ignore_eos", "must be a boolean"),
    ({"presence_penalty": 0.5}, "presence_penalty", "not supported"),
    ({"logit_bias": {"5": 10}}, "logit_bias", "not supported"),
    ({"response_format": {"type": "json_object"}}, "response_format", "not supported"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "not supported"),
    ({"messages": [{"role": "user", "content": [_image(0), _image(1), _image(2)]}]}, "messages", "too many images"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]}, "messages", "unsupported type"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, "messages", "must be a string"),
    ({"messages": []}, "messages", "non-empty list"),
]


def test_refused_requests_get_openai_errors(client, server):
    for fields in REFUSED:
        kw = {"model": MODEL, "messages": _user("hi"), "max_tokens": 3, **fields[0]}
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(**kw)
        assert (e.value.status_code, e.value.type, e.value.param) == (400, "invalid_request_error", fields[1]), fields
        assert fields[2] in e.value.message, (fields, e.value.message)
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=_user("hi"))
    assert e.value.code == "model_not_found"
    nan = httpx.post(server + "/chat/completions", headers={"content-type": "application/json"},  # Python's JSON reads NaN
                     content=f'{{"model": "{MODEL}", "messages": [{{"role": "user", "content": "hi"}}], "temperature": NaN}}')
    assert nan.status_code == 400 and nan.json()["error"]["param"] == "temperature"
    for method, path, status in (("GET", "/v1/nowhere", 404), ("POST", "/v1/models", 405)):
        r = httpx.request(method, server.removesuffix("/v1") + path)
        assert r.status_code == status and r.json()["error"]["type"] == "invalid_request_error"
    assert client.chat.completions.create(model=MODEL, messages=_user("hi"), max_tokens=2).usage.completion_tokens <= 2
