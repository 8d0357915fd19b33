"""KV-cache generation: parity with transformers' generate, batching, sampling, stops, CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cli_env import cli_env
from allava_jax.data import templates
import torch
import transformers

from allava_jax import checkpoints
from allava_jax.convert import configs as conf
from allava_jax.convert import hf
from allava_jax.infer import media
from allava_jax.infer.engine import Engine, Prompt
from allava_jax.infer.loading import load_engine
from allava_jax.infer.prompts import PromptError, encode_generation_prompt, render_generation_prompt, single_turn
from allava_jax.infer.sampling import SamplingParams, first_argmax
from allava_jax.infer.stream import TextStream
from infer_fixtures import png_bytes, shared_checkpoint

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoint() -> Path:
    return shared_checkpoint()


@pytest.fixture(scope="module")
def engine(checkpoint) -> Engine:
    return load_engine(checkpoint)


def _prompt(engine: Engine, question: str, image_seed: int | None = None) -> Prompt:
    c = engine.config
    n = 0 if image_seed is None else 1
    ids = encode_generation_prompt(engine.tokenizer, single_turn(question, n), n, image_token_id=c.image_token_id, num_image_tokens=c.num_image_tokens)
    images = None if n == 0 else media.load_pixels(png_bytes(image_seed), c.vision.image_size)[None]
    return Prompt(ids, images)


def _hf_llava(engine: Engine) -> transformers.LlavaForConditionalGeneration:
    """Our params exported into an in-memory transformers Llava (what `convert export` writes)."""
    d = conf.llava_to_hf(engine.config)
    cfg = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(**d["vision_config"]),
        text_config=transformers.PhiConfig(**d["text_config"]),
        image_token_index=d["image_token_index"],
        image_seq_length=d["image_seq_length"],
        vision_feature_layer=d["vision_feature_layer"],
        vision_feature_select_strategy=d["vision_feature_select_strategy"],
    )
    model = transformers.LlavaForConditionalGeneration(cfg).eval()
    params = checkpoints.load_params(shared_checkpoint())  # the checkpoint's tree (the engine splits the layers)
    state = {name: torch.from_numpy(np.array(t)) for name, t in hf.export_tensors(params, engine.config, hf.HF_LLAVA)}
    model.load_state_dict(state, strict=True)
    return model


def test_prompt_matches_allava_template(engine):
    rounds = single_turn("What is it?", 1)
    text = "".join("<image>" if p.kind == "image" else p.text for p in render_generation_prompt(rounds, 1))
    assert text.startswith("[INST] <image>\nWhat is it? [/INST] ")  # then the probe answer
    # The prompt is exactly the training ids before the answer's first token (for every answer).
    tok, cfg = engine.tokenizer, engine.config
    two = [("<image>\nhi", "yo"), ("and?", None)]
    for answer in ("The answer is 42.", "yes", "Looking closely, no."):
        parts = templates.render([("<image>\nhi", "yo"), ("and?", answer)], "allava", 1)
        full, assistant, _ = templates.tokenize_parts(
            parts, tok, eos_id=engine.eos_id, image_token_id=cfg.image_token_id, num_image_tokens=4
        )
        prompt = encode_generation_prompt(tok, two, 1, image_token_id=cfg.image_token_id, num_image_tokens=4)
        assert full[: len(prompt)].tolist() == prompt
        assert assistant[len(prompt)] and not assistant[len(prompt) - 1]
    ids = _prompt(engine, "What is it?", 0).ids
    assert ids.count(engine.config.image_token_id) == engine.config.num_image_tokens
    assert engine.eos_id in encode_generation_prompt(
        engine.tokenizer, two, 1, image_token_id=engine.config.image_token_id, num_image_tokens=4
    )
    with pytest.raises(PromptError):
        render_generation_prompt([("<image>\nhi", None)], 0)


def _transformers_greedy(model, engine: Engine, prompt: Prompt, max_new_tokens: int, stop_at_eos: bool = True) -> list[int]:
    """transformers' greedy ``generate`` of ``prompt`` (the image token banned, as ours bans it),
    cut before EOS; ``stop_at_eos=False`` generates through EOS (our ``ignore_eos``)."""
    eos = engine.eos_id
    kwargs = {}
    if prompt.images is not None:
        kwargs["pixel_values"] = torch.from_numpy(prompt.images.transpose(0, 3, 1, 2).copy())
    config = transformers.GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos if stop_at_eos else None, pad_token_id=eos,
        suppress_tokens=[engine.config.image_token_id],
    )
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor([prompt.ids]), attention_mask=torch.ones(1, len(prompt.ids), dtype=torch.long),
            generation_config=config, **kwargs,
        )
    theirs = out[0, len(prompt.ids) :].tolist()
    return theirs[: theirs.index(eos)] if stop_at_eos and eos in theirs else theirs


def test_greedy_equals_transformers_generate(engine):
    model = _hf_llava(engine)
    for question, image_seed in (("What is in the picture?", 3), ("Tell me a story.", None)):
        prompt = _prompt(engine, question, image_seed)
        ours = engine.generate([prompt], SamplingParams(max_new_tokens=24))[0]
        theirs = _transformers_greedy(model, engine, prompt, 24)
        assert ours.token_ids == theirs, question
        assert len(set(theirs)) > 2  # a real sequence, not a constant
        assert ours.text == engine.tokenizer.decode(theirs, skip_special_tokens=True).strip()  # as ALLaVA's chat()


def test_cache_grows_as_the_answer_does(engine, monkeypatch):
    """The cache starts a length bucket past the prompt and doubles when full, up to what
    ``max_new_tokens`` needs; the answer is transformers' (whose cache is never full)."""
    prompt = _prompt(engine, "Tell me a story.", None)
    assert len(prompt.ids) == 32  # the prompt bucket: 32 slots, then 128 steps for 100 tokens
    slots = []
    decode_chunk = engine.decode_chunk

    def spy(state, *args, **kwargs):
        slots.append(state["cache"][0]["self_attn"]["segment_ids"].shape[1])
        return decode_chunk(state, *args, **kwargs)

    monkeypatch.setattr(engine, "decode_chunk", spy)
    ours = engine.generate([prompt], SamplingParams(max_new_tokens=100, ignore_eos=True))[0]
    assert slots == [64, 128, 160]  # 32 + 16 -> 64; doubled; capped at 32 + 128
    assert ours.token_ids == _transformers_greedy(_hf_llava(engine), engine, prompt, 100, stop_at_eos=False)


