"""The schema of conf/: every key a composed training config may hold, with its type and
valid values, checked by :func:`validate` before a run creates anything.

Why: Hydra refuses unknown keys, but not bad values; ``train.batch_size=0`` used to start a
run (run dir, MLflow run, replay files) and die ~40 s later in a traceback, and
``train.train_ratio=-1`` trained with no updates forever.

Declarative: one dataclass per config node, one :func:`spec` per key. The annotation is the
type (``X | None``: null allowed), the field's metadata the range (``ge``/``gt``/``le``/``lt``),
the choices or a pattern; the defaults are those of the default composition (conf/config.yaml
with env=dmc_walker, model=size1m, algo=dreamerv3; a test keeps them equal). Relations between
keys are :data:`RULES`, each one expression over the config. One generic walker checks it all
and raises :class:`ConfigError` with one line: ``<key>=<value> is invalid: must be ...``.

It lives in pipelines/ beside the composition (pipelines/common.py): the library takes a
config it is handed and has no say in how the entry points compose one. It imports neither
torch nor dreamer_trl, so a bad value fails within a second (torch is imported only to ask
whether a requested CUDA device exists).
"""

from __future__ import annotations

import dataclasses
import math
import operator
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipelines.common import ConfigError

# dreamer_trl.envs.SUITES, repeated so that validating imports no torch (a test keeps them equal).
SUITES = ("gym", "dmc", "atari", "crafter", "torchrl", "brax")
DTYPES = ("float32", "bfloat16")  # dreamer_trl.precision.DTYPES, likewise
LATENT_DTYPES = ("float16", "bfloat16", "float32")  # dreamer_trl.replay._dtype, likewise
COLLECTOR_BACKENDS = ("local", "distributed", "rpc", "ray")  # dreamer_trl.collection.BACKENDS
MATMUL_PRECISIONS = ("highest", "high", "medium")  # torch.set_float32_matmul_precision's
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
DEVICE = r"cpu|cuda(:\d+)?"
NAME = r"\w[\w.-]*"
# The image encoder halves the image 4 times and needs a 3x3 to 16x16 map at the end
# (dreamer_trl.nets.ImageEncoder): 48..271 pixels.
IMAGE_MIN, IMAGE_MAX = 3 * 16, 17 * 16 - 1


def spec(
    default: Any = dataclasses.MISSING,
    *,
    factory: Any = None,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    choices: tuple[str, ...] | None = None,
    pattern: str | None = None,
    desc: str | None = None,
    why: str | None = None,
    key: str | None = None,
    optional: bool = False,
) -> Any:
    """A schema field: ``default`` (or ``factory`` for a node) and what is valid.

    ``pattern`` (a full-match regex) needs ``desc``, the words the error message uses for
    it; ``why`` is appended to the message in parentheses. ``key``: the config key when it
    is no Python identifier (``tracking.continue``). ``optional``: the key may be absent
    (configs saved before it existed, keys other tools add)."""
    meta = dict(
        ge=ge,
        gt=gt,
        le=le,
        lt=lt,
        choices=choices,
        pattern=pattern,
        desc=desc,
        why=why,
        key=key,
        optional=optional or None,
    )
    meta = {k: v for k, v in meta.items() if v is not None}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def positive(default: int) -> Any:
    return spec(default, ge=1)


def count(default: int, why: str | None = None) -> Any:
    return spec(default, ge=0, why=why)


def fraction(default: float) -> Any:
    return spec(default, ge=0, le=1)


def device(default: str) -> Any:
    return spec(default, pattern=DEVICE, desc="one of cpu, cuda, cuda:N")


# --------------------------------------------------------------------------- groups


@dataclass
class EnvConfig:
    name: str = spec(
        "dmc_walker",
        pattern=NAME,
        desc="a name of letters, digits, '_', '.' and '-'",
        why="it names the run dir and the MLflow experiment",
    )
    suite: str = spec("dmc", choices=SUITES)
    task: str = spec("walker-walk", pattern=r"\S+", desc="a task id without spaces")
    from_pixels: bool = spec(False)
    image_size: int = spec(
        64, ge=IMAGE_MIN, le=IMAGE_MAX, why="the image encoder halves it 4 times to 3x3..16x16"
    )
    render_size: int = positive(128)
    action_repeat: int = positive(1)
    max_episode_steps: int | None = spec(None, ge=1)
    noop_max: int = count(30)
    sticky: bool = spec(False)
    grayscale: bool = spec(False)
    obs_keys: list[str] | None = spec(None, optional=True)  # read by the trainer, in no yaml


