"""Numerical parity of our Flax towers with transformers (PyTorch, CPU, fp32)."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import hf_models
from allava_jax.convert import configs as conf
from allava_jax.convert.hf import HF_LLAVA, Layout
from allava_jax.models import Llava
from allava_jax.models.clip import ClipVision
from allava_jax.models.config import LlavaConfig
from allava_jax.models.decoder import Decoder

TOL = 1e-4
CLIP_ALONE = Layout("", "", "", "")  # transformers 5 CLIPVisionModel names
PHI_ALONE = Layout("", "model.", "lm_head.", "")


@pytest.mark.parametrize("feature_layer,strategy", [(-2, "default"), (-1, "full"), (1, "default"), (0, "full")])
def test_clip_selected_layer_matches_transformers(feature_layer, strategy):
    model = hf_models.clip_vision()
    vision = conf.vision_from_hf(model.config.to_dict(), feature_layer, strategy)
    config = LlavaConfig(vision=vision, text=conf.text_from_hf(hf_models.TEXT | {"model_type": "phi"}))
    params = hf_models.params_from_torch(model, config, CLIP_ALONE, part="vision")
    pixels = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        hidden = model(pixels, output_hidden_states=True).hidden_states[feature_layer]
    expected = hf_models.to_numpy(hidden if strategy == "full" else hidden[:, 1:])
    ours = ClipVision(vision).apply({"params": params}, jnp.asarray(pixels.numpy().transpose(0, 2, 3, 1)))
    assert ours.shape == expected.shape
    np.testing.assert_allclose(np.asarray(ours), expected, atol=TOL, rtol=0)


def test_clip_runs_only_needed_blocks():
    model = hf_models.clip_vision()
    config = LlavaConfig(vision=conf.vision_from_hf(model.config.to_dict(), -2))
    params = hf_models.params_from_torch(model, config, CLIP_ALONE, part="vision")
    # The unused last block is held (for export) but never applied: corrupting it changes nothing.
    images = jnp.ones((1, 28, 28, 3))
    before = ClipVision(config.vision).apply({"params": params}, images)
    params["unused_layers"]["mlp"]["fc1"]["kernel"] = params["unused_layers"]["mlp"]["fc1"]["kernel"] * np.nan
    after = ClipVision(config.vision).apply({"params": params}, images)
    np.testing.assert_array_equal(np.asarray(before), np.asarray(after))
    assert params["layers"]["mlp"]["fc1"]["kernel"].shape[0] == 2


@pytest.mark.parametrize("num_kv_heads", [None, 2])
def test_phi_logits_match_transformers(num_kv_heads):
    model = hf_models.phi(num_key_value_heads=num_kv_heads)
    assert model.lm_head.bias is not None and float(model.lm_head.bias.detach().abs().sum()) > 0
    text = conf.text_from_hf(model.config.to_dict(), lm_head_bias=True)
    assert text.rotary_dim == 6  # 0.4 * head_dim 16, truncated like HF
    config = LlavaConfig(text=text)
    params = hf_models.params_from_torch(model, config, PHI_ALONE, part="llm")
    tokens = torch.randint(0, 128, (2, 17), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = hf_models.to_numpy(model(tokens).logits)
    ours = Decoder(text).apply({"params": params}, jnp.asarray(tokens.numpy()), method=Decoder.logits)
    np.testing.assert_allclose(np.asarray(ours), expected, atol=TOL, rtol=0)


def test_llava_logits_match_transformers_with_two_images():
    model = hf_models.llava(image_token_id=127)
    config = hf_models.llava_config_from(model)
    n = config.num_image_tokens
    assert n == 4
    params = hf_models.params_from_torch(model, config, HF_LLAVA)
    rng = np.random.default_rng(5)
    text = lambda k: rng.integers(0, 127, k).tolist()  # noqa: E731
    ids = text(3) + [127] * n + text(5) + [127] * n + text(6)
    pixels = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        expected = hf_models.to_numpy(model(input_ids=torch.tensor([ids]), pixel_values=pixels).logits)
    images = jnp.asarray(pixels.numpy().transpose(0, 2, 3, 1))[None]  # [1, M=2, H, W, 3]
    ours = Llava(config).apply({"params": params}, jnp.asarray([ids]), images, jnp.ones((1, 2), bool))
    np.testing.assert_allclose(np.asarray(ours), expected, atol=TOL, rtol=0)
