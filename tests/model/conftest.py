"""Shared set-up for the model tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_intra_op_thread():
    """These tests run many tiny float64 ops; with several intra-op threads on a small, busy
    machine, thread wake-ups cost 10-40x the arithmetic. One thread, restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
