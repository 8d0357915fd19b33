"""Model behaviour: packing, KV cache, full-size shapes, bf16, config round trips."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from allava_jax.convert import configs as conf
from allava_jax.models import Llava, abstract_params, cached, get_preset, init_cache, init_params

CONFIG = get_preset("tiny")
IMG = CONFIG.image_token_id
N_IMG = CONFIG.num_image_tokens


@pytest.fixture(scope="module")
def params():
    # Larger-than-default init so that errors in masking would show in the logits.
    return _perturbed(init_params(CONFIG, jax.random.key(0)))


@jax.jit  # one program: leaf by leaf, each shape would compile its own random draw
def _perturbed(p):
    leaves, tree = jax.tree.flatten(p)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    return jax.tree.unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def _image(seed):
    return jax.random.normal(jax.random.key(seed), (CONFIG.vision.image_size,) * 2 + (3,))


def _example(seed, n_text, with_image):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, IMG, n_text).tolist()
    return ([IMG] * N_IMG + ids) if with_image else ids


_apply = jax.jit(Llava(CONFIG).apply)
_apply_cached = jax.jit(functools.partial(cached.forward, CONFIG))


def _forward(params, tokens, images, image_mask, segment_ids=None, positions=None):
    return _apply({"params": params}, jnp.asarray([tokens]), images, image_mask, segment_ids, positions)


def test_packed_row_equals_examples_run_alone(params):
    a, b, c = _example(1, 7, True), _example(2, 5, False), _example(3, 4, True)
    img_a, img_c = _image(10), _image(11)
    pad = 5
    tokens = a + b + c + [3] * pad
    segments = [1] * len(a) + [2] * len(b) + [3] * len(c) + [0] * pad
    positions = list(range(len(a))) + list(range(len(b))) + list(range(len(c))) + [0] * pad
    images = jnp.stack([img_a, img_c, jnp.zeros_like(img_a)])[None]  # M=3, last slot unused
    mask = jnp.asarray([[True, True, False]])
    packed = _forward(params, tokens, images, mask, jnp.asarray([segments]), jnp.asarray([positions]))[0]

    alone_a = _forward(params, a, img_a[None, None], jnp.ones((1, 1), bool))[0]
    alone_b = _forward(params, b, images[:, :1], jnp.zeros((1, 1), bool))[0]
    alone_c = _forward(params, c, img_c[None, None], jnp.ones((1, 1), bool))[0]
    starts = np.cumsum([0, len(a), len(b)])
    for alone, start in zip((alone_a, alone_b, alone_c), starts):
        got = packed[start : start + alone.shape[0]]
        np.testing.assert_allclose(np.asarray(got), np.asarray(alone), atol=1e-5, rtol=0)

    # Padding content and the unused image slot change nothing in the real tokens.
    tokens2 = a + b + c + [9] * pad
    images2 = images.at[0, 2].set(_image(99))
    packed2 = _forward(params, tokens2, images2, mask, jnp.asarray([segments]), jnp.asarray([positions]))[0]
    n_real = len(tokens) - pad
    np.testing.assert_array_equal(np.asarray(packed2[:n_real]), np.asarray(packed[:n_real]))


def _decode(params, cache, tokens, images, mask, segments, positions):
    return _apply_cached(cached.split_layers(params), cache, tokens, images, mask, segments, positions)


def test_kv_cache_prefill_then_decode_equals_full_forward(params):
    tokens = _example(4, 12, True)
    n_prompt = N_IMG + 4
    image, mask = _image(12)[None, None], jnp.ones((1, 1), bool)
    full = _forward(params, tokens, image, mask)[0]

    cache = init_cache(CONFIG, batch=1, max_len=32)
    ids = jnp.asarray([tokens])
    pos = jnp.arange(len(tokens))[None]
    seg = jnp.ones_like(ids)
    logits, cache = _decode(params, cache, ids[:, :n_prompt], image, mask, seg[:, :n_prompt], pos[:, :n_prompt])
    steps = [logits[0]]
    for t in range(n_prompt, len(tokens)):
        logits, cache = _decode(params, cache, ids[:, t : t + 1], None, None, seg[:, t : t + 1], pos[:, t : t + 1])
        steps.append(logits[0])
    np.testing.assert_allclose(np.asarray(jnp.concatenate(steps)), np.asarray(full), atol=1e-5, rtol=0)


def test_kv_cache_left_padded_batch_equals_one_at_a_time(params):
    short, long = _example(5, 3, False), _example(6, 9, False)
    width = len(long)
    rows = [[0] * (width - len(short)) + short, long]
    seg = jnp.asarray([[0] * (width - len(short)) + [1] * len(short), [1] * width])
    pos = jnp.asarray([[0] * (width - len(short)) + list(range(len(short))), list(range(width))])
    cache = init_cache(CONFIG, batch=2, max_len=width + 2)
    dummy = jnp.zeros((2, 1) + _image(0).shape)
    logits, cache = _decode(params, cache, jnp.asarray(rows), dummy, jnp.zeros((2, 1), bool), seg, pos)
    nxt = jnp.asarray([[5], [6]])
    step, _ = _decode(params, cache, nxt, None, None, jnp.ones((2, 1), jnp.int32), pos[:, -1:] + 1)
    for row, ids in enumerate((short, long)):
        alone = _forward(params, ids + [int(nxt[row, 0])], None, None)[0]
        np.testing.assert_allclose(np.asarray(logits[row, -1]), np.asarray(alone[-2]), atol=1e-5, rtol=0)
        np.testing.assert_allclose(np.asarray(step[row, 0]), np.asarray(alone[-1]), atol=1e-5, rtol=0)


def _count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_full_size_param_counts_match_transformers_on_meta_device():
    config = get_preset("phi2_clip336")
    shapes = nn.unbox(abstract_params(config))  # nothing allocated
    hf_cfg = conf.llava_to_hf(config)
    llava_cfg = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(**hf_cfg["vision_config"]),
        text_config=transformers.PhiConfig(**hf_cfg["text_config"]),
        image_token_index=config.image_token_id,
    )
    with torch.device("meta"):
        hf_llava = transformers.LlavaForConditionalGeneration(llava_cfg)
        hf_phi = transformers.PhiForCausalLM(transformers.PhiConfig(**hf_cfg["text_config"]))
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    expected = {
        "vision": n(hf_llava.model.vision_tower),
        "projector": n(hf_llava.model.multi_modal_projector),
        "llm": n(hf_phi),  # Phi-2's own head, with its bias
    }
    got = {part: _count(shapes[part]) for part in expected}
    assert got == expected
    assert 2.7e9 < got["llm"] < 2.8e9 and 3.0e8 < got["vision"] < 3.1e8
    assert got["projector"] == 1024 * 2560 + 2560 + 2560 * 2560 + 2560


BF16_REL_TOL = 2e-2  # stated bound: ||bf16 - fp32|| / ||fp32|| over the logits


def test_bf16_compute_stays_close_to_fp32(params):
    tokens = _example(7, 20, True)
    image, mask = _image(13)[None, None], jnp.ones((1, 1), bool)
    fp32 = _forward(params, tokens, image, mask)
    bf16 = Llava(dataclasses.replace(CONFIG, dtype="bfloat16")).apply({"params": params}, jnp.asarray([tokens]), image, mask)
    assert bf16.dtype == jnp.float32  # logits always come back in fp32
    rel = float(jnp.linalg.norm(bf16 - fp32) / jnp.linalg.norm(fp32))
    assert 0 < rel < BF16_REL_TOL, rel


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_policies_give_same_gradients(params, policy):
    tokens = jnp.asarray([_example(8, 10, True)])
    image, mask = _image(14)[None, None], jnp.ones((1, 1), bool)

    def loss(p, cfg):
        return Llava(cfg).apply({"params": p}, tokens, image, mask).mean()

    g0 = jax.jit(jax.grad(loss), static_argnums=1)(params, CONFIG)
    g1 = jax.jit(jax.grad(loss), static_argnums=1)(params, dataclasses.replace(CONFIG, remat_policy=policy))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), g0, g1)


@pytest.mark.parametrize("policy", ["none", "full"])
def test_unrolled_layers_equal_the_scan(params, policy):
    """scan_layers=False loops over the same stacked params: same logits and gradients (both
    towers, vision included), and init builds the same tree."""
    tokens = jnp.asarray([_example(9, 12, True)])
    image, mask = _image(15)[None, None], jnp.ones((1, 1), bool)
    unrolled = dataclasses.replace(CONFIG, scan_layers=False, remat_policy=policy)

    def loss(p, cfg):
        logits = Llava(cfg).apply({"params": p}, tokens, image, mask)
        return (logits * jnp.cos(jnp.arange(logits.shape[-1]))).mean(), logits

    (l0, y0), g0 = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)(params, CONFIG)
    (l1, y1), g1 = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)(params, unrolled)
    # Tolerances are fp32 summation-order bounds, which differ by CPU: the loss (a mean near zero)
    # is compared at the logits' scale, gradients at the whole gradient's scale (some leaves, such
    # as the key bias's, are exactly zero in exact arithmetic: only rounding noise is left there).
    np.testing.assert_allclose(y0, y1, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(l0, l1, rtol=0, atol=1e-5 * (1 + float(jnp.abs(y0).mean())))
    assert float(jnp.abs(g0["vision"]["layers"]["mlp"]["fc1"]["kernel"]).max()) > 0
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(g0))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale), g0, g1)
    shapes = lambda cfg: jax.tree.map(lambda x: x.shape, jax.eval_shape(lambda: init_params(cfg, jax.random.key(0))))
    assert shapes(unrolled) == shapes(CONFIG)


def test_every_param_has_logical_axes():
    boxed = abstract_params(CONFIG)
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
    for x in leaves:
        assert len(x.names) == len(x.value.shape)
    scanned = boxed["llm"]["layers"]["mlp"]["fc1"]["kernel"]
    assert scanned.names == ("layers", "embed", "mlp")


def test_config_round_trips_through_hf_and_json():
    config = get_preset("phi2_clip336")
    back = conf.llava_from_hf(conf.llava_to_hf(config), lm_head_bias=config.text.lm_head_bias)
    assert back == config
    assert type(config).from_json(config.to_json()) == config
    assert config.num_image_tokens == 576 and config.text.rotary_dim == 32


def test_blocked_causal_attention_equals_one_block():
    """Query blocks skip the upper triangle; results equal the full-square softmax."""
    from allava_jax.models.layers import Attention, Rope

    x = jax.random.normal(jax.random.key(3), (2, 23, 32))
    segments = jnp.asarray([[1] * 9 + [2] * 10 + [0] * 4, [1] * 23])
    positions = jnp.asarray([list(range(9)) + list(range(10)) + [0] * 4, list(range(23))])
    full = Attention(4, 4, 8, rope=Rope(4), q_block=64)
    blocked = Attention(4, 4, 8, rope=Rope(4), q_block=5)
    variables = full.init(jax.random.key(4), x, segments, positions)
    want = full.apply(variables, x, segments, positions)
    got = blocked.apply(variables, x, segments, positions)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6, rtol=0)