def test_mixed_batch_equals_one_at_a_time(engine):
    prompts = [
        _prompt(engine, "Describe this image in detail please.", 1),
        _prompt(engine, "Hi", None),
        _prompt(engine, "Is it a cat?", 2),
        _prompt(engine, "A longer text-only question, to mix lengths in the batch.", None),
    ]
    sampling = [
        SamplingParams(max_new_tokens=12),
        SamplingParams(max_new_tokens=7),
        SamplingParams(max_new_tokens=16, temperature=0.9, top_p=0.8, seed=5),
        SamplingParams(max_new_tokens=12, temperature=1.3, top_k=5, seed=1),
    ]
    batched = engine.generate(prompts, sampling)
    alone = [engine.generate([p], s)[0] for p, s in zip(prompts, sampling)]
    assert [c.token_ids for c in batched] == [c.token_ids for c in alone]
    for c, s in zip(batched, sampling):  # EOS ends a row early, otherwise max_new_tokens does
        assert (c.finish_reason, len(c.token_ids) == s.max_new_tokens) in (("length", True), ("stop", False))
    assert sum(c.finish_reason == "length" for c in batched) >= 3


def test_sampling_options(engine):
    p = _prompt(engine, "Sample me.", 0)
    greedy = engine.generate([p], SamplingParams(max_new_tokens=16))[0].token_ids
    assert engine.generate([p], SamplingParams(max_new_tokens=16, temperature=1.0, top_k=1, seed=3))[0].token_ids == greedy
    assert engine.generate([p], SamplingParams(max_new_tokens=16, temperature=1.0, top_p=1e-6, seed=3))[0].token_ids == greedy
    hot = [engine.generate([p], SamplingParams(max_new_tokens=16, temperature=2.0, seed=s))[0].token_ids for s in (1, 1, 2)]
    assert hot[0] == hot[1] and hot[0] != hot[2] and hot[0] != greedy
    assert engine.config.image_token_id not in sum(hot, [])
    top3 = engine.generate([p] * 4, [SamplingParams(max_new_tokens=16, temperature=5.0, top_k=3, seed=s) for s in range(4)])
    free = engine.generate([p] * 4, [SamplingParams(max_new_tokens=16, temperature=5.0, seed=s) for s in range(4)])
    assert len({t for c in top3 for t in c.token_ids}) < len({t for c in free for t in c.token_ids})