@dataclass
class ModelConfig:
    name: str = spec("size1m", pattern=r"\S+", desc="a name without spaces")
    deter: int = positive(512)
    hidden: int = positive(64)
    classes: int = positive(4)
    depth: int = positive(4)
    units: int = positive(64)
    stoch: int = positive(32)
    blocks: int = positive(8)


@dataclass
class LossScales:
    rec: float = spec(1.0, ge=0)
    rew: float = spec(1.0, ge=0)
    con: float = spec(1.0, ge=0)
    dyn: float = spec(1.0, ge=0)
    rep: float = spec(0.1, ge=0)
    policy: float = spec(1.0, ge=0)
    value: float = spec(1.0, ge=0)
    repval: float = spec(0.3, ge=0)


@dataclass
class RetNorm:
    rate: float = spec(0.01, gt=0, le=1)
    limit: float = spec(1.0, gt=0)


@dataclass
class ActorConfig:
    layers: int = positive(3)
    outscale: float = spec(0.01, ge=0)
    minstd: float = spec(0.1, gt=0)
    maxstd: float = spec(1.0, gt=0)
    unimix: float = spec(0.0, ge=0, le=1, optional=True)  # configs saved before it


@dataclass
class OptimConfig:
    """``laprop`` reads lr..warmup, ``adam`` the model_/actor_/critic_/ac_ keys; a preset
    sets those of its optimiser (algo=dreamerv3_2023 inherits the laprop ones too), so each
    may be absent. Defaults: the agent's fallbacks (dreamer_trl.agent.make_optimizer)."""

    name: str = spec("laprop", choices=("laprop", "adam"))
    lr: float = spec(4e-5, gt=0, optional=True)
    agc: float = spec(0.3, gt=0, optional=True)
    pmin: float = spec(1e-3, gt=0, optional=True)
    eps: float = spec(1e-20, gt=0, optional=True)
    beta1: float = spec(0.9, ge=0, lt=1, optional=True)
    beta2: float = spec(0.999, ge=0, lt=1, optional=True)
    warmup: int = spec(1000, ge=0, optional=True)
    model_lr: float = spec(1e-4, gt=0, optional=True)
    model_clip: float = spec(1000.0, gt=0, optional=True)
    model_eps: float = spec(1e-8, gt=0, optional=True)
    actor_lr: float = spec(3e-5, gt=0, optional=True)
    critic_lr: float = spec(3e-5, gt=0, optional=True)
    ac_clip: float = spec(100.0, gt=0, optional=True)
    ac_eps: float = spec(1e-5, gt=0, optional=True)


