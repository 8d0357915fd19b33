"""What the ``--config`` commands share (``train``, ``train.compile``): absl flag parsing and the
config file's loading, with bad input as one line and exit 2."""

from __future__ import annotations

import sys

from absl import flags
from ml_collections import ConfigDict, config_flags

from allava_jax.errors import UserError


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a bad flag or ``--config.FIELD`` override as one line and exit 2."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        print(f"error: {e} (--helpfull lists the flags)", file=sys.stderr)
    except (AttributeError, KeyError) as e:  # ml_collections: an override of a field the config lacks
        if not any(arg.startswith("--config.") for arg in argv):
            raise  # from the config file's own code: a bug there, keep its traceback
        print(f"error: a --config.FIELD override names no field of the config: {e}", file=sys.stderr)
    sys.exit(2)


def load_config(holder: flags.FlagHolder) -> ConfigDict:
    """The ``--config`` file's config; ml_collections defers a file it cannot load to first use."""
    cfg = holder.value
    try:
        cfg.keys()  # a file that failed to load gives a stand-in that raises on first use
        return cfg
    except OSError as e:
        detail = " ".join(line.strip() for line in str(e).splitlines()[-2:])
        raise UserError(f"--config {config_flags.get_config_filename(flags.FLAGS[holder.name])}: {detail}") from None
