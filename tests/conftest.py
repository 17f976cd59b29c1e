"""Test setup, before jax is imported: 8 host CPU devices, fp32 matmuls for parity checks, a compilation cache
shared with the CLI subprocesses the tests start (the same programs compile once per session), and a temporary
$XDG_CACHE_HOME for what they store by default; after each test, jax's in-memory caches are cleared."""

import atexit
import gc
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache = tempfile.mkdtemp(prefix="qwen-moe-jax-test-xla-cache-")
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
_home_cache = tempfile.mkdtemp(prefix="qwen-moe-jax-test-home-cache-")  # what CLI runs store by default (grammars)
atexit.register(shutil.rmtree, _home_cache, ignore_errors=True)
os.environ["XDG_CACHE_HOME"] = _home_cache
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(autouse=True)
def _free_compiled_programs():
  """Each CPU executable holds a few memory maps until it is freed, and a process may hold 65,530 (Linux's
  vm.max_map_count): the session compiles thousands of programs, which held in jax's caches crashed XLA
  mid-run (in `executable.serialize`). The next test that needs one loads it from the compilation cache."""
  yield
  jax.clear_caches()
  gc.collect()