@dataclass
class AlgoConfig:
    name: str = spec("dreamerv3", pattern=r"\S+", desc="a name without spaces")
    norm: str = spec("rms", choices=("rms", "layer"))
    unimix: float = fraction(0.01)
    num_bins: int = spec(255, ge=2, why="two-hot targets need two bins")
    bins: str = spec("symexp", choices=("symexp", "symlog"))
    free_nats: float = spec(1.0, ge=0)
    horizon: float = spec(333, ge=1, why="the continue target is 1 - 1/horizon")
    imag_horizon: int = positive(15)
    lam: float = fraction(0.95)
    actor_entropy: float = spec(3e-4, ge=0)
    slowreg: float = spec(1.0, ge=0)
    slow_rate: float = spec(0.02, gt=0, le=1)
    repval: bool = spec(True)
    actor_grad: str = spec("reinforce", choices=("reinforce", "dynamics", "auto"))
    imag_dtype: str = spec("auto", choices=("auto", *DTYPES))
    critic_layers: int = positive(3)
    train_world_model: bool = spec(True)
    train_actor: bool = spec(True)
    train_critic: bool = spec(True)
    loss_scales: LossScales = spec(factory=LossScales)
    retnorm: RetNorm = spec(factory=RetNorm)
    actor: ActorConfig = spec(factory=ActorConfig)
    optim: OptimConfig = spec(factory=OptimConfig)
    # Network structure (dreamer_trl.agent; the 2023 code's in algo=dreamerv3_2023). Optional:
    # configs saved before these keys existed built the reference's structure.
    gru: str = spec("block", choices=("block", "plain"), optional=True)
    initial: str = spec("zeros", choices=("zeros", "learned"), optional=True)
    init: str = spec("fan_in", choices=("fan_in", "fan_avg"), optional=True)
    cnn: str = spec("maxpool", choices=("maxpool", "stride"), optional=True)
    cont: str = spec("prob", choices=("prob", "mode"), optional=True)
    norm_eps: float = spec(1e-4, gt=0, optional=True)
    hidden_bias: bool = spec(True, optional=True)
    enc_layers: int = spec(3, ge=1, optional=True)
    dec_layers: int = spec(3, ge=1, optional=True)
    reward_layers: int = spec(1, ge=0, optional=True)
    cont_layers: int = spec(1, ge=0, optional=True)
    prior_layers: int = spec(2, ge=1, optional=True)
    post_layers: int = spec(1, ge=1, optional=True)
    vector_units: int | None = spec(None, ge=1, optional=True)


# --------------------------------------------------------------------------- config.yaml


@dataclass
class TrainConfig:
    total_steps: int = positive(1_100_000)
    train_ratio: float = spec(1024, gt=0, why="replayed steps per env step")
    batch_size: int = positive(16)
    seq_len: int = positive(64)
    train_start: int = count(1024)
    random_steps: int = count(0)
    # Metrics and the free-disk check run every log_every steps: 0 would turn both off.
    log_every: int = positive(1000)
    eval_every: int = count(10000, why="0: only at the end")
    eval_episodes: int = positive(10)
    checkpoint_every: int = count(10000, why="0: only at the end")
    keep_checkpoints: int = positive(2)
    progress: bool = spec(True)
    # Stored experience (dreamer_trl.datasets, dreamer_trl.offline). Optional: configs saved
    # before these keys trained online only.
    dataset: str | None = spec(None, optional=True)
    pretrain: int = spec(0, ge=0, optional=True)
    offline: bool = spec(False, optional=True)
    total_updates: int = spec(0, ge=0, optional=True)
    heldout_every: int = spec(0, ge=0, optional=True)


@dataclass
class ReplayConfig:
    capacity: int = positive(5_000_000)
    storage: str = spec("memmap", choices=("memmap", "tensor"))
    latent_dtype: str = spec("float16", choices=LATENT_DTYPES, optional=True)  # older configs
    device: str = device("cpu")
    online: bool = spec(True)
    prefetch: str = spec("auto", choices=("auto", "always", "never"), optional=True)


@dataclass
class CollectorConfig:
    backend: str = spec("local", choices=COLLECTOR_BACKENDS, optional=True)
    num_workers: int = positive(1)
    envs: int = positive(1)
    parallel: bool = spec(False)
    frames_per_batch: int = positive(16)
    device: str = device("cpu")


@dataclass
class EvalConfig:
    greedy: bool = spec(False)
    video: bool = spec(True)
    video_max_steps: int = positive(500)


@dataclass
class CompileConfig:
    enabled: bool = spec(False)
    mode: str | None = spec(None, choices=COMPILE_MODES)
    policy: bool = spec(True)
    steps: bool = spec(True)
    observe_chunk: int = positive(4)


@dataclass
class PerfConfig:
    sync: bool = spec(False)


@dataclass
class ReferenceConfig:
    file: str | None = spec(None)
    task: str | None = spec(None)


@dataclass
class TrackingConfig:
    enabled: bool = spec(True)
    experiment: str | None = spec(None)
    uri: str | None = spec(None)
    continue_: bool = spec(False, key="continue", optional=True)
    log_model: bool = spec(True, optional=True)
    register: str | None = spec(
        None, pattern=NAME, desc="a name of letters, digits, '_', '.' and '-'", optional=True
    )


