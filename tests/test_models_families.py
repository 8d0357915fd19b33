"""The decoder family against transformers (PyTorch CPU, fp32, every parameter random): StableLM-2,
Phi-3 (LongRoPE on both sides of original_max_position_embeddings) and Qwen2, alone and as the
text config of HF Llava; KV-cache decoding and packed rows for each; full-size parameter counts."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import hf_models
from allava_jax.convert import configs as conf
from allava_jax.convert.hf import HF_LLAVA, Layout
from allava_jax.models import Llava, abstract_params, cached, get_preset, init_cache, init_params
from allava_jax.models.config import LlavaConfig
from allava_jax.models.decoder import Decoder

TOL = 1e-4
LM_ALONE = Layout("", "model.", "lm_head.", "")
FAMILIES = ("stablelm", "phi3", "qwen2", "qwen3")


def _text(family):
    return get_preset(f"tiny_{family}").text


def _ids(seed, n, high=127):
    return torch.randint(0, high, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
def test_causal_lm_logits_match_transformers(family):
    text = _text(family)
    model = hf_models.causal_lm(text, seed=1)
    assert type(model).__name__ == {"stablelm": "StableLmForCausalLM", "phi3": "Phi3ForCausalLM",
                                    "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[family]
    assert conf.text_from_hf(model.config.to_dict(), lm_head_bias=False) == text  # the config round-trips
    params = hf_models.params_from_torch(model, LlavaConfig(text=text), LM_ALONE, part="llm")
    apply = jax.jit(functools.partial(Decoder(text).apply, method=Decoder.logits))
    # Phi-3's LongRoPE switches to its long factors once positions pass 64 in the tiny config.
    for seed, length in ((4, 40), (5, 90)):
        tokens = torch.cat([_ids(seed, length), _ids(seed + 10, length)])
        with torch.no_grad():
            expected = hf_models.to_numpy(model(tokens).logits)
        ours = apply({"params": params}, jnp.asarray(tokens.numpy()))
        assert np.abs(expected).max() > 0.1
        np.testing.assert_allclose(np.asarray(ours), expected, atol=TOL, rtol=0)


def test_longrope_switch_changes_the_logits():
    """Both factor sets are live: the first 40 logits of a 90-token row (long factors, a larger
    attention scale) differ from those of the 40-token row alone (short factors)."""
    text = _text("phi3")
    assert text.rope_attention_factor > 1.0
    params = hf_models.params_from_torch(hf_models.causal_lm(text, seed=1), LlavaConfig(text=text), LM_ALONE, part="llm")
    tokens = jnp.asarray(_ids(7, 90).numpy())
    long = Decoder(text).apply({"params": params}, tokens, method=Decoder.logits)[:, :40]
    short = Decoder(text).apply({"params": params}, tokens[:, :40], method=Decoder.logits)
    assert float(jnp.abs(long - short).max()) > 1e-2


@pytest.mark.parametrize("family", FAMILIES)
def test_llava_with_family_text_config_matches_transformers(family):
    text = _text(family)
    model = hf_models.llava_with(text, seed=2)
    config = conf.llava_from_hf(model.config.to_dict(), lm_head_bias=False)
    assert config.text == text
    params = hf_models.params_from_torch(model, config, HF_LLAVA)
    n = config.num_image_tokens
    rng = np.random.default_rng(5)
    ids = rng.integers(0, 127, 3).tolist() + [127] * n + rng.integers(0, 127, 5).tolist() + [127] * n + [9, 8]
    pixels = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        expected = hf_models.to_numpy(model(input_ids=torch.tensor([ids]), pixel_values=pixels).logits)
    images = jnp.asarray(pixels.numpy().transpose(0, 2, 3, 1))[None]
    ours = Llava(config).apply({"params": params}, jnp.asarray([ids]), images, jnp.ones((1, 2), bool))
    np.testing.assert_allclose(np.asarray(ours), expected, atol=TOL, rtol=0)


def _llava_params(config, seed):
    model = hf_models.llava_with(config.text, seed=seed)
    return hf_models.params_from_torch(model, conf.llava_from_hf(model.config.to_dict(), lm_head_bias=False), HF_LLAVA)


@pytest.mark.parametrize("family", FAMILIES)
def test_kv_cache_decode_and_packed_rows_equal_full_forward(family):
    config = get_preset(f"tiny_{family}")
    params = _llava_params(config, seed=3)
    apply = jax.jit(Llava(config).apply)
    decode = jax.jit(functools.partial(cached.forward, config))
    img, n = config.image_token_id, config.num_image_tokens
    image = jax.random.normal(jax.random.key(1), (1, 1, 28, 28, 3))
    one = jnp.ones((1, 1), bool)
    tokens = [img] * n + list(range(3, 15))
    full = apply({"params": params}, jnp.asarray([tokens]), image, one)[0]

    # Prefill the image and a few words, then one token per call (positions stay below Phi-3's 64).
    cache, prompt, layers = init_cache(config, batch=1, max_len=32), n + 4, cached.split_layers(params)
    ids, pos = jnp.asarray([tokens]), jnp.arange(len(tokens))[None]
    seg = jnp.ones_like(ids)
    logits, cache = decode(layers, cache, ids[:, :prompt], image, one, seg[:, :prompt], pos[:, :prompt])
    steps = [logits[0]]
    for t in range(prompt, len(tokens)):
        logits, cache = decode(layers, cache, ids[:, t:t + 1], None, None, seg[:, t:t + 1], pos[:, t:t + 1])
        steps.append(logits[0])
    np.testing.assert_allclose(np.asarray(jnp.concatenate(steps)), np.asarray(full), atol=1e-5, rtol=0)

    # A packed row (two segments, positions restarting) equals each example run alone.
    other = list(range(20, 29))
    packed_ids = jnp.asarray([tokens + other])
    segments = jnp.asarray([[1] * len(tokens) + [2] * len(other)])
    positions = jnp.asarray([list(range(len(tokens))) + list(range(len(other)))])
    packed = apply({"params": params}, packed_ids, image, one, segments, positions)[0]
    alone = apply({"params": params}, jnp.asarray([other]), image, jnp.zeros((1, 1), bool))[0]
    np.testing.assert_allclose(np.asarray(packed[: len(tokens)]), np.asarray(full), atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(packed[len(tokens):]), np.asarray(alone), atol=1e-5, rtol=0)


def _count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("preset,llm_range", [
    ("stablelm2_clip336", (1.6e9, 1.7e9)), ("phi3mini_clip336", (3.7e9, 3.9e9)), ("qwen2_clip336", (1.8e9, 1.9e9)),
])
def test_full_size_param_counts_match_transformers_on_meta_device(preset, llm_range):
    config = get_preset(preset)
    shapes = nn.unbox(abstract_params(config))  # nothing allocated
    hf_cfg = conf.llava_to_hf(config)
    llava_cfg = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(**hf_cfg["vision_config"]),
        text_config=hf_models.hf_text_config(config.text),
        image_token_index=config.image_token_id,
    )
    with torch.device("meta"):
        hf_llava = transformers.LlavaForConditionalGeneration(llava_cfg)
        hf_lm = transformers.AutoModelForCausalLM.from_config(hf_models.hf_text_config(config.text))
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    expected = {"vision": n(hf_llava.model.vision_tower), "projector": n(hf_llava.model.multi_modal_projector),
                "llm": n(hf_lm)}
    got = {part: _count(shapes[part]) for part in expected}
    assert got == expected
    assert llm_range[0] < got["llm"] < llm_range[1]


@pytest.mark.parametrize("preset", ["phi2_clip336", "stablelm2_clip336", "phi3mini_clip336", "qwen2_clip336"])
def test_analytic_flops_count_every_block_matmul(preset):
    """MFU's 6N per token uses the blocks' matmul weights: equal to the kernels of the param tree."""
    from allava_jax.train.flops import train_step_flops

    config = get_preset(preset)
    layers = nn.unbox(abstract_params(config))["llm"]["layers"]
    kernels = sum(int(np.prod(x.shape)) for path, x in jax.tree_util.tree_leaves_with_path(layers)
                  if jax.tree_util.keystr(path).endswith("['kernel']"))
    assert train_step_flops(config, n_tokens=1, n_images=0, seq_len=0, vision_trained=False, n_scored=0) == 6 * kernels


def test_qwen3_packed_rows_and_kv_cache_decoding_match_transformers():
    """Qwen3 against ``Qwen3ForCausalLM`` directly: two sequences packed in one row (positions
    restarting) give each one's transformers logits, and so does KV-cache decoding (a prefill,
    then one token per call)."""
    config = get_preset("tiny_qwen3")
    text = config.text
    assert text.head_dim * text.num_heads != text.hidden_size and text.qk_norm
    model = hf_models.causal_lm(text, seed=11)
    q_norm = model.model.layers[0].self_attn.q_norm.weight
    assert not torch.equal(q_norm, torch.ones_like(q_norm))  # randomised, not its init
    llm = hf_models.params_from_torch(model, LlavaConfig(text=text), LM_ALONE, part="llm")
    first, second = _ids(21, 23), _ids(22, 17)
    with torch.no_grad():
        expected = [hf_models.to_numpy(model(t).logits[0]) for t in (first, second)]
    packed = jnp.asarray(torch.cat([first, second], dim=1).numpy())
    segments = jnp.asarray([[1] * 23 + [2] * 17])
    positions = jnp.asarray([list(range(23)) + list(range(17))])
    ours = np.asarray(Decoder(text).apply({"params": llm}, packed, segments, positions, method=Decoder.logits)[0])
    np.testing.assert_allclose(ours[:23], expected[0], atol=TOL, rtol=0)
    np.testing.assert_allclose(ours[23:], expected[1], atol=TOL, rtol=0)

    # The cache runs the VLM's pieces: its vision tower and projector are present but unused here.
    params = {**init_params(config, jax.random.key(0)), "llm": llm}
    decode = jax.jit(functools.partial(cached.forward, config))
    cache, layers = init_cache(config, batch=1, max_len=32), cached.split_layers(params)
    ids = jnp.asarray(first.numpy())
    pos, seg = jnp.arange(23)[None], jnp.ones((1, 23), jnp.int32)
    logits, cache = decode(layers, cache, ids[:, :9], None, None, seg[:, :9], pos[:, :9])
    steps = [logits[0]]
    for t in range(9, 23):
        logits, cache = decode(layers, cache, ids[:, t:t + 1], None, None, seg[:, t:t + 1], pos[:, t:t + 1])
        steps.append(logits[0])
    np.testing.assert_allclose(np.asarray(jnp.concatenate(steps)), expected[0], atol=TOL, rtol=0)
