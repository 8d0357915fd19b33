"""LLaVA-OneVision-1.5's model pieces against transformers (PyTorch CPU, fp32, every parameter
random): the RICE-ViT tower vs ``MLCDVisionModel`` on images of three sizes, alone and packed in
one row; the 2 x 2 merger vs the authors' merger rebuilt in PyTorch."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import hf_models
from allava_jax.convert.hf import Layout
from allava_jax.data import native
from allava_jax.models import get_preset
from allava_jax.models import rice
from allava_jax.models.projector import Merger

TOL = 1e-4
MLCD_ALONE = Layout("", "", "", "")  # MLCDVisionModel.state_dict() names
SIZES = ((28, 56), (56, 56), (84, 28))  # (H, W): grids 2x4, 4x4, 6x2


@pytest.fixture(scope="module")
def tower():
    config = get_preset("tiny_ov15")
    model = hf_models.mlcd_vision(config.vision)
    params = hf_models.params_from_torch(model, config, MLCD_ALONE, part="vision")
    return config, model, params


def _images(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(3, h, w, generator=g) for h, w in SIZES]


def _mlcd_in_block_order(model, image: torch.Tensor) -> np.ndarray:
    """MLCD's patch outputs (class token and post-norm left out), row-major -> 2 x 2-block order."""
    gh, gw = image.shape[1] // 14, image.shape[2] // 14
    with torch.no_grad():
        hidden = hf_models.to_numpy(model(image[None]).last_hidden_state[0, 1:])
    return hidden[rice.block_order(gh, gw)]