@dataclass
class DreamerConfig:
    env: EnvConfig = spec(factory=EnvConfig)
    model: ModelConfig = spec(factory=ModelConfig)
    algo: AlgoConfig = spec(factory=AlgoConfig)
    seed: int = spec(0, ge=0, le=2**31 - 1, why="env seeds add offsets to it below 2**32")
    device: str = spec("auto", pattern=rf"auto|{DEVICE}", desc="one of auto, cpu, cuda, cuda:N")
    threads: int = count(0, why="0: torch's default")
    run_dir: str | None = spec(None)
    resume: str | None = spec(None)
    resume_fallback: bool = spec(False, optional=True)
    matmul_precision: str = spec("highest", choices=MATMUL_PRECISIONS, optional=True)
    train: TrainConfig = spec(factory=TrainConfig)
    replay: ReplayConfig = spec(factory=ReplayConfig)
    collector: CollectorConfig = spec(factory=CollectorConfig)
    eval: EvalConfig = spec(factory=EvalConfig)
    compile: CompileConfig = spec(factory=CompileConfig)
    perf: PerfConfig = spec(factory=PerfConfig, optional=True)
    reference: ReferenceConfig = spec(factory=ReferenceConfig)
    tracking: TrackingConfig = spec(factory=TrackingConfig)


@dataclass(frozen=True)
class Rule:
    """``key`` is invalid unless ``test`` (an expression over the config, dotted keys as
    attributes) holds; ``must`` says what is valid, ``{expr}`` parts evaluated the same way."""

    key: str
    test: str
    must: str


RULES: tuple[Rule, ...] = (
    Rule(
        "train.train_start",
        "train.train_start >= train.seq_len + 1",
        "must be >= train.seq_len+1 = {train.seq_len + 1}: the first update samples sequences "
        "of T+1 steps of one env stream",
    ),
    Rule(
        "replay.capacity",
        "replay.capacity >= train.batch_size * (train.seq_len + 1)",
        "must be >= train.batch_size*(train.seq_len+1) = "
        "{train.batch_size * (train.seq_len + 1)}: replay holds at least one batch",
    ),
    Rule(
        "replay.capacity",
        "replay.capacity >= train.train_start",
        "must be >= train.train_start = {train.train_start}: updates begin once replay holds "
        "train_start steps, which it never would",
    ),
    Rule(
        "replay.device",
        "replay.storage != 'memmap' or replay.device == 'cpu'",
        "needs replay.storage=tensor: a memmap storage lives in host memory (valid with "
        "memmap: replay.device=cpu)",
    ),
    Rule(
        "train.offline",
        "not train.get('offline') or train.get('dataset')",
        "needs train.dataset=<Minari dataset or run dir>: an offline run trains only on "
        "stored experience",
    ),
    Rule(
        "train.heldout_every",
        "not train.get('heldout_every') or (train.get('dataset') and train.heldout_every >= 2)",
        "must be 0 (nothing held out) or >= 2 with train.dataset set: every k-th episode of "
        "the dataset is kept out of training as a validation set",
    ),
    Rule(
        "train.total_updates",
        "not train.get('offline') or train.get('total_updates', 0) >= 1",
        "must be >= 1 with train.offline=true: the offline run's budget in updates",
    ),
    Rule(
        "collector.frames_per_batch",
        "collector.frames_per_batch % collector.envs == 0",
        "must be a multiple of collector.envs={collector.envs}: a batch holds the same number "
        "of steps from each env",
    ),
    Rule(
        "model.deter",
        "model.deter % model.blocks == 0",
        "must be divisible by model.blocks={model.blocks}: the block GRU splits it evenly",
    ),
    Rule(
        "algo.actor.maxstd",
        "algo.actor.maxstd >= algo.actor.minstd",
        "must be >= algo.actor.minstd={algo.actor.minstd}",
    ),
    Rule(
        "algo.train_world_model",
        "algo.train_world_model or algo.train_actor or algo.train_critic",
        "with algo.train_actor=false and algo.train_critic=false too, no update would "
        "change anything: valid: at least one of the three true",
    ),
    Rule(
        "algo.cnn",
        "algo.get('cnn') != 'stride' or env.image_size in (64, 128, 256)",
        "needs env.image_size 64, 128 or 256 (it is {env.image_size}): the stride-2 CNN "
        "halves the image down to 4x4",
    ),
    Rule(
        "env.task",
        "env.suite != 'dmc' or '-' in env.task",
        "must be 'domain-task' with env.suite=dmc, e.g. walker-walk",
    ),
    Rule(
        "env.task",
        "env.suite != 'crafter' or env.task in ('reward', 'noreward')",
        "must be reward or noreward with env.suite=crafter",  # dreamer_trl.envs.CRAFTER_TASKS
    ),
    Rule(
        "env.task",
        "env.suite != 'torchrl' or env.task in ('pendulum',)",
        "must be pendulum with env.suite=torchrl",  # dreamer_trl.device_envs.TASKS
    ),
)
CUDA_KEYS = ("device", "replay.device", "collector.device")


