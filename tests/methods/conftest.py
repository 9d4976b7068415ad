import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The method tests' shapes are small: one thread is fastest, and CI runners are shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
