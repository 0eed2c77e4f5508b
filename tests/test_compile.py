"""The compiled update computes the same losses and the same parameter step as eager
(issue 5: correctness unchanged by ``compile.enabled``). A tiny model and short sequences
keep each compile to a few minutes. ``compile_fn`` leaves random ops to torch's generator,
so compiled and eager runs draw the same samples from the same seed. The bf16 case is
``slow`` (``make test-slow``)."""

from __future__ import annotations

import copy

import pytest
import torch
from test_agent import make_batch

from dreamer_trl.agent import DreamerV3Agent
from dreamer_trl.world_model import ObsSpace

LOSSES = ("rec", "rew", "con", "dyn", "rep", "policy", "value", "repval")
MODEL = dict(deter=32, hidden=8, classes=4, units=8, depth=2, stoch=4, blocks=4)
# One layer per MLP (every head and the RSSM's prior still there): a cold compile on CPU is
# ~5 s of C++ per kernel and the dynamo/AOT trace grows with the ops; equality with eager
# does not depend on the depth.
SHALLOW = dict(
    enc_layers=1, dec_layers=1, critic_layers=1, prior_layers=1, post_layers=1,
    actor={"layers": 1},
)


# (imag_dtype, rtol): float32 must match to float rounding; bfloat16 to bf16 rounding, since
# inductor keeps fused intermediates in float32 where eager rounds every op to bf16.
# The backend: "aot_eager" captures the whole update as torch.compile does (dynamo's trace,
# AOT autograd's joint graph: where this code could break a compile — graph breaks, buffer
# mutation, random ops) and runs the captured graph with eager kernels, in seconds;
# "inductor" also generates and runs the C++ kernels (~6 min cold on a busy 2-core CPU,
# 75 kernels), so it is slow: the fast aot_eager case covers the capture.
CASES = [
    ("float32", 1e-4, "aot_eager"),
    pytest.param("float32", 1e-4, "inductor", marks=pytest.mark.slow),
    pytest.param("bfloat16", 2e-2, "inductor", marks=pytest.mark.slow),
]


@pytest.mark.parametrize(("imag_dtype", "rtol", "backend"), CASES)
def test_compiled_update_matches_eager(imag_dtype, rtol, backend):
    torch.manual_seed(0)
    # Horizon 2 and 3 replay steps (context + 2): the whole update is traced with its loops
    # unrolled, so these set the graph's size; each loop still runs more than one step.
    algo = {"imag_horizon": 2, "imag_dtype": imag_dtype, "optim": {"warmup": 0}, **SHALLOW}
    eager = DreamerV3Agent(ObsSpace({"observation": 5}, {}), 2, False, MODEL, algo)
    compiled = copy.deepcopy(eager)
    compiled.compile(backend=backend)
    batch = make_batch(eager, {"observation": torch.randn(2, 3, 5)}, 2, 3)
    for step in range(2):  # the second step runs on optimiser state the first one built
        torch.manual_seed(step)
        out_e = eager.update(batch.clone())
        torch.manual_seed(step)
        out_c = compiled.update(batch.clone())
        for k in LOSSES:
            torch.testing.assert_close(
                out_c[f"loss_{k}"], out_e[f"loss_{k}"], rtol=rtol, atol=rtol / 10, msg=k
            )
    for (name, p_e), p_c in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(p_c, p_e, rtol=rtol, atol=rtol / 100, msg=name)


def test_compiled_steps_match_eager():
    """compile.steps: the compiled observe and imagination steps give the eager results."""
    torch.manual_seed(0)
    algo = {"imag_horizon": 3, "imag_dtype": "float32", **SHALLOW}
    agent = DreamerV3Agent(ObsSpace({"observation": 5}, {}), 2, False, MODEL, algo)
    deter, stoch = torch.randn(6, 32), torch.randn(6, 4, 4).softmax(-1)
    seq = agent.loss.sequence(make_batch(agent, {"observation": torch.randn(2, 5, 5)}, 2, 5))

    def run():
        torch.manual_seed(1)
        losses, _, d, s, _ = agent.loss.wm_loss.observe(seq)
        grads = torch.autograd.grad(
            sum(v.mean() for v in losses.values()),
            list(agent.world_model.parameters()),
            allow_unused=True,
        )
        return (
            d,
            s,
            [g for g in grads if g is not None],
            agent.loss.actor_loss.imagine(deter, stoch),
        )

    d_e, s_e, g_e, img_e = run()
    agent.compile_steps(observe_chunk=2)  # T=5: chunks of 2, 2 and 1 steps
    d_c, s_c, g_c, img_c = run()
    torch.testing.assert_close(d_c, d_e)
    torch.testing.assert_close(s_c, s_e)
    for a, b in zip(g_c, g_e):  # the compiled backward of the observe step
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(img_c.feat, img_e.feat)
    torch.testing.assert_close(img_c.action, img_e.action)
    torch.testing.assert_close(img_c.ret, img_e.ret)
