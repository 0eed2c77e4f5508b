"""Exports of the acting step and the MLflow model: a tiny CartPole run trained with tracking
logs its policy as a registered pyfunc model, which loads from the registry and acts; ONNX
(in onnxruntime, also without torch), TorchScript (in a fresh process) and pt2 exports match
the eager step to 1e-5, sampled with fixed noise and deterministic; the CLI and bad input."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tiny import train_tiny  # noqa: E402

from dreamer_trl import load_policy  # noqa: E402
from dreamer_trl.export import (  # noqa: E402
    describe,
    example_inputs,
    export_policy,
    input_names,
    read_metadata,
)
from dreamer_trl.onnx_policy import OnnxPolicy  # noqa: E402
from pipelines import export as export_cli  # noqa: E402
from pipelines.common import ConfigError, run_cli  # noqa: E402

MODEL = "tiny-cartpole-policy"
TOL = 1e-5


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture(scope="module")
def tracked(tmp_path_factory, store) -> tuple[Path, str]:
    """A finished tracked CartPole run that registered its model: (run dir, run id)."""
    root = tmp_path_factory.mktemp("tracked")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", store)
        mp.chdir(root)
        tracking = ("tracking.enabled=true", f"tracking.register={MODEL}")
        run_dir = train_tiny(root, "cartpole", tracking)
    state = torch.load(run_dir / "checkpoints" / "step_64" / "state.pt", weights_only=False)
    return run_dir, state["mlflow_run_id"]


@pytest.fixture(scope="module")
def pendulum(tiny_run) -> Path:
    return tiny_run("pendulum")


@pytest.fixture(scope="module")
def pendulum_onnx(pendulum, tmp_path_factory) -> Path:
    return export_policy(load_policy(pendulum), tmp_path_factory.mktemp("onnx") / "p.onnx")


@pytest.fixture(scope="module")
def cartpole_onnx(tracked, store, tmp_path_factory) -> Path:
    """The ONNX file inside the tracked run's MLflow model."""
    from mlflow.artifacts import download_artifacts

    out = tmp_path_factory.mktemp("model")
    with pytest.MonkeyPatch.context() as mp:  # where runs:/ (a logged model) is looked up
        mp.setenv("MLFLOW_TRACKING_URI", store)
        model = download_artifacts(f"runs:/{tracked[1]}/policy", dst_path=str(out))
    return Path(model) / "artifacts" / "policy.onnx"


# --------------------------------------------------------------------------- ONNX


# The tracked run (training, then its MLflow model with an ONNX export) costs ~20 s more.
@pytest.mark.parametrize("env", [pytest.param("cartpole", marks=pytest.mark.slow), "pendulum"])
def test_onnx_in_onnxruntime_matches_eager(request, env):
    """Three consecutive steps, batch 1 and 3 (a first step, then carried state), sampled
    with fixed noise and deterministic: every output within 1e-5 of the eager step."""
    names = {"cartpole": ("tracked", "cartpole_onnx"), "pendulum": ("pendulum", "pendulum_onnx")}
    run, path = (request.getfixturevalue(name) for name in names[env])
    source = run[0] if env == "cartpole" else run  # tracked: (run dir, run id)
    policy = load_policy(source)
    session = OnnxPolicy(path).session
    names = input_names(policy)
    for batch in (1, 3):
        for deterministic in (False, True):
            args = list(example_inputs(policy, batch, seed=batch))
            args[-1] = torch.tensor(deterministic)
            for _ in range(3):
                with torch.no_grad():
                    want = [x.numpy() for x in policy.step(*args)]
                got = session.run(None, {n: a.numpy() for n, a in zip(names, args)})
                for w, g in zip(want, got):
                    assert w.shape == g.shape and w.dtype == g.dtype
                    np.testing.assert_allclose(g, w, rtol=0, atol=TOL)
                k = len(policy.obs_keys)
                args[k : k + 3] = [torch.from_numpy(x) for x in got[1:]]  # the state carries
                args[k + 3] = torch.zeros(batch, dtype=torch.bool)
                args[k + 4] = torch.rand(batch, policy.world_model.rssm.stoch)  # fresh noise
    assert read_metadata(path) == json.loads(json.dumps(describe(policy)))


