"""Shared test setup: the CPU vLLM environment and the cached offline fixtures."""

import os

# Set before anything imports vLLM: CPU platform, a small KV cache, the engine in-process (no
# engine-core subprocess to leak when a test fails), and no tokenizer thread pools.
os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402

from tlq_vllm.testing import FIXTURES, build_fixture  # noqa: E402

FIXTURE_NAMES = list(FIXTURES)


@pytest.fixture(scope="session", params=FIXTURE_NAMES)
def fixture_dir(request):
    """Each tiny VLM fixture's directory (built once, then cached across runs)."""
    return build_fixture(request.param)


@pytest.fixture(scope="session")
def sample_image():
    """One easy-vqa training image (64x64 RGB PNG of a coloured shape)."""
    import easy_vqa
    from PIL import Image

    return Image.open(easy_vqa.get_train_image_paths()[0]).convert("RGB")


@pytest.fixture
def captured_linear_inputs(monkeypatch):
    """Every (first linear of the group, its input [T, in]) that the layer-wise calibration captures
    during the test, in order: what the calibrator's statistics were computed from."""
    import tlq_vllm.calibrate.layerwise as layerwise

    seen = []
    original = layerwise.capture_linear_inputs

    def spy(layer, names, hidden, kwargs):
        x = original(layer, names, hidden, kwargs)
        seen.append((names[0], x.clone()))
        return x

    monkeypatch.setattr(layerwise, "capture_linear_inputs", spy)
    return seen
