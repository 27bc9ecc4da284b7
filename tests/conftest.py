import gc
import os

import pytest

# Tests run on CPU unless a GPU run asks otherwise (TWILIGHT_TEST_PLATFORM=gpu on the device).
os.environ.setdefault("JAX_PLATFORMS", os.environ.get("TWILIGHT_TEST_PLATFORM", "cpu"))
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drops jax's compiled programs after each test module. Every CPU executable holds a few
    memory maps of JIT code until it is freed, and the interpret-mode kernel tests compile
    thousands: kept for the whole session they reached the kernel's limit of 65530 maps
    (vm.max_map_count) near the end of the suite, where LLVM then crashed compiling the next
    program (a segmentation fault in the CI run of 2026-12-04). One module's worth stays
    well under it (test_spgemv: ~5400 maps, ~570 after the release)."""
    yield
    import jax

    jax.clear_caches()
    gc.collect()
