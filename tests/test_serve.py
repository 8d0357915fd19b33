"""The OpenAI-compatible server, through a real uvicorn on 127.0.0.1 and the official client."""

from __future__ import annotations

import base64
import concurrent.futures
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from cli_env import cli_env
from allava_jax.infer import openai_api as api
from allava_jax.infer.engine import Engine
from allava_jax.infer.loading import load_engine
from allava_jax.infer.sampling import SamplingParams
from allava_jax.infer.scheduler import Scheduler
from allava_jax.infer.server import create_app
from infer_fixtures import free_port, png_bytes, serving, shared_checkpoint

ROOT = Path(__file__).resolve().parents[1]
MODEL = "tiny-allava"
MAX_LEN = 96  # small, so the shared cache index wraps and the scheduler must shift it


def _data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def engine() -> Engine:
    return load_engine(shared_checkpoint())


@pytest.fixture(scope="module")
def server(engine):
    scheduler = Scheduler(engine, max_batch=4, max_len=MAX_LEN).start()
    app = create_app(scheduler, MODEL, api.ServerLimits(max_images=1, max_new_tokens=32))
    with serving(app) as url:
        yield scheduler, url
    scheduler.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[1], api_key="unused", max_retries=0, timeout=120)


def _expected(engine: Engine, messages: list, sampling: SamplingParams) -> str:
    """What `generate` answers for the same conversation (the server must agree)."""
    rounds, images = api.parse_messages(messages, api.ServerLimits(), engine.config.vision.image_size)
    return engine.generate([api.build_prompt(engine, rounds, images)], sampling)[0].text


def _image_message(text: str, seed: int) -> list:
    return [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": _data_url(png_bytes(seed))}},
        {"type": "text", "text": text},
    ]}]


def test_models_list(client):
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_text_and_image_answers_streaming_and_not(client, engine):
    text_msgs = [{"role": "user", "content": "Write a haiku."}]
    expected = _expected(engine, text_msgs, SamplingParams(max_new_tokens=12))
    r = client.chat.completions.create(model=MODEL, messages=text_msgs, max_tokens=12)
    assert r.choices[0].message.content == expected and expected
    assert r.choices[0].finish_reason in ("length", "stop")
    assert r.usage.completion_tokens <= 12 and r.usage.prompt_tokens > 0

    img_msgs = _image_message("What is shown here?", seed=11)
    expected = _expected(engine, img_msgs, SamplingParams(max_new_tokens=16))
    stream = client.chat.completions.create(model=MODEL, messages=img_msgs, max_tokens=16, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected and len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("length", "stop")
    assert chunks[-1].usage.completion_tokens <= 16

    sampled = SamplingParams(max_new_tokens=10, temperature=0.8, top_p=0.9, seed=42)
    r = client.chat.completions.create(model=MODEL, messages=img_msgs, max_tokens=10, temperature=0.8, top_p=0.9, seed=42)
    assert r.choices[0].message.content == _expected(engine, img_msgs, sampled)

    multi = [{"role": "system", "content": "Be brief."}, *img_msgs, {"role": "assistant", "content": "A picture."},
             {"role": "user", "content": "Say more."}]
    r = client.chat.completions.create(model=MODEL, messages=multi, max_tokens=8, stop=["zz"])
    assert r.choices[0].message.content == _expected(engine, multi, SamplingParams(max_new_tokens=8, stop=("zz",)))


def test_fifty_concurrent_requests_share_decode_steps(client, engine, server):
    scheduler = server[0]
    requests = []
    for i in range(50):
        n = 6 + i % 11  # different lengths so requests finish and join at different steps
        msgs = _image_message(f"Question {i}?", seed=i % 3) if i % 2 else [{"role": "user", "content": f"Tell me {i}" + "!" * (i % 7)}]
        requests.append((msgs, n))
    expected = [_expected(engine, m, SamplingParams(max_new_tokens=n)) for m, n in requests]
    steps_before, shifts_before, dispatches_before = scheduler.steps, scheduler.compactions, scheduler.dispatches

    def ask(i: int) -> tuple[str, int]:
        msgs, n = requests[i]
        if i % 5 == 0:  # some streaming, some not
            chunks = list(client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=n, stream=True))
            return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), -1
        r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=n)
        return r.choices[0].message.content, r.usage.completion_tokens

    with concurrent.futures.ThreadPoolExecutor(50) as pool:
        answers = list(pool.map(ask, range(50)))
    assert [a for a, _ in answers] == expected
    generated = sum(n for _, n in answers if n > 0)
    # 4 slots: far fewer decode steps than tokens, i.e. requests really were decoded together.
    assert scheduler.steps - steps_before < 0.5 * generated
    # Several decode steps per dispatch (the loop runs on the device between admissions).
    assert scheduler.dispatches - dispatches_before < 0.5 * (scheduler.steps - steps_before)
    assert scheduler.compactions > shifts_before  # the cache wrapped around and was compacted


