import os

# Tests run on CPU unless a GPU run asks otherwise (TWILIGHT_TEST_PLATFORM=gpu on the device).
os.environ.setdefault("JAX_PLATFORMS", os.environ.get("TWILIGHT_TEST_PLATFORM", "cpu"))
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
