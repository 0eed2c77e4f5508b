"""Test-session settings."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _single_thread():
    """Tests use tiny tensors: one intra-op thread is faster, and on a busy 2-core machine
    far more so (two OpenMP threads fighting other processes stall for seconds)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """``tiny_run(env)``: the run dir of a finished untracked ``tiny.train_tiny`` run of
    ``env``, trained once per session on first use. Read only (copy it to change it)."""
    from tiny import train_tiny

    root, runs = tmp_path_factory.mktemp("tiny_runs"), {}

    def get(env: str):
        if env not in runs:
            runs[env] = train_tiny(root, env)
        return runs[env]

    return get