def test_bad_requests_get_4xx_and_server_keeps_serving(client, server):
    good = [{"role": "user", "content": "ok?"}]
    cases = {
        "bad base64": _image_message("x", 0)[0] | {"content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@not base64@@@"}}]},
        "not an image": {"role": "user", "content": [{"type": "image_url", "image_url": {"url": _data_url(b"hello, I am text", "image/png")}}]},
        "too many images": {"role": "user", "content": _image_message("a", 0)[0]["content"] + _image_message("b", 1)[0]["content"]},
        "prompt too long": {"role": "user", "content": "long " * 40},
        "remote url": {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://example.com/cat.png"}}]},
        "bad role": {"role": "robot", "content": "hi"},
    }
    messages = {
        "bad base64": "not valid base64",
        "not an image": "not a usable image",
        "too many images": "too many images",
        "prompt too long": "too long",
        "remote url": "remote image URLs are disabled",
        "bad role": "unsupported role",
    }
    for name, msg in cases.items():
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=MODEL, messages=[msg], max_tokens=4)
        assert e.value.status_code == 400 and messages[name] in e.value.message, name
        assert client.chat.completions.create(model=MODEL, messages=good, max_tokens=3).choices[0].message.content is not None
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-4o", messages=good, max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model=MODEL, messages=good, temperature=-1)
    raw = httpx.post(server[1] + "/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert raw.status_code == 400 and "not valid JSON" in raw.json()["error"]["message"]
    r = client.chat.completions.create(model=MODEL, messages=good, max_tokens=3)
    assert r.choices[0].finish_reason in ("length", "stop")


def test_serve_cli_binds_localhost(tmp_path):
    port = free_port()
    env = cli_env()
    cmd = [sys.executable, "-m", "allava_jax.serve", "--checkpoint", str(shared_checkpoint()), "--port", str(port),
           "--model-name", "m", "--max-tokens", "4"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    try:
        deadline = time.time() + 240
        while True:
            assert proc.poll() is None, proc.stdout.read()
            assert time.time() < deadline, "server did not come up"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        r = c.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        assert r.usage.completion_tokens <= 4
        listening = subprocess.run(["ss", "-ltn"], capture_output=True, text=True).stdout
        assert f"127.0.0.1:{port}" in listening and f"0.0.0.0:{port}" not in listening
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.parametrize("d,capacity", [(-3, 8), (0, 8), (2, 4), (5, 12), (0, 16)])
def test_cache_move_shifts_and_resizes_every_row(d, capacity):
    """``move_cache`` (the scheduler's compaction and resizing, ``generate``'s growth) against the
    plain definition: slot j of the result holds old slot j + d where that exists, padding (0)
    elsewhere; the write index moves by -d."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from allava_jax.models.cached import move_cache

    rng = np.random.default_rng(0)
    old = tuple({"key": rng.standard_normal((3, 2, 8, 4)).astype(np.float32),  # [rows, heads, slots, dim]
                 "segment_ids": rng.integers(1, 5, (3, 8)).astype(np.int32), "index": np.int32(6)} for _ in range(2))
    new = move_cache(jax.tree.map(jnp.asarray, old), jnp.asarray(d, jnp.int32), capacity)
    for layer_old, layer_new in zip(old, new):
        for name, axis in (("key", 2), ("segment_ids", 1)):
            x, y = layer_old[name], np.asarray(layer_new[name])
            assert y.shape[axis] == capacity
            for j in range(capacity):
                src = j + d
                want = x.take(src, axis) if 0 <= src < x.shape[axis] else np.zeros_like(x.take(0, axis))
                np.testing.assert_array_equal(y.take(j, axis), want)
        assert int(layer_new["index"]) == 6 - d