# --------------------------------------------------------------------------- checking


def validate(cfg: DictConfig | dict) -> None:
    """Raise ConfigError (one line) unless every key of ``cfg`` is known and valid."""
    if isinstance(cfg, DictConfig):
        try:
            data = OmegaConf.to_container(cfg, resolve=True)
        except OmegaConfBaseException as err:
            where = getattr(err, "full_key", None) or "the config"
            raise ConfigError(f"{where} does not resolve: {str(err).splitlines()[0]}") from None
    else:
        data = dict(cfg)
    data.pop("hydra", None)  # Hydra's own node, when a config is composed with it
    check_node(data, DreamerConfig, "")
    view = _View.of(data)
    for rule in RULES:
        if not _eval(rule.test, view):
            must = re.sub(r"\{([^}]+)\}", lambda m: _show(_eval(m.group(1), view)), rule.must)
            raise ConfigError(f"{rule.key}={_show(_lookup(data, rule.key))} is invalid: {must}")
    _check_cuda(data)


def schema_keys(schema: type = DreamerConfig) -> dict[str, dict]:
    """Every dotted key of ``schema`` to its field's metadata (for tests and docs)."""
    out: dict[str, dict] = {}
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        key = f.metadata.get("key", f.name)
        tp, _ = _unwrap(hints[f.name])
        if dataclasses.is_dataclass(tp):
            out.update({f"{key}.{k}": m for k, m in schema_keys(tp).items()})
        else:
            out[key] = dict(f.metadata)
    return out