def _pack(images, buckets=rice.Buckets()):
    rows = [[(native.patchify(im.numpy().transpose(1, 2, 0)), (im.shape[1] // 14, im.shape[2] // 14)) for im in images]]
    return {k: jnp.asarray(v) for k, v in rice.pack_images(rows, buckets).items()}


def test_block_order_matches_qwen2vl_layout():
    """Block order: the 2 x 2 blocks row-major, each block's patches row-major."""
    assert rice.block_order(2, 4).tolist() == [0, 1, 4, 5, 2, 3, 6, 7]
    assert rice.block_coords(2, 4)[:4].tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]]


def test_rice_tower_matches_mlcd_alone_and_packed(tower):
    config, model, params = tower
    apply = jax.jit(rice.RiceVision(config.vision).apply)
    images = _images()
    expected = [_mlcd_in_block_order(model, im) for im in images]
    assert min(np.abs(e).max() for e in expected) > 0.1
    for im, want in zip(images, expected):  # each image alone
        ours = np.asarray(apply({"params": params}, _pack([im]))[0, : len(want)])
        np.testing.assert_allclose(ours, want, atol=TOL, rtol=0)
    # All three in one packed row, with padded patches and class slots (static bucket sizes).
    pack = _pack(images, rice.Buckets(patch_multiple=64, max_images=4))
    assert pack["patches"].shape[1] == 64 and pack["cls_segments"].shape[1] == 4
    ours = np.asarray(apply({"params": params}, pack)[0])
    np.testing.assert_allclose(ours[: sum(map(len, expected))], np.concatenate(expected), atol=TOL, rtol=0)
    # Small blocks: each block of 8 patches scores a window of 16 keys (+ the class tokens), not 40.
    small = _pack(images, rice.Buckets(patch_multiple=8, max_images=3))
    assert small["kv_windows"].shape == (1, 5, 16)
    windowed = np.asarray(apply({"params": params}, small)[0])
    np.testing.assert_allclose(windowed[:36], np.concatenate(expected), atol=TOL, rtol=0)
    # The unrolled layers run the same params to the same features.
    unrolled = rice.RiceVision(config.vision, scan_layers=False).apply({"params": params}, pack)
    np.testing.assert_allclose(np.asarray(unrolled[0]), ours, atol=1e-5, rtol=0)


def test_rice_class_token_angles_are_used(tower):
    """``class_pos_emb`` reaches the patches' features (through the class token's attention)."""
    config, _, params = tower
    pack = _pack(_images(1)[:1])
    base = rice.RiceVision(config.vision).apply({"params": params}, pack)
    moved = {**params, "class_pos_emb": params["class_pos_emb"] + 1.0}
    other = rice.RiceVision(config.vision).apply({"params": moved}, pack)
    assert float(jnp.abs(base - other).max()) > 1e-3


@pytest.mark.parametrize("kind", ["splash", "flash"])
def test_rice_tower_on_pallas_kernels_equals_xla(tower, kind):
    """Packed rows of 128-multiple lengths through the kernels (interpreted on CPU) give XLA's
    features: the same attention choice as the decoder, non-causal within each image."""
    config, _, params = tower
    pack = _pack(_images(2), rice.Buckets(patch_multiple=124, max_images=4))  # 124 + 4 = 128 tokens
    xla = rice.RiceVision(config.vision, attention="xla").apply({"params": params}, pack)
    kernel = jax.jit(functools.partial(rice.RiceVision(config.vision, attention=kind).apply))({"params": params}, pack)
    n = 8 + 16 + 12
    np.testing.assert_allclose(np.asarray(kernel[0, :n]), np.asarray(xla[0, :n]), atol=1e-4, rtol=0)


def torch_merger(x: torch.Tensor, ln: torch.nn.LayerNorm, fc1: torch.nn.Linear, fc2: torch.nn.Linear) -> torch.Tensor:
    """The authors' ``RicePatchMerger.forward`` (from the facts): ln_q, view 4 patches as one row,
    Linear, exact GELU, Linear."""
    return fc2(torch.nn.functional.gelu(fc1(ln(x).view(-1, 4 * x.shape[-1]))))


def test_merger_matches_the_authors_merger_in_torch():
    d, out = 16, 24
    torch.manual_seed(0)
    ln, fc1, fc2 = torch.nn.LayerNorm(d, eps=1e-5), torch.nn.Linear(4 * d, 4 * d), torch.nn.Linear(4 * d, out)
    for m in (ln, fc1, fc2):
        hf_models.randomize(m, seed=5)
    x = torch.randn(12, d, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        expected = hf_models.to_numpy(torch_merger(x, ln, fc1, fc2))
    params = {"ln_q": {"scale": ln.weight.detach().numpy(), "bias": ln.bias.detach().numpy()},
              "linear_1": {"kernel": fc1.weight.detach().numpy().T, "bias": fc1.bias.detach().numpy()},
              "linear_2": {"kernel": fc2.weight.detach().numpy().T, "bias": fc2.bias.detach().numpy()}}
    ours = Merger(out).apply({"params": params}, jnp.asarray(x.numpy())[None])[0]
    np.testing.assert_allclose(np.asarray(ours), expected, atol=TOL, rtol=0)


def _count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("preset,llm_range", [("llava_ov15_4b", (4.3e9, 4.5e9)), ("llava_ov15_8b", (8.1e9, 8.3e9))])
def test_ov15_param_counts_match_transformers_on_meta_device(preset, llm_range):
    """Vision = ``MLCDVisionModel`` less its post-LayerNorm; LLM = ``Qwen3ForCausalLM`` (untied: the
    4B one is Qwen3-4B's 4.02B plus a 389M head);
    merger = LayerNorm(1024) + Linear(4096, 4096) + Linear(4096, D) with biases."""
    import flax.linen as nn
    import transformers

    from allava_jax.models import abstract_params

    config = get_preset(preset)
    shapes = nn.unbox(abstract_params(config))  # nothing allocated
    with torch.device("meta"):
        mlcd = transformers.MLCDVisionModel(transformers.MLCDVisionConfig(
            hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, patch_size=14))
        lm = transformers.AutoModelForCausalLM.from_config(hf_models.hf_text_config(config.text))
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    d = config.text.hidden_size
    expected = {"vision": n(mlcd) - 2 * 1024, "projector": 2 * 1024 + 4096 * 4096 + 4096 + 4096 * d + d, "llm": n(lm)}
    assert {part: _count(shapes[part]) for part in expected} == expected
    assert 3.0e8 < expected["vision"] < 3.1e8 and llm_range[0] < expected["llm"] < llm_range[1]
    assert type(lm).__name__ == "Qwen3ForCausalLM" and lm.lm_head.weight is not lm.model.embed_tokens.weight
