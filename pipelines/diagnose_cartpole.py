"""Why does a CartPole agent fail? `python pipelines/diagnose_cartpole.py ckpt=<checkpoint
dir | run dir> [episodes=6]`.

Plays episodes of Gymnasium CartPole-v1 with the checkpoint's agent (sampled actions, as in
eval) and prints, per episode: its length, how it ended (cart off the track or pole down),
the mean action, the critic's value at the start against the discounted return actually
collected (γ = 1 − 1/horizon), the continue head on the terminal observation itself, and
the lowest continue an imagined rollout predicts when started 2, 6 and 12 steps before
the end. These are the numbers behind docs/results.md's CartPole diagnosis.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipelines.common import ConfigError, key_values, run_cli  # noqa: E402

X_LIMIT, THETA_LIMIT = 2.4, 0.2095


def parse(argv: list[str]) -> dict:
    opts = key_values(argv, {"ckpt": None, "episodes": "6", "seed": "100"})
    if not opts["ckpt"]:
        raise ConfigError("ckpt=<checkpoint dir | run dir> is required")
    return {"ckpt": opts["ckpt"], "episodes": int(opts["episodes"]), "seed": int(opts["seed"])}


def play(agent, env, seed: int) -> tuple[list, dict]:
    """One episode: per-step (obs, deter, stoch, feat, action) and how it ended."""
    import torch

    wm, rssm = agent.world_model, agent.world_model.rssm
    obs, _ = env.reset(seed=seed)
    deter, stoch = rssm.initial(1)
    prev = torch.zeros(1, agent.action_dim)
    first = torch.ones(1, dtype=torch.bool)
    steps = []
    while True:
        token = wm.encoder({"observation": torch.as_tensor(obs, dtype=torch.float32)[None]})
        deter, stoch, _ = rssm.obs_step(deter, stoch, prev, token, first)
        feat = torch.cat([deter, stoch.flatten(-2)], -1)
        action = agent.actor.sample(agent.actor(feat))
        steps.append((obs, deter, stoch, feat, action))
        first, prev = torch.zeros(1, dtype=torch.bool), action
        obs, _, terminated, truncated, _ = env.step(int(action.argmax()))
        if terminated or truncated:
            break
    token = wm.encoder({"observation": torch.as_tensor(obs, dtype=torch.float32)[None]})
    d_end, s_end, _ = rssm.obs_step(deter, stoch, prev, token, first)
    end_feat = torch.cat([d_end, s_end.flatten(-2)], -1)
    end = {"obs": obs, "terminated": terminated, "cont": torch.sigmoid(wm.cont(end_feat)).item()}
    return steps, end


def report(agent, steps: list, end: dict) -> str:
    import numpy as np
    import torch

    length, obs = len(steps), end["obs"]
    if not end["terminated"]:
        how = "time limit"
    elif abs(obs[0]) > X_LIMIT:
        how = f"cart off the track (x {obs[0]:+.2f}, theta {obs[2]:+.3f})"
    else:
        how = f"pole down (theta {obs[2]:+.3f}, x {obs[0]:+.2f})"
    gamma = 1.0 - 1.0 / agent.world_model.horizon
    collected = (1 - gamma**length) / (1 - gamma)
    value = agent.critic.predict(agent.critic(steps[0][3])).item()
    mean_action = float(np.mean([int(s[4].argmax()) for s in steps]))
    lines = [
        f"length {length}: {how}; mean action {mean_action:.2f}; value at start {value:.1f} "
        f"vs discounted return collected {collected:.1f}; continue on the terminal "
        f"observation {end['cont']:.3f}"
    ]
    if end["terminated"]:
        for back in (12, 6, 2):
            if back > length:
                continue
            _, d, s, _, _ = steps[length - back]
            torch.manual_seed(0)
            img = agent.loss.actor_loss.imagine(d.repeat(64, 1), s.repeat(64, 1, 1))
            lines.append(
                f"    imagined from {back:2d} steps before the end: lowest continue over "
                f"{img.cont.shape[1] - 1} steps {img.cont.min(1).values.mean():.3f} (mean of 64)"
            )
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    opts = parse(argv)
    import gymnasium as gym
    import torch

    from pipelines.evaluate import load_agent_trainer, locate_checkpoint

    torch.set_num_threads(1)
    path = locate_checkpoint(opts["ckpt"])
    with tempfile.TemporaryDirectory(prefix="dreamer_diag_") as scratch:
        trainer, state = load_agent_trainer(path, {"device": "cpu", "greedy": False}, scratch)
    if trainer.cfg.env.get("task") != "CartPole-v1":
        raise ConfigError(f"{path} was trained on {trainer.cfg.env.get('task')!r}, not CartPole-v1")
    print(f"{path} (env step {state['counters']['env_steps']})")
    env = gym.make("CartPole-v1")
    with torch.no_grad():
        for k in range(opts["episodes"]):
            print(
                f"episode {k}: "
                + report(trainer.agent, *play(trainer.agent, env, opts["seed"] + k))
            )
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
