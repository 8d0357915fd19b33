"""Loading a local tokenizer: never from a hub, never with remote code, one clear error."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from allava_jax.errors import UserError


def load_tokenizer(tokenizer: Any) -> Any:
    """A tokenizer object as it is, or a local directory loaded with ``AutoTokenizer``."""
    if not isinstance(tokenizer, (str, Path)):
        return tokenizer
    directory = Path(tokenizer)
    if not directory.is_dir():
        raise UserError(f"{directory}: no such tokenizer directory (give a local directory with tokenizer.json "
                        "or the files save_pretrained writes; nothing is downloaded)")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(directory), local_files_only=True, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - transformers raises many types for a bad directory
        raise UserError(f"{directory}: cannot load a tokenizer: {type(e).__name__}: {e}") from None
