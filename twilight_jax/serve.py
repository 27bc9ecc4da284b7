"""``python -m twilight_jax.serve``: the documented entry point of the OpenAI-compatible server.

It only forwards to ``twilight_jax.runtime.serve``, where the command line lives, so the
runtime keeps its own folder while the command stays the one the README gives.
"""

import sys

from twilight_jax.runtime.serve import main

if __name__ == "__main__":
    sys.exit(main())
