"""LLaVA-OneVision-1.5 end to end against a reference composed here from transformers' modules
(``MLCDVisionModel`` for RICE-ViT, ``Qwen3ForCausalLM``), the merger written in PyTorch from the
facts, ``Qwen2VLImageProcessor`` and the Qwen2-VL chat template; a tiny checkpoint written in the
released layout (names, config keys, sharded bf16 safetensors) imports, decodes the reference's
greedy text, and exports back bit-identically."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from safetensors.torch import save_file

import hf_models
import ov15_fixtures as F
import test_convert_support as S
from allava_jax.convert import importer
from allava_jax.convert.errors import ConvertError
from allava_jax.convert.exporter import export_checkpoint
from allava_jax.data import native, templates
from allava_jax.models import Llava, cached, get_preset, init_cache
from allava_jax.models import rice

QUIET = dict(progress=False, log=lambda s: None)
PIXELS = dict(min_pixels=28 * 28, max_pixels=112 * 112)  # tiny_ov15's budget
QUESTION = "<image>\nWhat is in the image?"
SIZES = ((60, 40), (100, 90))  # (W, H) -> grids 2x4 and 6x8 after smart_resize


class Reference:
    """The whole model in PyTorch, from transformers' modules; every parameter random, rounded to
    bf16 values so that a bf16 checkpoint holds it exactly."""

    def __init__(self, config, seed: int = 0):
        self.config = config
        self.mlcd = hf_models.mlcd_vision(config.vision, seed=seed)
        self.lm = hf_models.causal_lm(config.text, seed=seed + 1)
        d, out = config.vision.hidden_size, config.text.hidden_size
        self.ln = torch.nn.LayerNorm(d, eps=config.vision.layer_norm_eps)
        self.fc1, self.fc2 = torch.nn.Linear(4 * d, 4 * d), torch.nn.Linear(4 * d, out)
        for i, m in enumerate((self.ln, self.fc1, self.fc2)):
            hf_models.randomize(m, seed=seed + 2 + i, scale=0.1)
        with torch.no_grad():
            for m in self.modules():
                for p in m.parameters():
                    p.copy_(p.bfloat16().float())

    def modules(self):
        return (self.mlcd, self.lm, self.ln, self.fc1, self.fc2)

    def image_features(self, patches: np.ndarray, grid) -> torch.Tensor:
        """Qwen2VL processor patches (block order) -> the image [3, H, W] -> MLCD (post-norm left
        out) -> reordered into 2 x 2 blocks -> the merger: [gh * gw / 4, D]."""
        gh, gw = grid
        x = torch.from_numpy(patches).reshape(gh // 2, gw // 2, 2, 2, 3, 14, 14)
        image = x.permute(4, 0, 2, 5, 1, 3, 6).reshape(3, gh * 14, gw * 14)
        hidden = self.mlcd(image[None]).last_hidden_state[0, 1:]
        hidden = hidden[torch.from_numpy(rice.block_order(gh, gw))]
        merged = self.ln(hidden).view(-1, 4 * hidden.shape[-1])
        return self.fc2(torch.nn.functional.gelu(self.fc1(merged)))

    def logits(self, ids: list[int], features: torch.Tensor) -> torch.Tensor:
        t = torch.tensor([ids])
        embeds = self.lm.model.embed_tokens(t)
        embeds[t == self.config.image_token_id] = features
        return self.lm(inputs_embeds=embeds).logits[0]

    @torch.no_grad()
    def greedy(self, ids: list[int], features: torch.Tensor, n: int, suppress: tuple[int, ...] = (),
               stop: tuple[int, ...] = ()) -> list[int]:
        """Greedy tokens (``suppress`` never chosen; ends before the first ``stop`` token)."""
        out = list(ids)
        for _ in range(n):
            logits = self.logits(out, features)[-1]
            logits[list(suppress)] = -torch.inf
            out.append(int(logits.argmax()))
            if out[-1] in stop:
                return out[len(ids):-1]
        return out[len(ids):]

    def release_state(self) -> dict[str, torch.Tensor]:
        """The release's tensor names (``visual.*``, ``model.*``, ``lm_head.weight``)."""
        m = {k: v.detach() for k, v in self.mlcd.state_dict().items()}
        state = {"visual.patch_embed.proj.weight": m["embeddings.patch_embedding.weight"],
                 "visual.class_embedding": m["embeddings.class_embedding"], "visual.class_pos_emb": m["class_pos_emb"],
                 "visual.pre_layernorm.weight": m["pre_layrnorm.weight"], "visual.pre_layernorm.bias": m["pre_layrnorm.bias"]}
        for i in range(self.config.vision.num_layers):
            p, b = f"encoder.layers.{i}.", f"visual.blocks.{i}."
            for part in ("weight", "bias"):
                state[b + "attn.qkv." + part] = torch.cat([m[p + f"self_attn.{n}_proj.{part}"] for n in "qkv"])
                for ours, theirs in (("norm1", "layer_norm1"), ("norm2", "layer_norm2"), ("attn.proj", "self_attn.out_proj"),
                                     ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
                    state[b + ours + "." + part] = m[p + theirs + "." + part]
        for name, mod in (("ln_q", self.ln), ("mlp.0", self.fc1), ("mlp.2", self.fc2)):
            state[f"visual.merger.{name}.weight"], state[f"visual.merger.{name}.bias"] = mod.weight.detach(), mod.bias.detach()
        state.update({k: v.detach() for k, v in self.lm.state_dict().items()})  # model.*, lm_head.weight
        return state


def release_config(config) -> dict:
    """config.json as the release writes it (keys of the authors' Llavaonevision1_5Config)."""
    v, t = config.vision, config.text
    return {
        "architectures": ["LLaVAOneVision1_5_ForConditionalGeneration"], "model_type": "llavaonevision1_5",
        "image_token_id": config.image_token_id, "video_token_id": config.image_token_id + 1, "vocab_size": t.vocab_size,
        "vision_config": {"model_type": "rice_vit", "depth": v.num_layers, "embed_dim": v.hidden_size,
                          "hidden_size": v.hidden_size, "hidden_act": "gelu", "intermediate_size": v.intermediate_size,
                          "num_heads": v.num_heads, "in_channels": 3, "patch_size": 14, "spatial_merge_size": 2,
                          "temporal_patch_size": 1, "layer_norm_eps": 1e-5, "text_hidden_size": t.hidden_size},
        "text_config": {"model_type": "LLaVAOneVision1_5_text", "vocab_size": t.vocab_size, "hidden_size": t.hidden_size,
                        "intermediate_size": t.intermediate_size, "num_hidden_layers": t.num_layers,
                        "num_attention_heads": t.num_heads, "num_key_value_heads": t.kv_heads, "head_dim": t.head_dim,
                        "hidden_act": "silu", "max_position_embeddings": t.max_position_embeddings,
                        "rms_norm_eps": 1e-6, "rope_theta": t.rope_theta, "rope_scaling": None, "attention_bias": False,
                        "tie_word_embeddings": False, "use_sliding_window": False},
        "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    }


def write_release(ref: Reference, path: Path, tok) -> dict[str, np.ndarray]:
    """The tiny model in the released layout: two bf16 shards + index, config, preprocessor
    config, tokenizer. Returns the tensors written (as float32)."""
    path.mkdir(parents=True)
    state = {k: v.contiguous().bfloat16() for k, v in ref.release_state().items()}
    names = sorted(state)
    half = len(names) // 2
    weight_map = {}
    for i, part in enumerate((names[:half], names[half:]), start=1):
        file = f"model-{i:05d}-of-00002.safetensors"
        save_file({k: state[k] for k in part}, str(path / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps(release_config(ref.config)))
    (path / "preprocessor_config.json").write_text(json.dumps({**F_PREPROCESSOR, **PIXELS}))
    tok.save_pretrained(path)
    return {k: v.float().numpy() for k, v in state.items()}


F_PREPROCESSOR = dict(image_processor_type="Qwen2VLImageProcessor", temporal_patch_size=1, patch_size=14, merge_size=2,
                      image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711],
                      resample=3, do_rescale=True, rescale_factor=1 / 255, do_normalize=True, do_convert_rgb=True)


@pytest.fixture(scope="module")
def setup():
    tok = F.qwen_tokenizer()
    pad = tok.convert_tokens_to_ids(F.QWEN_TOKENS[-1])
    config = get_preset("tiny_ov15").replace(text={"vocab_size": S.VOCAB}, image_token_id=pad)
    ref = Reference(config, seed=20)  # a seed whose greedy text does not loop at once
    images = [Image.fromarray(np.random.default_rng(i).integers(0, 256, (h, w, 3), dtype=np.uint8))
              for i, (w, h) in enumerate(SIZES)]
    return tok, config, ref, images


def _prompt(tok, config, counts, question=QUESTION):
    """Our token ids of a one-turn generation prompt, and the authors' (template + replace)."""
    rounds = [(question + "\n<image>", None)]
    parts = templates.render(rounds, "qwen2vl", len(counts))
    ids, _, _ = templates.tokenize_parts(parts, tok, eos_id=templates.answer_end_id(tok, "qwen2vl"),
                                         image_token_id=config.image_token_id, num_image_tokens=counts)
    theirs = tok.encode(F.authors_text(tok, rounds, counts, generation=True), add_special_tokens=False)
    return ids.tolist(), theirs


def _ours(images, config):
    processed = [native.preprocess_native(im, **PIXELS) for im in images]
    pack = rice.pack_images([[(p.patches, p.grid) for p in processed]], rice.Buckets(patch_multiple=32, max_images=2))
    return processed, {k: jnp.asarray(v) for k, v in pack.items()}


def _greedy(config, params, ids, pack, n):
    """Greedy decoding through the KV cache: a prefill, then one token per call."""
    decode = jax.jit(lambda p, c, t, i, pos: cached.forward(config, p, c, t, i, None, jnp.ones_like(t), pos))
    layers, cache = cached.split_layers(params), init_cache(config, batch=1, max_len=len(ids) + n)
    logits, cache = decode(layers, cache, jnp.asarray([ids]), pack, jnp.arange(len(ids))[None])
    out = []
    for t in range(n):
        out.append(int(jnp.argmax(logits[0, -1])))
        step = jnp.asarray([[out[-1]]])
        logits, cache = decode(layers, cache, step, None, jnp.asarray([[len(ids) + t]]))
    return out


def test_whole_model_matches_the_reference_and_the_release_round_trips(setup, tmp_path):
    tok, config, ref, images = setup
    hf_pre = transformers.Qwen2VLImageProcessor(**F_PREPROCESSOR, **PIXELS)
    processed, pack = _ours(images, config)
    counts = [p.num_tokens for p in processed]
    assert counts == [2, 12]
    ids, theirs = _prompt(tok, config, counts)
    assert ids == theirs

    # The reference: transformers' processor, MLCD + merger, Qwen3 with the features in place.
    with torch.no_grad():
        feats = []
        for im in images:
            want = hf_pre(images=[im], return_tensors="np")
            feats.append(ref.image_features(want["pixel_values"], tuple(want["image_grid_thw"][0, 1:])))
        features = torch.cat(feats)
        expected = hf_models.to_numpy(ref.logits(ids, features))
    assert np.abs(expected).max() > 0.1

    # Import the released layout (no remote code), then our logits and greedy text.
    src = tmp_path / "release"
    written = write_release(ref, src, tok)
    result = importer.import_llava(src, tmp_path / "ckpt", **QUIET)
    assert result.source == "llava-ov-1.5" and result.ignored == [] and result.fresh == []
    assert result.config == config.replace(vision=PIXELS)
    params = S.checkpoint_params(tmp_path / "ckpt")
    ours = Llava(result.config).apply({"params": params}, jnp.asarray([ids]), pack)[0]
    np.testing.assert_allclose(np.asarray(ours), expected, atol=1e-4, rtol=0)
    want = ref.greedy(ids, features, 10)
    got = _greedy(result.config, params, ids, pack, 10)
    assert len(set(want)) > 3 and got == want
    assert tok.decode(got) == tok.decode(want)

    # Export back: the same tensor names, bit-identical (bf16), and the same config on re-import.
    out = tmp_path / "export"
    export_checkpoint(tmp_path / "ckpt", out, format="llava-ov-1.5", max_shard_size=20_000, **QUIET)
    exported = {}
    for f in sorted(out.glob("model-*.safetensors")):
        exported.update(_load_bf16(f))
    assert len(list(out.glob("model-*.safetensors"))) > 1 and (out / "model.safetensors.index.json").exists()
    assert set(exported) == set(written)
    for name, value in written.items():
        np.testing.assert_array_equal(exported[name], value, err_msg=name)
    again = importer.import_llava(out, tmp_path / "again", **QUIET)
    assert again.config == result.config
    d = json.loads((out / "config.json").read_text())
    assert d["model_type"] == "llavaonevision1_5" and d["vision_config"]["model_type"] == "rice_vit"
    assert json.loads((out / "preprocessor_config.json").read_text())["max_pixels"] == PIXELS["max_pixels"]


def _load_bf16(path: Path) -> dict[str, np.ndarray]:
    from safetensors.torch import load_file as load_torch

    return {k: v.float().numpy() for k, v in load_torch(str(path)).items() if v.dtype == torch.bfloat16}


def test_missing_or_misshapen_release_tensor_is_an_error_naming_it(setup, tmp_path):
    tok, _, ref, _ = setup
    src = tmp_path / "release"
    write_release(ref, src, tok)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    name = "visual.blocks.1.attn.qkv.weight"
    shard = src / index["weight_map"][name]
    from safetensors.torch import load_file as load_torch

    tensors = load_torch(str(shard))
    tensors[name] = tensors[name][:-3].contiguous()  # misshapen
    save_file(tensors, str(shard), metadata={"format": "pt"})
    with pytest.raises(ConvertError, match=name.replace(".", r"\.")):
        importer.import_llava(src, tmp_path / "bad", **QUIET)
    del tensors[name]  # missing
    save_file(tensors, str(shard), metadata={"format": "pt"})
    index["weight_map"].pop(name)
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ConvertError, match=f"missing tensor '{name}'"):
        importer.import_llava(src, tmp_path / "bad2", **QUIET)
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad2").exists()


def test_generate_and_the_server_path_decode_the_reference_text(setup, tmp_path, capsys):
    """``python -m allava_jax.generate`` on an imported release checkpoint (one image at native
    resolution) prints the reference's greedy text, and so does ``eval pairwise``'s answering; the
    server's message parsing with two images in one request gives the reference's tokens;
    ``--max-pixels`` shrinks what an image costs."""
    from allava_jax.infer import openai_api as api
    from allava_jax.infer.loading import load_engine
    from allava_jax.infer.sampling import SamplingParams

    tok, config, ref, images = setup
    src = tmp_path / "release"
    write_release(ref, src, tok)
    importer.import_llava(src, tmp_path / "ckpt", **QUIET)
    hf_pre = transformers.Qwen2VLImageProcessor(**F_PREPROCESSOR, **PIXELS)
    stop = (tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id)

    def reference(imgs, question):
        with torch.no_grad():
            feats = [ref.image_features(w["pixel_values"], tuple(w["image_grid_thw"][0, 1:]))
                     for w in (hf_pre(images=[im], return_tensors="np") for im in imgs)]
        counts = [len(f) for f in feats]
        rounds = [("<image>\n" * len(imgs) + question, None)]
        ids = tok.encode(F.authors_text(tok, rounds, counts, generation=True), add_special_tokens=False)
        return ref.greedy(ids, torch.cat(feats), 10, suppress=(config.image_token_id,), stop=stop)

    images[1].save(tmp_path / "q.png")
    want = reference(images[1:], "What is in the image?")
    assert len(set(want)) > 2
    expected = tok.decode(want, skip_special_tokens=True).strip()
    # The generate CLI, in this process (its subprocess form is tested for every backbone).
    from allava_jax.infer.cli import generate_main

    assert generate_main(["--checkpoint", str(tmp_path / "ckpt"), "--image", str(tmp_path / "q.png"),
                          "--prompt", "What is in the image?", "--max-new-tokens", "10"]) == 0
    assert capsys.readouterr().out == expected + "\n"

    engine = load_engine(tmp_path / "ckpt")
    from allava_jax.eval import pairwise  # eval pairwise answers the same way

    answers = pairwise.generate_answers(engine, [pairwise.Question("q1", "What is in the image?", tmp_path / "q.png")],
                                        tmp_path / "answers.jsonl", max_new_tokens=10)
    assert answers == {"q1": expected}
    urls = []
    for im in images:
        im.save(tmp_path / "x.png")
        urls.append("data:image/png;base64," + base64.b64encode((tmp_path / "x.png").read_bytes()).decode())
    content = [{"type": "image_url", "image_url": {"url": u}} for u in urls] + [{"type": "text", "text": "Compare."}]
    rounds, imgs = api.parse_messages([{"role": "user", "content": content}], api.ServerLimits(), engine.config.vision)
    done = engine.generate([api.build_prompt(engine, rounds, imgs)], SamplingParams(max_new_tokens=10))[0]
    want_two = reference(images, "Compare.")
    assert done.token_ids == want_two and len(set(want_two)) > 2
    # The server's scheduler (continuous batching) streams the same text.
    import threading

    from allava_jax.infer.scheduler import Scheduler

    scheduler, events, finished = Scheduler(engine, max_batch=2, max_len=128).start(), [], threading.Event()
    try:
        scheduler.submit(api.build_prompt(engine, rounds, imgs), SamplingParams(max_new_tokens=10),
                         lambda e: (events.append(e), e.finish_reason and finished.set()))
        assert finished.wait(120)
    finally:
        scheduler.stop()
    assert "".join(e.delta for e in events) == tok.decode(want_two, skip_special_tokens=True).strip()
    small = load_engine(tmp_path / "ckpt", max_pixels=28 * 28 * 4)
    _, few = api.parse_messages([{"role": "user", "content": content}], api.ServerLimits(), small.config.vision)
    assert [im.num_tokens for im in imgs] == [2, 12] and max(im.num_tokens for im in few) <= 4


def test_stage0_merge_of_an_mlcd_tower_and_a_tied_qwen3(setup, tmp_path):
    """``convert import --vision MLCD_DIR --llm QWEN3_DIR``: the tower's features are MLCD's (in
    2 x 2-block order), the tied head becomes an untied copy of ``embed_tokens``, the merger is
    fresh, and the model answers."""
    import dataclasses

    tok, config, ref, images = setup
    ref.mlcd.save_pretrained(tmp_path / "mlcd")
    tied = hf_models.causal_lm(dataclasses.replace(config.text, tie_word_embeddings=True), seed=7)
    tied.save_pretrained(tmp_path / "qwen3")
    tok.save_pretrained(tmp_path / "qwen3")
    result = importer.import_clip_lm(tmp_path / "mlcd", tmp_path / "qwen3", tmp_path / "ckpt", seed=1, **QUIET)
    assert result.source == "rice+qwen3" and sorted(result.fresh) == ["projector/linear_1", "projector/linear_2", "projector/ln_q"]
    assert result.ignored == ["post_layernorm.bias", "post_layernorm.weight"]
    c = result.config
    assert c.vision == dataclasses.replace(config.vision, min_pixels=c.vision.min_pixels, max_pixels=c.vision.max_pixels)
    assert not c.text.tie_word_embeddings and c.image_token_id == config.image_token_id and c.chat_template == "qwen2vl"
    params = S.checkpoint_params(tmp_path / "ckpt")
    embed = tied.model.embed_tokens.weight.detach().numpy()
    np.testing.assert_array_equal(params["llm"]["lm_head"]["kernel"], embed.T)
    np.testing.assert_array_equal(params["llm"]["embed_tokens"]["embedding"], embed)
    processed, pack = _ours(images[:1], config)
    ours = np.asarray(rice.RiceVision(c.vision).apply({"params": params["vision"]}, pack)[0, : len(processed[0].patches)])
    gh, gw = processed[0].grid
    image = torch.from_numpy(processed[0].patches).reshape(gh // 2, gw // 2, 2, 2, 3, 14, 14)
    image = image.permute(4, 0, 2, 5, 1, 3, 6).reshape(1, 3, gh * 14, gw * 14)
    with torch.no_grad():
        want = hf_models.to_numpy(ref.mlcd(image).last_hidden_state[0, 1:])[rice.block_order(gh, gw)]
    np.testing.assert_allclose(ours, want, atol=1e-4, rtol=0)
    ids, _ = _prompt(tok, c, [processed[0].num_tokens], question="What is this?")
    logits = Llava(c).apply({"params": params}, jnp.asarray([ids]), pack)
    assert np.isfinite(np.asarray(logits)).all()
