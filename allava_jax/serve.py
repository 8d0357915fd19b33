"""``python -m allava_jax.serve --checkpoint DIR [--host H] [--port P]``: see ``infer/cli.py``."""

import sys

from allava_jax.infer.cli import serve_main

if __name__ == "__main__":
    sys.exit(serve_main())
