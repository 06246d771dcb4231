import os

# Simulated devices for sharding tests; must be set before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


import pytest  # noqa: E402 — after the environment above


@pytest.fixture(scope="session")
def chat_model(tmp_path_factory):
    """A tiny chat model directory (HF safetensors + the example's tokenizer and chat template); read only.
    hidden 64, 4 heads × 16, 2 kv heads, mlp 96, vocab 49152: divisible by 2, 4 and 8 for sharding tests."""
    from tiny import save_chat_model

    d = tmp_path_factory.mktemp("chat_model")
    save_chat_model(d)
    return d
