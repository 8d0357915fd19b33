"""convert for every backbone: HF Llava with a StableLM-2 / Phi-3 / Qwen2 text config and the
original ALLaVA layouts import to the same params, export round-trips bit-identically and loads
with no custom code, and greedy `python -m allava_jax.generate` equals transformers' `generate`
on the export."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from safetensors.numpy import load_file

import test_convert_support as S
from allava_jax.convert import importer
from allava_jax.convert.exporter import export_checkpoint

QUIET = dict(progress=False, log=lambda s: None)


@pytest.mark.parametrize("family", ["stablelm", "phi3", "qwen2", "qwen3"])
def test_backbone_import_export_and_generate(tmp_path, family):
    src, model = S.llava_dir(tmp_path / "hf", family=family, vision=S.VISION_HD64, seed=7)
    result = importer.import_llava(src, tmp_path / "ckpt", **QUIET)
    assert result.config.text.family == family and result.fresh == []
    assert result.config.chat_template == ("phi3" if family == "phi3" else "allava")

    # Original ALLaVA layout (its tensor names and config keys) -> the same params.
    if family in S.ORIGINAL_ARCHITECTURES:
        orig = S.original_dir(tmp_path / "orig", model)
        from_orig = importer.import_llava(orig, tmp_path / "from_orig", **QUIET)
        assert from_orig.source == "original" and from_orig.config.text == result.config.text
        S.assert_trees_equal(S.checkpoint_params(tmp_path / "ckpt"), S.checkpoint_params(tmp_path / "from_orig"))

    # Export: bit-identical tensors (Phi-3's fused qkv_proj / gate_up_proj joined again).
    out = tmp_path / "out"
    export_checkpoint(tmp_path / "ckpt", out, **QUIET)
    original, exported = S.hub_names(load_file(src / "model.safetensors")), load_file(out / "model.safetensors")
    assert set(exported) == set(original)
    for name, value in original.items():
        np.testing.assert_array_equal(exported[name], value, err_msg=name)

    # The export loads with no custom code; greedy text equals our CLI's.
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(out, trust_remote_code=False).eval()
    assert hf.config.text_config.model_type == family
    processor = transformers.AutoProcessor.from_pretrained(out)
    question = "What is in the image?"
    image = Image.fromarray(np.random.default_rng(3).integers(0, 256, (29, 41, 3), dtype=np.uint8))
    image.save(tmp_path / "q.png")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    inputs = processor(text=processor.apply_chat_template(messages, add_generation_prompt=True), images=[image],
                       return_tensors="pt")
    tok = processor.tokenizer
    # The exported chat template: ALLaVA's for StableLM-2 and Qwen2, Phi-3's own for Phi-3, whose
    # generation config stops at <|end|> and <|endoftext|> as our engine does.
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    if family == "phi3":
        assert prompt == f"<|user|>\n<image>\n{question}<|end|>\n<|assistant|>\n"
        assert hf.generation_config.eos_token_id == [tok.convert_tokens_to_ids("<|end|>"), tok.eos_token_id]
    else:
        assert prompt == f"[INST] <image>\n{question} [/INST] " and hf.generation_config.eos_token_id == tok.eos_token_id
    with torch.no_grad():
        out_ids = hf.generate(**inputs, do_sample=False, max_new_tokens=16, pad_token_id=tok.eos_token_id,
                              suppress_tokens=[hf.config.image_token_index])
    new = out_ids[0, inputs["input_ids"].shape[1]:]
    expected = tok.decode(new, skip_special_tokens=True).strip()
    assert len(set(new.tolist())) > 2 and expected
    assert S.generate_cli(tmp_path / "ckpt", tmp_path / "q.png", question, 16) == expected + "\n"
