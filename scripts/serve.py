"""OpenAI-compatible server with Twilight sparse attention (same as python -m twilight_jax.serve).

python scripts/serve.py                          # embedded default model, 127.0.0.1:8000
python scripts/serve.py --model tiny-random      # a random toy model, for CPU smoke tests
python scripts/serve.py --selector dense         # the dense baseline
"""

from __future__ import annotations

import sys

from twilight_jax.runtime.serve import main

if __name__ == "__main__":
    sys.exit(main())
