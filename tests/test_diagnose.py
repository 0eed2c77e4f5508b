"""pipelines/diagnose_cartpole.py: options are checked before anything loads."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipelines.common import ConfigError  # noqa: E402
from pipelines.diagnose_cartpole import parse  # noqa: E402


def test_options_parse():
    assert parse(["ckpt=runs/x", "episodes=3"]) == {"ckpt": "runs/x", "episodes": 3, "seed": 100}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["episodes=3"], "ckpt=<checkpoint dir | run dir> is required"),
        (["ckpt=a", "greedy=true"], "unknown option 'greedy=true'; valid"),
    ],
)
def test_bad_options_rejected(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse(argv)
