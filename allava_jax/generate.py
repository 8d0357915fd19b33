"""``python -m allava_jax.generate --checkpoint DIR --image cat.jpg --prompt "..."``: see ``infer/cli.py``."""

import sys

from allava_jax.infer.cli import generate_main

if __name__ == "__main__":
    sys.exit(generate_main())
