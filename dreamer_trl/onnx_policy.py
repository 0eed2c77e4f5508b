"""Run an exported policy (``make export FORMAT=onnx``) with numpy and onnxruntime only.

Self-contained: it imports neither torch nor the rest of dreamer_trl, so it can be copied
next to ``policy.onnx`` on a machine that has only ``numpy`` and ``onnxruntime``::

    policy = OnnxPolicy("policy.onnx")
    state = policy.initial_state()
    action, state = policy.act(obs, state)         # obs: array, or dict by key

It is also the code of the MLflow pyfunc model a finished training run logs (MLflow loads
this file as the model, "models from code"): ``predict`` takes the observation keys and the
state (``deter``, ``stoch``, ``prev_action``, ``is_first``), batch first, and returns the
env's ``action`` with the next state under the same names; params ``deterministic``
(actor's mode) and ``seed`` (of the sampling noise; -1 draws fresh noise).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

try:
    from mlflow.pyfunc import PythonModel
except ImportError:  # serving without MLflow: OnnxPolicy alone
    PythonModel = object

STATE_KEYS = ("deter", "stoch", "prev_action", "is_first")
META_KEY = "dreamer_trl"  # the export's description (dreamer_trl.export.describe)


class OnnxPolicy:
    """An ONNX export of the acting step, with the state and noise bookkeeping of
    ``dreamer_trl.Policy``: numpy in, numpy out, batched [B, ...] or single."""

    def __init__(self, path: str, threads: int = 1):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads  # one step is small: threads cost more than win
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        props = self.session.get_modelmeta().custom_metadata_map
        if META_KEY not in props:
            raise ValueError(f"{path} is no dreamer_trl policy export (no {META_KEY!r} metadata)")
        self.meta = json.loads(props[META_KEY])
        self.inputs = {i["name"]: i for i in self.meta["inputs"]}
        self.obs_keys = list(self.meta["obs_keys"])

    def initial_state(self, batch: int = 1) -> dict[str, np.ndarray]:
        state = {k: np.zeros([batch, *self._shape(k)], np.float32) for k in STATE_KEYS[:3]}
        state["is_first"] = np.ones(batch, bool)
        return state

    def act(
        self,
        obs: Any,
        state: dict[str, np.ndarray],
        deterministic: bool = False,
        rng: np.random.Generator | None = None,
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """One step: (the env's action, the next state). ``rng`` draws the noise."""
        obs = obs if isinstance(obs, dict) else {self.obs_keys[0]: obs}
        feeds = {k: np.asarray(obs[k]) for k in self.obs_keys}
        single = feeds[self.obs_keys[0]].ndim == len(self._shape(self.obs_keys[0]))
        if single:
            feeds = {k: v[None] for k, v in feeds.items()}
        out = self.predict({**feeds, **state}, deterministic, rng=rng)
        action = out.pop("action")
        return (action[0] if single else action), out

    def predict(
        self,
        data: dict[str, np.ndarray],
        deterministic: bool = False,
        seed: int = -1,
        rng: np.random.Generator | None = None,
    ) -> dict[str, np.ndarray]:
        """A batch of observations and states in, ``action`` and the next state out."""
        batch = len(np.asarray(data[self.obs_keys[0]]))
        given = {**self.initial_state(batch), **data}  # no state given: a first step
        rng = rng or np.random.default_rng(None if seed < 0 else seed)
        feeds = {k: self._cast(k, given[k]) for k in (*self.obs_keys, *STATE_KEYS)}
        feeds.update(self.noise(batch, rng))
        feeds["deterministic"] = np.array(bool(deterministic))
        action, deter, stoch, prev = self.session.run(None, feeds)
        return {
            "action": action,
            "deter": deter,
            "stoch": stoch,
            "prev_action": prev,
            "is_first": np.zeros(batch, bool),
        }

    def noise(self, batch: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """The step's sampling noise: uniforms for the latent, uniforms (discrete) or
        standard normals (continuous) for the action."""
        action_shape = [batch, *self._shape("action_noise")]
        if self.meta["noise"]["action_noise"] == "normal":
            action = rng.standard_normal(action_shape, dtype=np.float32)
        else:
            action = rng.random(action_shape, dtype=np.float32)
        stoch = rng.random([batch, *self._shape("stoch_noise")], dtype=np.float32)
        return {"stoch_noise": stoch, "action_noise": action}

    def serving_example(self) -> dict[str, np.ndarray]:
        """The first step of one env with all-zero observations (an MLflow input example)."""
        obs = {k: np.zeros([1, *self._shape(k)], self.inputs[k]["dtype"]) for k in self.obs_keys}
        return {**obs, **self.initial_state(1)}

    def _shape(self, name: str) -> list[int]:
        return list(self.inputs[name]["shape"][1:])

    def _cast(self, name: str, value: Any) -> np.ndarray:
        spec = self.inputs[name]
        array = np.asarray(value)
        want = (len(array), *self._shape(name)) if array.ndim else None
        if want is None or array.shape != want:
            raise ValueError(
                f"input {name!r} has shape {array.shape}; expected (B, "
                f"{', '.join(map(str, self._shape(name)))})"
            )
        if spec["dtype"] == "uint8" and array.dtype != np.uint8:
            raise ValueError(f"input {name!r} has dtype {array.dtype}; images are uint8")
        return array.astype(spec["dtype"], copy=False)


class PolicyModel(PythonModel):
    """The MLflow pyfunc face of :class:`OnnxPolicy` (artefact ``policy``: the .onnx)."""

    # predict takes a dict of arrays, which the model's tensor signature checks; MLflow's
    # type-hint validation (and its warning that predict has no hints) does not apply.
    _skip_type_hint_validation = True

    def load_context(self, context: Any) -> None:
        self.policy = OnnxPolicy(context.artifacts["policy"])

    def predict(self, context, model_input, params=None):
        # MLflow hands a dict of arrays, checked against the signature's tensors (a
        # DataFrame sent to a served model is converted to that too).
        params = params or {}
        deterministic = bool(params.get("deterministic", False))
        return self.policy.predict(dict(model_input), deterministic, int(params.get("seed", -1)))


def _set_model() -> None:
    """MLflow loads this file as a model's code: the model is the instance set here."""
    try:
        from mlflow.models import set_model
    except ImportError:
        return
    set_model(PolicyModel())


_set_model()
