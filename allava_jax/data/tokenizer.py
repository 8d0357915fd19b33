"""Loading a tokenizer directory (local or ``gs://``): never from a hub, never with remote code,
one clear error. A remote directory is copied once to the local cache (``storage.local_dir``):
HF tokenizers read local files only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from allava_jax import storage
from allava_jax.errors import UserError


def load_tokenizer(tokenizer: Any) -> Any:
    """A tokenizer object as it is, or a directory loaded with ``AutoTokenizer``."""
    if not isinstance(tokenizer, (str, Path)):
        return tokenizer
    directory = storage.local_dir(tokenizer) if storage.is_remote(tokenizer) else Path(tokenizer)
    if not directory.is_dir():
        raise UserError(f"{directory}: no such tokenizer directory (give a local directory with tokenizer.json "
                        "or the files save_pretrained writes; nothing is downloaded)")
    from transformers import AutoTokenizer, PretrainedConfig

    kwargs = dict(local_files_only=True, trust_remote_code=False)
    try:
        return AutoTokenizer.from_pretrained(str(directory), **kwargs)
    except Exception as first:  # noqa: BLE001 - transformers raises many types for a bad directory
        try:
            # A model config.json that transformers cannot read without remote code (original
            # ALLaVA's llava_phi3, with rope_scaling) must not stop the tokenizer files loading.
            return AutoTokenizer.from_pretrained(str(directory), config=PretrainedConfig(), **kwargs)
        except Exception:  # noqa: BLE001
            raise UserError(f"{directory}: cannot load a tokenizer: {type(first).__name__}: {first}") from None
