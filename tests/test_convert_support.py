"""Shared builders for the convert tests (no tests here): tiny tokenizers and HF model directories.

Everything is built locally; nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from cli_env import cli_env
import hf_models
from data_fixtures import PHI3_CHAT_TOKENS
from allava_jax import checkpoints
from allava_jax.models import get_preset

VOCAB = 384  # room for a 256-byte BPE alphabet, merges, <|endoftext|> and <image>
TEXT = {**hf_models.TEXT, "vocab_size": VOCAB}
CORPUS = [
    "[INST] What is in the image? [/INST] A cat sitting on a red mat.",
    "[INST] Describe the picture in detail. [/INST] There is a dog running in the park.",
    "the quick brown fox jumps over the lazy dog " * 3,
]


def chat_tokens(family: str | None) -> tuple[str, ...]:
    """The special tokens the family's chat template needs in its tokenizer."""
    return PHI3_CHAT_TOKENS if family == "phi3" else ()


def tokenizer(with_image: bool = False, special: tuple[str, ...] = ()) -> transformers.PreTrainedTokenizerFast:
    """A tiny byte-level BPE with ``<|endoftext|>`` as EOS (Phi-2 style), optionally ``<image>``,
    and ``special`` tokens (Phi-3's chat tokens)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", *special], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>", unk_token="<|endoftext|>"
    )
    if with_image:
        fast.add_tokens([transformers.AddedToken("<image>", special=True, normalized=False)], special_tokens=True)
    return fast


# A CLIP with head_dim 64 like every OpenAI CLIP: the head count can then be inferred from shapes.
VISION_HD64 = {**hf_models.VISION, "hidden_size": 128, "num_attention_heads": 2}


def family_text_config(family: str) -> transformers.PretrainedConfig:
    """The tiny preset's decoder of ``family`` as a transformers config, with this vocabulary."""
    text = dataclasses.replace(get_preset("tiny" if family == "phi" else f"tiny_{family}").text, vocab_size=VOCAB)
    return hf_models.hf_text_config(text)


def llava_model(image_token_id: int, seed: int = 2, vision: dict | None = None, family: str | None = None,
                **text) -> transformers.LlavaForConditionalGeneration:
    """A random HF Llava: Phi (``TEXT`` + ``text`` overrides) or the tiny decoder of ``family``."""
    cfg = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(**{**hf_models.VISION, **(vision or {})}),
        text_config=family_text_config(family) if family else transformers.PhiConfig(**{**TEXT, **text}),
        image_token_index=image_token_id,
    )
    return hf_models.randomize(transformers.LlavaForConditionalGeneration(cfg), seed=seed, scale=0.1)


def llava_dir(path: Path, dtype: torch.dtype = torch.float32, **kw) -> tuple[Path, transformers.LlavaForConditionalGeneration]:
    """An HF Llava directory with a tokenizer holding ``<image>``, saved in ``dtype``."""
    tok = tokenizer(with_image=True, special=chat_tokens(kw.get("family")))
    image_id = tok.convert_tokens_to_ids("<image>")
    model = llava_model(image_id, **kw).to(dtype)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path, model