def schema_defaults(schema: type = DreamerConfig) -> dict[str, Any]:
    """The schema's defaults as a nested dict keyed like the config."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(schema):
        value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(value):
            value = schema_defaults(type(value))
        out[f.metadata.get("key", f.name)] = value
    return out


def check_node(node: Any, schema: type, path: str) -> None:
    """Check ``node`` (a plain dict) against the dataclass ``schema``, ``path`` its key."""
    hints = typing.get_type_hints(schema)
    fields = {f.metadata.get("key", f.name): f for f in dataclasses.fields(schema)}
    if not isinstance(node, dict):
        raise ConfigError(
            f"{path}={_show(node)} is invalid: must be a mapping of {', '.join(fields)}"
        )
    for key in node:
        if key not in fields:
            where = f" under '{path}'" if path else ""
            raise ConfigError(
                f"unknown config key '{_join(path, key)}'; valid keys{where}: {', '.join(fields)}"
            )
    for key, f in fields.items():
        if key in node:
            _check_value(node[key], hints[f.name], f.metadata, _join(path, key))
        elif not f.metadata.get("optional"):
            raise ConfigError(f"config key '{_join(path, key)}' is missing (conf/ lacks it)")


def _check_value(value: Any, tp: Any, meta: dict, key: str) -> None:
    tp, nullable = _unwrap(tp)
    if value is None and nullable:
        return
    if dataclasses.is_dataclass(tp):
        check_node(value, tp, key)
        return
    if not _valid(value, tp, meta):
        must = _describe(tp, meta, nullable)
        raise ConfigError(f"{key}={_show(value)} is invalid: must be {must}")


def _valid(value: Any, tp: Any, meta: dict) -> bool:
    if typing.get_origin(tp) is list:
        (item,) = typing.get_args(tp)
        return isinstance(value, list) and all(_valid(v, item, {}) for v in value)
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:  # an int is a valid number; nan and inf are no size or rate
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        ok = ok and math.isfinite(value)
    elif tp is str:
        ok = isinstance(value, str)
        if ok and "choices" in meta:
            return value in meta["choices"]
        if ok and "pattern" in meta:
            return re.fullmatch(meta["pattern"], value) is not None
        return ok
    else:
        raise TypeError(f"schema type {tp!r} is not supported")
    bounds = {"ge": operator.ge, "gt": operator.gt, "le": operator.le, "lt": operator.lt}
    return ok and all(test(value, meta[name]) for name, test in bounds.items() if name in meta)


def _describe(tp: Any, meta: dict, nullable: bool) -> str:
    if typing.get_origin(tp) is list:
        text = "a list of strings"
    elif tp is bool:
        text = "true or false"
    elif "choices" in meta:
        text = f"one of {', '.join(meta['choices'])}"
    elif "desc" in meta:
        text = meta["desc"]
    elif tp is str:
        text = "a string"
    else:
        text = ("an integer" if tp is int else "a number") + _range(meta)
    if nullable:
        text += " or null"
    if "why" in meta:
        text += f" ({meta['why']})"
    return text


def _range(meta: dict) -> str:
    lo = ("[", meta["ge"]) if "ge" in meta else ("(", meta["gt"]) if "gt" in meta else None
    hi = ("]", meta["le"]) if "le" in meta else (")", meta["lt"]) if "lt" in meta else None
    if lo and hi:
        return f" in {lo[0]}{_show(lo[1])}, {_show(hi[1])}{hi[0]}"
    if lo:
        return f" {'>=' if lo[0] == '[' else '>'} {_show(lo[1])}"
    if hi:
        return f" {'<=' if hi[0] == ']' else '<'} {_show(hi[1])}"
    return ""


def _unwrap(tp: Any) -> tuple[Any, bool]:
    """(type, whether null is allowed) of ``X`` or ``X | None``."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
        raise TypeError(f"schema type {tp!r}: only X | None unions are supported")
    return tp, False


def _show(value: Any) -> str:
    """A value the way one writes it on the command line; a string that would read as
    another type there (``'16'``, ``''``) is quoted, so the message is not misleading."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return repr(value) if _reads_as_other(value) else value
    if isinstance(value, list):
        return f"[{','.join(_show(v) for v in value)}]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_show(v)}" for k, v in value.items()) + "}"
    return str(value)


def _reads_as_other(text: str) -> bool:
    if not text or text != text.strip() or " " in text:
        return True
    if text.lower() in ("true", "false", "null", "none"):
        return True
    try:
        float(text)
    except ValueError:
        return False
    return True


def _check_cuda(data: dict) -> None:
    """A CUDA device that torch cannot see fails here, not after the run dir exists."""
    wanted = [(k, _lookup(data, k)) for k in CUDA_KEYS]
    wanted = [(k, v) for k, v in wanted if isinstance(v, str) and v.startswith("cuda")]
    if not wanted:
        return
    import torch  # only when CUDA is asked for: validating stays torch-free otherwise

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for key, name in wanted:
        index = int(name.partition(":")[2] or 0)
        if index >= n:
            valid = "cpu" + (", auto" if key == "device" else "")
            if n:
                valid += ", cuda, " + ", ".join(f"cuda:{i}" for i in range(n))
            raise ConfigError(
                f"{key}={name} is invalid: torch {torch.__version__} sees "
                f"{n or 'no'} CUDA device{'s' if n != 1 else ''}; valid here: {valid}"
            )


class _View(dict):
    """A config dict whose keys read as attributes, for the rules' expressions."""

    __getattr__ = dict.__getitem__

    @classmethod
    def of(cls, data: Any) -> Any:
        return cls({k: cls.of(v) for k, v in data.items()}) if isinstance(data, dict) else data


def _eval(expr: str, view: _View) -> Any:
    # The expressions are RULES in this file, never user input.
    return eval(expr, {"__builtins__": {}}, view)  # noqa: S307


def _lookup(data: dict, dotted: str) -> Any:
    node: Any = data
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else str(key)
