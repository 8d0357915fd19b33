"""What the chunked offline jobs share (`curate score` / `embed`, `data plan`): a run directory
refused when it was made with other inputs, and each process's share of the chunks.

With ``num_shards`` processes (``--shard-index/--num-shards``, or ``jax.distributed``'s process
index and count where the job was started that way), process ``i`` computes the chunks ``c`` with
``c % n == i`` into the same directory on a shared filesystem; whoever finds every chunk present
merges.
"""

from __future__ import annotations

import json
from pathlib import Path

from allava_jax.errors import UserError
from allava_jax.files import atomic_write


def check_identity(out: Path, name: str, ident: dict, what: str, remedy: str = "use another --out") -> None:
    """Write ``ident`` to ``out/name``, or refuse if the directory holds a run with another one."""
    path = out / name
    if path.exists():
        old = json.loads(path.read_text())
        changed = [k for k in ident if old.get(k) != ident[k]]
        if changed:
            raise UserError(f"{out} holds {what} made with other {', '.join(changed)}; {remedy}")
    else:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps(ident, indent=1))


def shard_of(shard_index: int | None, num_shards: int | None) -> tuple[int, int]:
    """(index, count): the flags, else this process's place in a ``jax.distributed`` job."""
    if num_shards is None:
        import jax

        return jax.process_index(), jax.process_count()
    if not 0 <= (shard_index or 0) < num_shards:
        raise UserError(f"--shard-index {shard_index} must be in [0, --num-shards {num_shards})")
    return shard_index or 0, num_shards


def my_chunks(num_chunks: int, shard: tuple[int, int]) -> range:
    """The chunks process ``shard[0]`` of ``shard[1]`` computes."""
    return range(shard[0], num_chunks, shard[1])