@pytest.mark.slow  # one more ONNX export, of a CNN: ~20-60 s
def test_onnx_of_a_dict_observation_with_pixels_and_integers(tmp_path):
    """Vector, image and integer keys in one policy: the export matches the eager step."""
    from dreamer_trl import DreamerV3Agent
    from dreamer_trl.inference import ActionSpace, Policy
    from dreamer_trl.world_model import IntVector, ObsSpace

    torch.manual_seed(0)
    grid = IntVector(low=(0, 1), classes=(4, 3))
    space = ObsSpace({"observation": 5}, {"pixels": (3, 64, 64)}, {"grid": grid})
    size = dict(deter=64, hidden=16, classes=4, units=16, depth=2)
    agent = DreamerV3Agent(space, 3, True, size, {"imag_dtype": "float32"})
    policy = Policy(agent.world_model, agent.actor, space, ActionSpace(True, 3))
    session = OnnxPolicy(export_policy(policy, tmp_path / "dict.onnx")).session
    assert [i.name for i in session.get_inputs()][:3] == ["observation", "grid", "pixels"]
    for deterministic in (False, True):
        args = list(example_inputs(policy, 3, seed=4))
        args[-1] = torch.tensor(deterministic)
        with torch.no_grad():
            want = [x.numpy() for x in policy.step(*args)]
        got = session.run(None, {n: a.numpy() for n, a in zip(input_names(policy), args)})
        for w, g in zip(want, got):
            np.testing.assert_allclose(g, w, rtol=0, atol=TOL)