def clip_dir(path: Path, save_with_vision_model_prefix: bool = False) -> tuple[Path, transformers.CLIPVisionModel]:
    model = hf_models.clip_vision()
    model.save_pretrained(path)
    if save_with_vision_model_prefix:  # the older / hub spelling (vision_model.*)
        from safetensors.torch import save_file

        state = {"vision_model." + k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path, model


def phi_dir(path: Path, with_tokenizer: bool = True) -> tuple[Path, transformers.PhiForCausalLM]:
    model = hf_models.randomize(transformers.PhiForCausalLM(transformers.PhiConfig(**TEXT)), seed=1)
    model.save_pretrained(path)
    if with_tokenizer:
        tokenizer().save_pretrained(path)
    return path, model


# The original ALLaVA code's class and model_type per decoder (allava/model/language_model/*).
ORIGINAL_ARCHITECTURES = {
    "phi": ("LlavaPhiForCausalLM", "llava_phi"),
    "stablelm": ("LlavaStableLM_1_6bForCausalLM", "llava_stablelm_1_6b"),
    "phi3": ("LlavaPhi3ForCausalLM", "llava_phi3"),
}


def original_text_keys(text: dict) -> dict:
    """The config keys the original checkpoints carry (transformers 4 era): StableLM's remote-code
    "epoch" config (``rope_pct``, ``norm_eps``, flat ``rope_theta``); Phi-3's ``rope_scaling``."""
    text = dict(text)
    rope = text.pop("rope_parameters", None) or {}
    if text["model_type"] == "stablelm":
        text["norm_eps"] = text.pop("layer_norm_eps")
        text.update(rope_pct=rope["partial_rotary_factor"], rope_theta=rope["rope_theta"])
        text.pop("partial_rotary_factor", None)
    elif text["model_type"] == "phi3":
        text["rope_theta"] = rope["rope_theta"]
        if rope.get("rope_type") == "longrope":
            text["rope_scaling"] = {"type": "longrope", "short_factor": rope["short_factor"], "long_factor": rope["long_factor"]}
    else:
        text["rope_parameters"] = rope
    return text


def original_dir(path: Path, model: transformers.LlavaForConditionalGeneration, *, lm_head_bias: torch.Tensor | None = None,
                 with_vision: bool = True, as_bin: bool = False) -> Path:
    """The same weights in the original LLaVA/ALLaVA layout (``model.mm_projector.0`` ...)."""
    path.mkdir(parents=True, exist_ok=True)
    state = {}
    for name, t in model.state_dict().items():
        if name.startswith("model.vision_tower."):
            if not with_vision:
                continue
            new = "model.vision_tower.vision_tower.vision_model." + name.removeprefix("model.vision_tower.")
        elif name.startswith("model.multi_modal_projector."):
            new = name.replace("model.multi_modal_projector.linear_1", "model.mm_projector.0").replace(
                "model.multi_modal_projector.linear_2", "model.mm_projector.2")
        elif name.startswith("model.language_model."):
            new = "model." + name.removeprefix("model.language_model.")
        else:
            new = name
        state[new] = t.detach().clone().contiguous()
    if lm_head_bias is not None:
        state["lm_head.bias"] = lm_head_bias
    if as_bin:
        torch.save(state, path / "pytorch_model.bin")
    else:
        from safetensors.torch import save_file

        save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    text = original_text_keys(model.config.text_config.to_dict())
    architecture, model_type = ORIGINAL_ARCHITECTURES[model.config.text_config.model_type]
    config = {
        **{k: v for k, v in text.items() if k not in ("architectures", "model_type")},
        "architectures": [architecture],
        "model_type": model_type,
        "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "mm_vision_tower": "openai/clip-vit-large-patch14-336",
        "mm_hidden_size": model.config.vision_config.hidden_size,
        "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
        "image_aspect_ratio": "pad",
    }
    (path / "config.json").write_text(json.dumps(config, indent=2))
    # The original tokenizer has no <image> token.
    tokenizer(special=chat_tokens(model.config.text_config.model_type)).save_pretrained(path)
    return path


ROOT = Path(__file__).resolve().parents[1]


def generate_cli(checkpoint: Path, image: Path, question: str, max_new_tokens: int) -> str:
    """stdout of ``python -m allava_jax.generate`` (greedy) on one image and question."""
    env = cli_env()
    cmd = [sys.executable, "-m", "allava_jax.generate", "--checkpoint", str(checkpoint), "--image", str(image),
           "--prompt", question, "--max-new-tokens", str(max_new_tokens)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


def hub_names(state: dict) -> dict:
    """transformers 5 writes ``vision_tower.*``; we export the hub's ``vision_tower.vision_model.*``."""
    fix = lambda k: "vision_tower.vision_model." + k.removeprefix("vision_tower.") if k.startswith("vision_tower.") and "vision_model" not in k else k  # noqa: E731
    return {fix(k): v for k, v in state.items()}


def checkpoint_params(path):
    """A checkpoint's params as numpy."""
    return jax.tree.map(np.asarray, checkpoints.load_params(path))


def assert_trees_equal(a, b) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(np.testing.assert_array_equal, a, b)
