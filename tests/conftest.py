import os
import tempfile

# Simulated devices for sharding tests; must be set before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
# One persistent XLA compilation cache for this pytest run, shared by the `jaxft` processes
# the CLI tests start (they inherit the environment): a resume test's second and third process load the
# program instead of compiling it (a cached executable is the
# same binary, so bit-exact comparisons between processes are unaffected). Fresh per run, never reused across
# runs: the suite's time stays that of a clean checkout.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    tempfile.gettempdir(), f"jaxft-tests-xla-{os.environ.get('PYTEST_XDIST_TESTRUNUID') or os.getpid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# ... but not in the pytest workers themselves: a worker segfaulted once (2026-12-07) inside jax's
# cache write (compilation_cache.put_executable_and_time, serializing test_generate's program), and a crashed
# xdist worker left the whole run hanging. Only the CLI processes the tests start (which read the variables
# above) use the cache, which is where it saved time.
import jax  # noqa: E402 — after XLA_FLAGS above

jax.config.update("jax_enable_compilation_cache", False)


import pytest  # noqa: E402 — after the environment above


@pytest.fixture(scope="session")
def chat_model(tmp_path_factory):
    """A tiny chat model directory (HF safetensors + the example's tokenizer and chat template); read only.
    hidden 64, 4 heads × 16, 2 kv heads, mlp 96, vocab 49152: divisible by 2, 4 and 8 for sharding tests."""
    from tiny import save_chat_model

    d = tmp_path_factory.mktemp("chat_model")
    save_chat_model(d)
    return d
