"""The composition example of docs/architecture.md runs as written."""

import re
from pathlib import Path

import torch

DOC = Path(__file__).resolve().parent.parent / "docs" / "architecture.md"


def test_architecture_example_runs(capsys):
    torch.manual_seed(0)
    text = DOC.read_text()
    code = re.search(r"<!-- example -->\n```python\n(.*?)```", text, re.S).group(1)
    scope: dict = {}
    exec(compile(code, str(DOC), "exec"), scope)
    out = scope["out"]
    losses = {k for k in out.keys() if k.startswith("loss_")}
    assert losses == {
        f"loss_{k}" for k in ("rec", "rew", "con", "dyn", "rep", "policy", "value", "repval")
    }
    assert all(torch.isfinite(out[k]) for k in losses)
    assert "loss_rec" in capsys.readouterr().out


def test_model_sizes_match_conf():
    from omegaconf import OmegaConf

    from dreamer_trl import MODEL_SIZES

    conf = Path(__file__).resolve().parent.parent / "conf" / "model"
    for name, size in MODEL_SIZES.items():
        cfg = OmegaConf.to_container(OmegaConf.load(conf / f"{name}.yaml"))
        assert cfg.pop("name") == name
        assert cfg == size
    assert {p.stem for p in conf.glob("*.yaml")} == set(MODEL_SIZES)