def test_onnx_runs_without_torch(pendulum_onnx, tmp_path):
    """onnx_policy.py by itself (torch made unimportable) drives a Pendulum episode."""
    script = textwrap.dedent(
        f"""
        import importlib.util, sys
        sys.modules["torch"] = None  # any import of torch now fails
        path = {str(ROOT / "dreamer_trl" / "onnx_policy.py")!r}
        spec = importlib.util.spec_from_file_location("runner", path)
        runner = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(runner)
        import gymnasium as gym
        import numpy as np
        policy = runner.OnnxPolicy({str(pendulum_onnx)!r})
        env = gym.make("Pendulum-v1", max_episode_steps=50)
        obs, _ = env.reset(seed=0)
        state, done, total = policy.initial_state(), False, 0.0
        rng = np.random.default_rng(0)
        while not done:
            action, state = policy.act(obs, state, rng=rng)
            assert env.action_space.contains(action), action
            obs, reward, terminated, truncated, _ = env.step(action)
            total, done = total + reward, terminated or truncated
        assert "torch" not in [m.split(".")[0] for m in sys.modules if sys.modules[m]]
        print("return", total)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("return ")


# --------------------------------------------------------------------------- TorchScript, pt2


def test_torchscript_loads_in_a_fresh_process(pendulum, tmp_path):
    policy = load_policy(pendulum)
    path = export_policy(policy, tmp_path / "policy.pt", "torchscript")
    args = example_inputs(policy, 3, seed=2)
    with torch.no_grad():
        want = policy.step(*args)
    torch.save(args, tmp_path / "inputs.pt")
    script = textwrap.dedent(
        f"""
        import sys, torch
        module = torch.jit.load({str(path)!r})
        extra = {{"dreamer_trl.json": ""}}
        torch.jit.load({str(path)!r}, _extra_files=extra)
        args = torch.load({str(tmp_path / "inputs.pt")!r})
        out = module(*args)
        torch.save(list(out), {str(tmp_path / "out.pt")!r})
        assert not any(m.startswith("dreamer_trl") for m in sys.modules)
        print(len(extra["dreamer_trl.json"]))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert int(proc.stdout.strip()) > 100  # the description travels with the file
    for w, g in zip(want, torch.load(tmp_path / "out.pt")):
        torch.testing.assert_close(g, w, rtol=0, atol=TOL)


def test_pt2_export_matches_eager(pendulum, tmp_path):
    policy = load_policy(pendulum)
    path = export_policy(policy, tmp_path / "policy.pt2", "pt2")
    program = torch.export.load(str(path)).module()
    for batch in (1, 4):
        args = example_inputs(policy, batch, seed=batch)
        with torch.no_grad():
            for w, g in zip(policy.step(*args), program(*args)):
                torch.testing.assert_close(g, w, rtol=0, atol=TOL)
    assert read_metadata(path)["action_space"]["low"] == [-2.0]


# --------------------------------------------------------------------------- MLflow model


@pytest.mark.slow  # a tracked training run that logs and registers its model: ~25 s
def test_mlflow_model_loads_from_the_registry_and_acts(tracked, store, monkeypatch):
    import mlflow
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    run_dir, run_id = tracked
    client = MlflowClient(tracking_uri=store)
    assert client.get_run(run_id).info.status == "FINISHED"
    assert client.get_model_version(MODEL, "1").run_id == run_id

    model = mlflow.pyfunc.load_model(f"models:/{MODEL}/1")
    names = [spec.name for spec in model.metadata.get_input_schema().inputs]
    assert names == ["observation", "deter", "stoch", "prev_action", "is_first"]
    batch = 5
    obs = np.random.default_rng(0).normal(size=(batch, 4)).astype(np.float32)
    state = {
        "deter": np.zeros((batch, 64), np.float32),
        "stoch": np.zeros((batch, 32, 4), np.float32),
        "prev_action": np.zeros((batch, 2), np.float32),
        "is_first": np.ones(batch, bool),
    }
    out = model.predict({"observation": obs, **state}, params={"seed": 3})
    assert out["action"].shape == (batch,) and set(out["action"]) <= {0, 1}
    assert out["deter"].shape == (batch, 64) and not out["is_first"].any()
    again = model.predict({"observation": obs, **state}, params={"seed": 3})
    np.testing.assert_array_equal(out["action"], again["action"])  # the seed fixes the noise
    nxt = model.predict({"observation": obs, **{k: out[k] for k in state}})
    assert nxt["deter"].shape == (batch, 64)

    # The same model in Python: from the registry, and from the run id (its run dir).
    for source in (f"models:/{MODEL}/1", run_id):
        policy = load_policy(source)
        action, _ = policy.act(obs, policy.initial_state(batch), deterministic=True)
        assert action.shape == (batch,)
    logged = load_policy(f"models:/{MODEL}/1").world_model.state_dict()
    direct = load_policy(run_dir).world_model.state_dict()
    assert logged.keys() == direct.keys()
    for key in logged:
        torch.testing.assert_close(logged[key], direct[key])


# --------------------------------------------------------------------------- CLI, bad input


def one_line_error(capsys, argv: list[str], *words: str) -> None:
    capsys.readouterr()
    assert run_cli(export_cli.main, argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert all(w in err for w in words), err


def test_export_cli(pendulum, tmp_path, capsys):
    out = tmp_path / "pendulum.pt"
    capsys.readouterr()
    assert run_cli(export_cli.main, [f"ckpt={pendulum}", "format=torchscript", f"out={out}"]) == 0
    line = capsys.readouterr().out.strip()
    assert "\n" not in line and f"as torchscript -> {out}" in line, line
    assert "matches the eager step to" in line and out.is_file()

    one_line_error(capsys, [f"ckpt={pendulum}", "format=tflite"], "unknown format 'tflite'",
                   "onnx, torchscript, pt2")
    one_line_error(capsys, ["format=onnx"], "ckpt=<checkpoint dir")
    one_line_error(capsys, [f"ckpt={tmp_path / 'nope'}"], "the path does not exist")
    one_line_error(capsys, [f"ckpt={out}"], "it is a file but not state.pt")
    with pytest.raises(ValueError) as err:
        export_policy(load_policy(pendulum), tmp_path / "x", "tflite")
    assert str(err.value) == "unknown export format 'tflite'; valid: onnx, torchscript, pt2"


# --------------------------------------------------------------------------- make bench


def test_bench_latency_plumbing(capsys):
    from pipelines import bench_latency

    out = bench_latency.run_all({**bench_latency.defaults(), "devices": ["cpu"], "quick": True})
    rows = out["cpu"]["ms_per_step"]
    assert set(rows) == {"1", "16"} and set(rows["16"]) == {"eager"}
    assert all(v > 0 for v in rows["1"].values())
    bench_latency.print_latency_table(out)
    assert "== acting latency, cpu: ms per step, tiny walker policy ==" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="valid are auto, cpu, gpu or cpu,gpu"):
        bench_latency.parse_options(["devices=tpu"])
    with pytest.raises(ConfigError, match="must be integers"):
        bench_latency.parse_options(["batches=one"])


@pytest.mark.slow  # torch.compile (twice) and an ONNX export of the bench's policy
def test_bench_latency_times_eager_compiled_and_onnx(monkeypatch):
    from pipelines import bench_latency

    monkeypatch.setattr(bench_latency, "SIZE1M", bench_latency.TINY)
    opts = {**bench_latency.defaults(), "devices": ["cpu"], "steps": 2, "rounds": 1}
    rows = bench_latency.run_all(opts)["cpu"]["ms_per_step"]
    assert set(rows["1"]) == set(rows["16"]) == {"eager", "compiled", "onnx"}
