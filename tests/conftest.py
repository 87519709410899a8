import pytest
import torch

from elrea_hf.testing import tiny_llama, tiny_tokenizer


@pytest.fixture(autouse=True)
def _two_threads():
    torch.set_num_threads(2)


@pytest.fixture
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture
def tiny_model(tokenizer):
    return tiny_llama(tokenizer)
