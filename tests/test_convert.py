"""convert import/export: round trips, every source layout, the tensor streaming, and bad input."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import hf_models
import test_convert_support as S
from allava_jax import checkpoints
from allava_jax.convert import hf, importer
from allava_jax.convert.__main__ import main
from allava_jax.convert.errors import ConvertError
from allava_jax.convert.exporter import export_checkpoint
from allava_jax.convert.sources import TensorSource

QUIET = dict(progress=False, log=lambda s: None)


@pytest.mark.parametrize("dtype,max_shard", [(torch.float32, "5GB"), (torch.bfloat16, "40KB")])
def test_hf_llava_round_trip_is_bit_identical(tmp_path, dtype, max_shard):
    src, model = S.llava_dir(tmp_path / "hf", dtype=dtype)
    assert main(["import", "--src", str(src), "--out", str(tmp_path / "ckpt"), "--no-progress"]) == 0
    assert main(["export", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "out"),
                 "--max-shard-size", max_shard, "--no-progress"]) == 0
    out = tmp_path / "out"
    original = S.hub_names(load_file(src / "model.safetensors"))
    if max_shard == "40KB":  # sharded: index + several files, each under the limit
        index = json.loads((out / "model.safetensors.index.json").read_text())
        files = sorted(set(index["weight_map"].values()))
        assert len(files) > 3 and not (out / "model.safetensors").exists()
        assert all((out / f).stat().st_size < 40_000 + 10_000 for f in files)
        exported = {k: v for f in files for k, v in load_file(out / f).items()}
    else:
        exported = load_file(out / "model.safetensors")
    assert set(exported) == set(original)
    for name, value in original.items():
        assert exported[name].dtype == value.dtype, name
        np.testing.assert_array_equal(exported[name], value, err_msg=name)
    # Equivalent config: same model in our terms, same key HF fields.
    from allava_jax.convert import configs as conf

    a, b = json.loads((src / "config.json").read_text()), json.loads((out / "config.json").read_text())
    assert conf.llava_from_hf(a) == conf.llava_from_hf(b)
    for key in ("image_token_index", "vision_feature_layer", "vision_feature_select_strategy", "projector_hidden_act"):
        assert a[key] == b[key], key
    assert b["dtype"] == str(dtype).removeprefix("torch.")
    # And the exported directory re-imports to the same params (sharded index read back).
    importer.import_llava(out, tmp_path / "again", **QUIET)
    S.assert_trees_equal(S.checkpoint_params(tmp_path / "ckpt"), S.checkpoint_params(tmp_path / "again"))


@pytest.mark.parametrize("variant", ["safetensors", "bin", "bias", "no_vision"])
def test_original_layout_imports_to_the_same_params_as_hf(tmp_path, variant):
    src, model = S.llava_dir(tmp_path / "hf", vision=S.VISION_HD64)
    ours = importer.import_llava(src, tmp_path / "from_hf", **QUIET)
    bias = torch.randn(S.VOCAB) if variant == "bias" else None
    orig = S.original_dir(tmp_path / "orig", model, lm_head_bias=bias, as_bin=variant == "bin",
                          with_vision=variant != "no_vision")
    vision = None
    if variant == "no_vision":  # LLaVA references the CLIP by name: give its directory
        vision = tmp_path / "clip"
        model.model.vision_tower.save_pretrained(vision)
    result = importer.import_llava(orig, tmp_path / "from_orig", vision=vision, **QUIET)
    assert result.source == "original" and result.fresh == []
    a, b = S.checkpoint_params(tmp_path / "from_hf"), S.checkpoint_params(tmp_path / "from_orig")
    if variant == "bias":
        np.testing.assert_array_equal(b["llm"]["lm_head"].pop("bias"), bias.numpy())
        assert result.config.text.lm_head_bias
    S.assert_trees_equal(a, b)
    # The original tokenizer had no <image>: it was added, inside the vocabulary, and saved.
    assert result.config.image_token_id == 300 == ours.config.image_token_id
    tok = checkpoints.tokenizer_path(tmp_path / "from_orig")
    assert json.loads((tok / "tokenizer.json").read_text())["added_tokens"][-1]["content"] == "<image>"
    note = " ".join(result.notes)
    assert ("from " + str(vision)) in note if vision else "inferred from tensor shapes" in note


def test_clip_and_phi_import_fresh_projector_only(tmp_path, capsys):
    clip, clip_model = S.clip_dir(tmp_path / "clip", save_with_vision_model_prefix=True)
    phi, phi_model = S.phi_dir(tmp_path / "phi")
    assert main(["import", "--vision", str(clip), "--llm", str(phi), "--out", str(tmp_path / "ckpt"), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "projector (mlp2x_gelu) freshly initialised" in printed and "freshly initialised: projector/linear_1, projector/linear_2" in printed
    config = checkpoints.load_config(tmp_path / "ckpt")
    params = S.checkpoint_params(tmp_path / "ckpt")
    assert config.text.lm_head_bias and config.image_token_id == 300
    from allava_jax.convert.hf import Layout

    expect_v = hf_models.params_from_torch(clip_model, config, Layout("", "", "", ""), part="vision")
    expect_l = hf_models.params_from_torch(phi_model, config, Layout("", "model.", "lm_head.", ""), part="llm")
    S.assert_trees_equal(params["vision"], expect_v)
    S.assert_trees_equal(params["llm"], expect_l)
    k = params["projector"]["linear_1"]["kernel"]
    assert k.shape == (32, 64) and np.std(k) > 0
    # Phi-2's own head has a non-zero bias: HF Llava cannot hold it, so export refuses...
    with pytest.raises(ConvertError, match="lm_head bias is non-zero.*--drop-lm-head-bias"):
        export_checkpoint(tmp_path / "ckpt", tmp_path / "out", **QUIET)
    # ... unless asked to drop it.
    result = export_checkpoint(tmp_path / "ckpt", tmp_path / "out", drop_lm_head_bias=True, **QUIET)
    assert "lm_head bias dropped" in result.notes[-1]
    assert "language_model.lm_head.bias" not in load_file(tmp_path / "out" / "model.safetensors")


def test_clip_model_directory_text_tower_is_ignored(tmp_path):
    import transformers

    cm = transformers.CLIPModel(transformers.CLIPConfig(
        vision_config=hf_models.VISION,
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=99,
                         bos_token_id=0, eos_token_id=1, pad_token_id=1)))
    cm.save_pretrained(tmp_path / "clipm")
    phi, _ = S.phi_dir(tmp_path / "phi")
    result = importer.import_clip_lm(tmp_path / "clipm", phi, tmp_path / "ckpt", **QUIET)
    assert any(n.startswith("text_model.") for n in result.ignored)
    assert not any(n.startswith("vision_model.encoder") for n in result.ignored)
    np.testing.assert_array_equal(
        S.checkpoint_params(tmp_path / "ckpt")["vision"]["position_embedding"],
        cm.vision_model.embeddings.position_embedding.weight.detach().numpy(),
    )


def test_layout_detection_accepts_every_spelling():
    base = ["embeddings.patch_embedding.weight"]
    for prefix in ("vision_tower.vision_model.", "vision_tower.", "model.vision_tower."):
        text = "language_model.model." if not prefix.startswith("model.") else "model.language_model."
        names = [prefix + n for n in base] + [text + "embed_tokens.weight", "multi_modal_projector.linear_1.weight"]
        kind, layout = hf.detect_layout(names)
        assert kind == "hf_llava" and layout.vision == prefix and layout.text == text
    kind, layout = hf.detect_layout(["model.mm_projector.0.weight", "model.mm_projector.2.weight",
                                     "model.vision_tower.vision_tower.vision_model." + base[0]])
    assert kind == "original" and layout.projector_names == ("0", "2")
    assert hf.clip_layout(base).vision == "" and hf.clip_layout(["vision_model." + base[0]]).vision == "vision_model."
    with pytest.raises(hf.UnknownLayout, match="old remote-code Phi"):
        hf.lm_layout(["transformer.h.0.mixer.Wqkv.weight"])


def _resave(path, edit):
    state = load_file(path / "model.safetensors")
    edit(state)
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})


def test_bad_inputs_give_clear_errors(tmp_path, capsys):
    src, model = S.llava_dir(tmp_path / "hf")
    out = tmp_path / "ckpt"

    name = "language_model.model.layers.1.mlp.fc2.weight"
    _resave(src, lambda s: s.pop(name))
    with pytest.raises(ConvertError, match=f"missing tensor '{name}'"):
        importer.import_llava(src, out, **QUIET)

    src, _ = S.llava_dir(tmp_path / "hf2")
    name = "multi_modal_projector.linear_2.weight"
    _resave(src, lambda s: s.__setitem__(name, np.zeros((64, 65), np.float32)))
    with pytest.raises(ConvertError, match=rf"tensor '{name}' has shape \(64, 65\)"):
        importer.import_llava(src, out, **QUIET)

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(ConvertError, match="no weights found"):
        importer.import_llava(tmp_path / "empty", out, **QUIET)

    (tmp_path / "other").mkdir()
    save_file({"bert.embeddings.word_embeddings.weight": np.zeros((4, 4), np.float32)}, str(tmp_path / "other" / "model.safetensors"))
    (tmp_path / "other" / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ConvertError, match="unknown architecture"):
        importer.import_llava(tmp_path / "other", out, **QUIET)

    # Pickles: arbitrary objects are refused by weights_only (never executed) ...
    (tmp_path / "pickled").mkdir()
    torch.save({"model": model.model.multi_modal_projector}, tmp_path / "pickled" / "pytorch_model.bin")
    with pytest.raises(ConvertError, match="pytorch_model.bin: refused: not a plain state dict"):
        TensorSource(tmp_path / "pickled")
    # ... and so are plain containers that are not {name: tensor}.
    torch.save({"epoch": 3, "state_dict": {}}, tmp_path / "pickled" / "pytorch_model.bin")
    with pytest.raises(ConvertError, match="not a plain state dict of tensors.*'epoch'"):
        TensorSource(tmp_path / "pickled")

    # The CLI prints the reason, not a traceback.
    assert main(["import", "--src", str(tmp_path / "empty"), "--out", str(out)]) == 2
    assert "error:" in capsys.readouterr().err and not out.exists()


def test_image_token_outside_vocab_and_missing_vision_tower_are_refused(tmp_path):
    _, model = S.llava_dir(tmp_path / "hf")
    orig = S.original_dir(tmp_path / "orig", model, with_vision=False)
    with pytest.raises(ConvertError, match="no vision tower tensors.*--vision"):
        importer.import_llava(orig, tmp_path / "ckpt", **QUIET)
    phi, _ = S.phi_dir(tmp_path / "phi")
    cfg = json.loads((phi / "config.json").read_text())
    (phi / "config.json").write_text(json.dumps({**cfg, "vocab_size": 300}))  # <image> would be id 300
    _resave(phi, lambda s: [s.__setitem__(k, s[k][:300]) for k in ("model.embed_tokens.weight", "lm_head.weight", "lm_head.bias")])
    clip, _ = S.clip_dir(tmp_path / "clip")
    with pytest.raises(ConvertError, match="<image> id 300 is outside the model's vocabulary"):
        importer.import_clip_lm(clip, phi, tmp_path / "ckpt", **QUIET)


def test_fp16_bin_import_and_export_dtype(tmp_path):
    src, model = S.llava_dir(tmp_path / "hf", dtype=torch.float16)
    state = load_file(src / "model.safetensors")
    (src / "model.safetensors").unlink()
    torch.save({k: torch.from_numpy(v) for k, v in state.items()}, src / "pytorch_model.bin")
    result = importer.import_llava(src, tmp_path / "ckpt", **QUIET)
    assert result.source_dtype == "float16"
    params = S.checkpoint_params(tmp_path / "ckpt")
    assert params["llm"]["embed_tokens"]["embedding"].dtype == np.float32
    np.testing.assert_array_equal(params["llm"]["embed_tokens"]["embedding"],
                                  state["language_model.model.embed_tokens.weight"].astype(np.float32))
    export_checkpoint(tmp_path / "ckpt", tmp_path / "out", dtype="bfloat16", **QUIET)
    exported = load_file(tmp_path / "out" / "model.safetensors")
    assert str(exported["multi_modal_projector.linear_1.weight"].dtype) == "bfloat16"


def test_export_reads_a_training_style_checkpoint(tmp_path):
    """Training writes the same format (step > 0, extra items, under workdir/checkpoints)."""
    from allava_jax.models import get_preset, init_params

    config = get_preset("tiny").replace(text={"vocab_size": S.VOCAB, "lm_head_bias": False}, image_token_id=300)
    params = init_params(config, jax.random.key(1))
    tok = tmp_path / "tok"
    S.tokenizer().save_pretrained(tok)
    checkpoints.save_model(tmp_path / "run" / "checkpoints", params, config, step=7, tokenizer_dir=tok)
    result = export_checkpoint(tmp_path / "run", tmp_path / "out", **QUIET)
    assert result.dtype == "float32" and result.image_token_id == 300
    assert any("added '<image>'" in n for n in result.notes)
    exported = load_file(tmp_path / "out" / "model.safetensors")
    np.testing.assert_array_equal(exported["language_model.lm_head.weight"], np.asarray(params["llm"]["lm_head"]["kernel"]).T)


def test_streaming_save_holds_one_leaf_at_a_time(tmp_path):
    """The import's memory bound: orbax materialises LazyLeaf values one by one, no copies kept."""
    import weakref

    from allava_jax.convert.streaming import LazyLeaf, streaming_numpy_saves

    alive, peak, order = [0], [0], []

    def make(i):
        def f():
            order.append(i)
            value = np.full((4, 8), float(i), np.float32)
            alive[0] += 1
            peak[0] = max(peak[0], alive[0])
            weakref.finalize(value, lambda: alive.__setitem__(0, alive[0] - 1))
            return value
        return f

    tree = {f"w{i}": LazyLeaf.create((4, 8), np.float32, make(i)) for i in range(4)}
    from allava_jax.models import get_preset

    with streaming_numpy_saves():
        checkpoints.save_model(tmp_path / "ckpt", tree, get_preset("tiny"))
    assert sorted(order) == [0, 1, 2, 3] and peak[0] == 1
    restored = checkpoints.load_params(tmp_path / "ckpt")
    for i in range(4):
        np.testing.assert_array_equal(np.asarray(restored[f"w{i}"]), np.full((4, 8), float(i), np.float32))
    # Outside the context, orbax's own numpy handler is back.
    import orbax.checkpoint as ocp

    assert type(ocp.type_handlers.get_type_handler(np.ndarray)) is ocp.type_handlers.NumpyHandler
