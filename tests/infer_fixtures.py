"""A tiny random checkpoint (with tokenizer) for the inference, server and eval tests."""

from __future__ import annotations

import atexit
import contextlib
import functools
import io
import shutil
import socket
import tempfile
import string
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import jax
import numpy as np
from PIL import Image

from allava_jax import checkpoints
import flax.linen as nn

from allava_jax.models import abstract_params, get_preset

EOS = "<|endoftext|>"
IMAGE = "<image>"


def tiny_config():
    """The tiny preset (4 image tokens per 28 px image) without lm_head bias, so HF Llava can hold it."""
    return get_preset("tiny", text={"lm_head_bias": False})


def make_tokenizer(vocab_size: int, image_token_id: int):
    """Character-level fast tokenizer: printable ASCII + newline, EOS, and ``<image>`` at ``image_token_id``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, EOS: 1}
    for ch in string.printable[:95] + "\n":
        vocab.setdefault(ch, len(vocab))
    while len(vocab) < image_token_id:
        vocab[f"<x{len(vocab)}>"] = len(vocab)
    vocab[IMAGE] = image_token_id
    for i in range(image_token_id + 1, vocab_size):
        vocab[f"<x{i}>"] = i
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, unk_token="[UNK]")
    hf.add_special_tokens({"additional_special_tokens": [IMAGE]})
    assert hf.convert_tokens_to_ids(IMAGE) == image_token_id
    return hf


def sharp_params(config, seed: int = 0, scale: float = 0.1) -> dict:
    """Random params, every leaf drawn (LayerNorm scales around 1, unit-scale embeddings), so
    greedy outputs are varied and not near-ties. Built from shapes alone: no init compile."""
    rng = np.random.default_rng(seed)

    def draw(path, shape):
        name = jax.tree_util.keystr(path)
        x = rng.standard_normal(shape.shape).astype(np.float32) * scale
        if name.endswith("['scale']"):
            return x + 1
        return x / scale if "embed_tokens" in name else x

    return jax.tree_util.tree_map_with_path(draw, nn.unbox(abstract_params(config)))


@functools.lru_cache(maxsize=None)
def shared_checkpoint() -> Path:
    """One checkpoint per test process, shared by the inference, server and eval tests."""
    root = Path(tempfile.mkdtemp(prefix="allava_infer_"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return write_checkpoint(root)


def write_checkpoint(root: Path, seed: int = 0) -> Path:
    """A checkpoint directory with params, config and tokenizer, as ``convert import`` writes."""
    config = tiny_config()
    tok_dir = root / "tok_src"
    make_tokenizer(config.text.vocab_size, config.image_token_id).save_pretrained(tok_dir)
    return checkpoints.save_model(root / "ckpt", sharp_params(config, seed), config, tokenizer_dir=tok_dir)


def png_bytes(seed: int = 0, size: tuple[int, int] = (40, 30)) -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(app: Any) -> Iterator[str]:
    """``app`` under uvicorn on a free 127.0.0.1 port, in a thread; yields ``http://127.0.0.1:P/v1``."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", log_config=None))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not server.started:
        assert thread.is_alive() and time.time() < deadline, "server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
