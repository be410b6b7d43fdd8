"""Test-wide setup: nothing reaches the Hugging Face Hub, and tokenizers stay single-threaded."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"


import pytest  # noqa: E402  (after the environment is set)


@pytest.fixture()
def fresh_accelerate_state():
    """accelerate keeps process-wide singletons; tests that build an Accelerator in-process reset them."""
    from accelerate.state import AcceleratorState, GradientState

    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture()
def accelerator(fresh_accelerate_state):
    from accelerate import Accelerator

    return Accelerator(cpu=True)


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory):
    """One tiny SDXL model per test process, shared by every test that only reads it."""
    from sdft.tiny import build_sdxl

    return build_sdxl(tmp_path_factory.mktemp("models") / "tiny-sdxl")


@pytest.fixture(scope="session")
def tiny_sd3(tmp_path_factory):
    """One tiny SD3 model per test process, shared by every test that only reads it."""
    from sdft.tiny import build_sd3

    return build_sd3(tmp_path_factory.mktemp("models") / "tiny-sd3")


@pytest.fixture()
def one_thread():
    """Tiny models run fastest on one thread (extra threads only contend on a shared machine), and
    reductions then do not depend on the worker's thread count (the golden numbers need that)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