@pytest.mark.parametrize("vocab", [51200, 32064, 100])
def test_first_argmax_equals_jnp_argmax(vocab):
    """Ties (first index wins), -inf rows, NaN, a vocabulary that is not a multiple of the chunk."""
    import jax.numpy as jnp

    rng = np.random.default_rng(vocab)
    x = rng.integers(-3, 4, (7, vocab)).astype(np.float32)  # many ties
    x[1] = -np.inf
    x[2, [5, vocab - 1]] = np.nan
    x[3, -1] = 9.0  # the maximum in the padded last chunk
    x[4, 0] = np.inf
    x[5, vocab // 2] = np.nan
    np.testing.assert_array_equal(np.asarray(first_argmax(jnp.asarray(x))), np.asarray(jnp.argmax(jnp.asarray(x), axis=-1)))


def test_decode_chunk_ends_after_the_step_where_interrupt_says_so(engine):
    """The server's early end of a chunk: ``interrupt`` is asked before every step after the
    first; the tokens of a cut chunk are those of the same steps run uninterrupted."""
    import jax.numpy as jnp

    from allava_jax.infer.engine import make_batch
    from allava_jax.infer.sampling import SamplingArrays

    p = _prompt(engine, "Interrupt me.", None)
    b, length, steps = 1, 32, 16
    batch = make_batch([p], b, length, engine.config.vision.image_size)
    arrays = SamplingArrays.from_params([SamplingParams(max_new_tokens=steps)], b)

    def chunk(interrupt):
        first, _, cache = engine.prefill(engine.params, batch.tokens, batch.images, batch.image_mask,
                                         batch.segment_ids, batch.positions, arrays, cache_len=length + steps)
        state = {"cache": cache, "token": first, "pos": jnp.asarray(batch.lengths), "live": jnp.ones((b,), bool),
                 "done": jnp.zeros((b,), bool), "out": jnp.zeros((b, steps), jnp.int32), "step": jnp.asarray(0, jnp.int32),
                 "generated": jnp.ones((b,), jnp.int32), "max_new": jnp.full((b,), 99, jnp.int32)}
        state = engine.decode_chunk(state, arrays, 8, interrupt)
        return int(state["step"]), np.asarray(state["out"])[0]

    asked = []

    def after_three():
        asked.append(1)
        return len(asked) >= 3

    n_full, full = chunk(None)
    n_cut, cut = chunk(after_three)
    n_now, now = chunk(lambda: True)
    assert (n_full, n_cut, n_now) == (8, 3, 1) and len(asked) == 3
    np.testing.assert_array_equal(cut[:3], full[:3])
    np.testing.assert_array_equal(now[:1], full[:1])


def test_prefill_and_interruptible_decode_compile_for_a_tpu_chip(engine, monkeypatch):
    """The server's programs, host callback in the decode loop's condition included, compile for
    one v5e chip with libtpu (compile only, no TPU here), from the arguments a real ``generate``
    passes."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import SingleDeviceSharding

    from allava_jax.train import compile as aot

    chip = SingleDeviceSharding(aot.tpu_target("v5e:2x2").devices[0])

    def on_chip(tree):
        def spec(a):  # Python ints as JAX takes them (int32)
            return jax.ShapeDtypeStruct(np.shape(a), a.dtype if hasattr(a, "dtype") else jnp.asarray(a).dtype, sharding=chip)
        return jax.tree.map(spec, tree)

    calls = {}

    def record(name, fn):
        def wrapped(*args, **kwargs):  # shapes before the call: decode_chunk donates its state
            calls[name] = (on_chip(args), kwargs)
            return fn(*args, **kwargs)
        return wrapped

    prefill_jit = engine.prefill
    monkeypatch.setattr(engine, "prefill", record("prefill", prefill_jit))
    monkeypatch.setattr(engine, "decode_chunk", record("decode_chunk", engine.decode_chunk))
    engine.generate([_prompt(engine, "Compile me.", 1)], SamplingParams(max_new_tokens=4))

    args, kwargs = calls["prefill"]
    prefill = prefill_jit.lower(*args, **kwargs).compile()
    state, arrays, n_steps = calls["decode_chunk"][0][:3]
    decode = engine._decode_chunk.lower(on_chip(engine.params), state, arrays, n_steps,
                                        interrupt=lambda: False).compile()
    for compiled in (prefill, decode):  # TPU code (XLA:CPU reports no code size)
        assert compiled.memory_analysis().generated_code_size_in_bytes > 0


def test_eos_stop_strings_and_max_new_tokens(checkpoint, engine):
    p = _prompt(engine, "Stop somewhere.", 1)
    full = engine.generate([p], SamplingParams(max_new_tokens=20))[0]
    assert full.finish_reason == "length" and len(full.token_ids) == 20
    # Stop ids (Phi-3 has several): pretend the 9th and the 6th generated tokens end an answer.
    other = Engine(engine.config, engine.params, engine.tokenizer, stop_token_ids=(full.token_ids[8], full.token_ids[5]))
    cut = other.generate([p], SamplingParams(max_new_tokens=20))[0]
    first = min(full.token_ids.index(t) for t in other.stop_ids)
    assert first <= 5 and cut.token_ids == full.token_ids[:first] and cut.finish_reason == "stop"
    # Stop string: a piece of the greedy text.
    needle = full.text[8:10]
    stopped = engine.generate([p], SamplingParams(max_new_tokens=20, stop=(needle, "never-there")))[0]
    assert stopped.text == full.text[: full.text.index(needle)].rstrip() and stopped.finish_reason == "stop"
    assert len(stopped.token_ids) <= 20
    with pytest.raises(ValueError, match="too long|at most"):
        engine.generate([Prompt([5] * engine.max_len)], SamplingParams(max_new_tokens=2))
    clipped = Engine(engine.config, engine.params, engine.tokenizer, max_len=len(p.ids) + 5)
    assert len(clipped.generate([p], SamplingParams(max_new_tokens=20))[0].token_ids) == 5


def test_load_engine_casts_and_splits_on_the_host(checkpoint, tmp_path, monkeypatch):
    """``load_engine`` makes one device copy, of the engine's params: when it splits the layers
    the checkpoint is on the host (on an accelerator, two copies of a model may not fit). The
    checkpoint is saved from device arrays, as training saves it (orbax restores those onto the
    device unless told otherwise)."""
    import gc

    import jax
    import jax.numpy as jnp

    from allava_jax.models import cached

    config, params = checkpoints.load_model(checkpoint)
    saved = checkpoints.save_model(tmp_path / "ckpt", jax.device_put(params), config,
                                   tokenizer_dir=checkpoints.tokenizer_path(checkpoint))
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(checkpoints.load_params(saved)))

    def device_bytes() -> int:
        return sum(a.nbytes for a in jax.live_arrays())

    del params
    gc.collect()
    before, on_device_at_split = device_bytes(), []
    split = cached.split_layers

    def spy(params):
        on_device_at_split.append(device_bytes() - before)
        return split(params)

    monkeypatch.setattr(cached, "split_layers", spy)
    loaded = load_engine(saved, dtype="bfloat16")
    assert on_device_at_split == [0]
    expected = split(jax.tree.map(lambda x: x.astype(jnp.bfloat16), checkpoints.load_params(checkpoint)))
    assert jax.tree.structure(loaded.params) == jax.tree.structure(expected)
    for got, want in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(expected)):
        assert got.dtype == jnp.bfloat16 and isinstance(got, jax.Array)
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


def test_lengths_in_one_bucket_compile_once(engine):
    e = Engine(engine.config, engine.params, engine.tokenizer)
    for q in ("What is it", "Why is it so?", "Colour of sky?"):  # all pad to 32 tokens
        e.generate([Prompt(_prompt(engine, q, None).ids)], SamplingParams(max_new_tokens=5 + len(q) % 4))
    assert e.prefill._cache_size() == 1
    assert e._decode_chunk._cache_size() == 1


def test_text_stream_holds_back_stop_prefixes(engine):
    tok = engine.tokenizer
    s = TextStream(tok, stop=("END",))
    shown = "".join(s.push(i) for i in tok.encode("abc EN", add_special_tokens=False))
    assert shown == "abc" and not s.stopped  # the space waits for a word after it (answers are stripped)
    shown += "".join(s.push(i) for i in tok.encode("Dxyz", add_special_tokens=False))
    assert s.stopped and shown + s.finish() == "abc"
    s = TextStream(tok)
    shown = "".join(s.push(i) for i in tok.encode(" a b ", add_special_tokens=False))
    assert shown + s.finish() == "a b" == s.text()


def test_generate_cli(checkpoint, engine, tmp_path):
    image = tmp_path / "cat.png"
    image.write_bytes(png_bytes(7))
    expected = engine.generate([_prompt(engine, "What is this?", 7)], SamplingParams(max_new_tokens=10))[0].text
    env = cli_env()
    cmd = [sys.executable, "-m", "allava_jax.generate", "--checkpoint", str(checkpoint), "--image", str(image),
           "--prompt", "What is this?", "--max-new-tokens", "10", "-v"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout == expected + "\n"
    assert "loaded" in out.stderr  # logs go to stderr, not stdout
    chat = subprocess.run(
        [sys.executable, "-m", "allava_jax.generate", "--checkpoint", str(checkpoint), "--chat", "--max-new-tokens", "4"],
        input="hello\nmore\n/exit\n", capture_output=True, text=True, env=env, cwd=ROOT, timeout=300,
    )
    assert chat.returncode == 0, chat.stderr
    assert len(chat.stdout.splitlines()) >= 2
    bad_cmd = [sys.executable, "-m", "allava_jax.generate", "--checkpoint", str(checkpoint), "--image", str(tmp_path / "missing.png"), "--prompt", "x"]
    bad = subprocess.run(bad_cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert bad.returncode == 2 and "cannot read image" in bad.stderr and bad.stdout == ""
