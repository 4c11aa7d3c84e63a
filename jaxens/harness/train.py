"""Train a small Llama-style member from scratch on the real texts (same tokenizer as SmolLM2).

The member is :class:`jaxens.models.llama.Llama` with SmolLM2's vocabulary (``v = 49,152``), tied
embeddings and ``L`` layers of width ``d``.  Training minimises the mean next-token cross-entropy
over windows ``x_{0:T+1}`` drawn uniformly from the training split's token stream
(:func:`jaxens.harness.data.token_stream`):

    ℒ(θ) = −1/(B T) Σ_b Σ_{t<T} log softmax(f_θ(x^b_{0:t+1}))[x^b_{t+1}]

with AdamW (Loshchilov & Hutter, 2019; decoupled weight decay on matrices and embeddings, not on
RMSNorm weights), global-norm gradient clipping, and a learning rate that rises linearly for
``warmup_steps`` and then follows a cosine to ``min_lr_ratio · lr`` (``optax.warmup_cosine_decay_schedule``).
The cost of a step is dominated by the ``(B T) × d × v`` unembedding and its softmax, so small
widths (``n·d ≪ v``) are cheap to train.

Everything is deterministic given :class:`TrainConfig` (``seed`` fixes the initialisation and the
window draws).  The result is saved as a Hugging Face directory (``config.json`` +
``model.safetensors`` via :func:`jaxens.models.loading.save_hf_dir`, the tokenizer files, and
``jaxens_train.json`` holding the recipe, the data hash and the measured losses), which
:func:`jaxens.models.loading.load_hf_dir` and ``transformers.AutoTokenizer`` read.

Held-out perplexity (:func:`window_perplexity`) scores a token sequence in consecutive windows of
``T`` predicted tokens, each window's context restarting (positions ``0 … T``), the setting the
member was trained in.

The zoo's trained members (``smollm2-tiny-64``, ``-128``, ``-256``) are fixed recipes in
:data:`RECIPES`; :func:`load_or_train` returns the cached checkpoint or trains it once (the zoo,
:mod:`jaxens.harness.zoo`, calls it with its cache directory and tokenizer loader; this module
does not import the zoo).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float, Int
from tqdm.auto import tqdm

from jaxens.harness import data as jdata
from jaxens.harness.files import atomic_directory
from jaxens.models.llama import Llama, LlamaConfig
from jaxens.models.llama.params import init_params as _unit_draws
from jaxens.models.loading import save_hf_dir

META_FILE = "jaxens_train.json"
TOKENIZER_SOURCE = "smollm2-135m"
FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """A training recipe: the member's shape, the optimiser and the data (all static)."""

    d_model: int = 64
    n_layers: int = 2
    head_dim: int = 32
    d_ff: int | None = None  # default 4 d
    vocab_size: int = 49152
    seq_len: int = 128
    batch_size: int = 8
    steps: int = 300
    learning_rate: float = 3e-3
    warmup_steps: int = 30
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    grad_clip: float = 1.0
    init_std: float = 0.02
    rope_theta: float = 10000.0
    seed: int = 0
    eval_every: int = 100
    eval_windows: int = 32
    files: tuple[str, ...] | None = None  # None: every *.txt of the data directory

    def __post_init__(self):
        for name in ("d_model", "n_layers", "head_dim", "vocab_size", "seq_len", "batch_size", "steps",
                     "eval_windows"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"Expected {name} > 0, got {getattr(self, name)}")
        if self.d_model % self.head_dim:
            raise ValueError(f"d_model={self.d_model} must be a multiple of head_dim={self.head_dim}")
        if not (0 <= self.warmup_steps <= self.steps):
            raise ValueError(f"Expected 0 <= warmup_steps <= steps={self.steps}, got {self.warmup_steps}")
        if not (self.learning_rate > 0 and 0 <= self.min_lr_ratio <= 1 and self.grad_clip > 0):
            raise ValueError("Expected learning_rate > 0, 0 <= min_lr_ratio <= 1 and grad_clip > 0, got "
                             f"{self.learning_rate}, {self.min_lr_ratio}, {self.grad_clip}")
        if self.files is not None:
            object.__setattr__(self, "files", tuple(self.files))

    def model_config(self) -> LlamaConfig:
        n_heads = self.d_model // self.head_dim
        return LlamaConfig(
            vocab_size=self.vocab_size, d_model=self.d_model, n_layers=self.n_layers, n_heads=n_heads,
            n_kv_heads=n_heads, d_ff=self.d_ff or 4 * self.d_model, head_dim=self.head_dim,
            rope_theta=self.rope_theta, rms_eps=1e-5, tie_embeddings=True, max_len=self.seq_len,
        )

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["files"] = list(self.files) if self.files is not None else None
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig fields {unknown}")
        d = dict(d)
        if d.get("files") is not None:
            d["files"] = tuple(d["files"])
        return cls(**d)


# The zoo's trained members: one recipe each.
RECIPES: dict[str, TrainConfig] = {
    "smollm2-tiny-64": TrainConfig(d_model=64, n_layers=2, batch_size=4, steps=400, learning_rate=1e-2,
                                   warmup_steps=40),
    "smollm2-tiny-128": TrainConfig(d_model=128, n_layers=2, batch_size=4, steps=300, learning_rate=5e-3,
                                    warmup_steps=30),
    "smollm2-tiny-256": TrainConfig(d_model=256, n_layers=2, batch_size=4, steps=200, learning_rate=3e-3,
                                    warmup_steps=20),
}


# --- model and loss -------------------------------------------------------------------------------
def init_params(config: LlamaConfig, key: Array, std: float = 0.02) -> dict[str, Array]:
    """The training initialisation: matrices and embeddings ``std · z``, the output projections
    (``layers/wo``, ``layers/w_down``) ``std / √(2L) · z``, RMSNorm weights 1, where ``z ~ N(0, 1)``
    are the draws of :func:`jaxens.models.llama.init_params` at unit scale (same key, same tensors)."""
    z = _unit_draws(config, key, std=1.0)
    out = {}
    for name, x in z.items():
        if name.endswith("norm"):
            out[name] = jnp.ones(x.shape, jnp.float32)
        else:
            s = std / np.sqrt(2 * config.n_layers) if name in ("layers/wo", "layers/w_down") else std
            out[name] = s * x
    return out


def forward_logits(config: LlamaConfig, params: Mapping[str, Array], tokens: Int[Array, "B T"]) -> Float[Array, "B T V"]:
    """Logits of a full causal pass of ``tokens`` (positions ``0 … T−1``) through ``Llama(config, params)``."""
    b, t = tokens.shape
    model = Llama(config, params)
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    logits, _ = model(tokens, positions, model.init_cache(b, t), jnp.zeros((), jnp.int32), jnp.ones((b, t), bool))
    return logits


def token_losses(config: LlamaConfig, params: Mapping[str, Array], windows: Int[Array, "B T1"]) -> Float[Array, "B T"]:
    """``−log p(x_{t+1} | x_{≤t})`` for every window ``x_{0:T+1}``."""
    logits = forward_logits(config, params, windows[:, :-1])
    targets = windows[:, 1:]
    lse = jax.nn.logsumexp(logits, axis=-1)
    return lse - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    sched = optax.warmup_cosine_decay_schedule(
        0.0, cfg.learning_rate, cfg.warmup_steps, max(cfg.steps, cfg.warmup_steps + 1),
        end_value=cfg.learning_rate * cfg.min_lr_ratio,
    )
    return optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip),
        optax.adamw(sched, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay,
                    mask=lambda p: {k: not k.endswith("norm") for k in p}),
    )


@functools.lru_cache(maxsize=8)
def _compiled(cfg: TrainConfig):
    """``(optimizer, train_step)``, the step jitted for this recipe (one compile)."""
    mcfg = cfg.model_config()
    tx = make_optimizer(cfg)

    def loss_fn(params, windows):
        return jnp.mean(token_losses(mcfg, params, windows))

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def train_step(params, opt_state, windows):
        loss, grads = jax.value_and_grad(loss_fn)(params, windows)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return tx, train_step


@functools.lru_cache(maxsize=8)
def _nll_sum(mcfg: LlamaConfig):
    @jax.jit
    def f(params, windows, valid):
        return jnp.sum(jnp.where(valid, token_losses(mcfg, params, windows), 0.0))

    return f


def _masked_nll(mcfg: LlamaConfig, params, windows: np.ndarray, valid: np.ndarray, batch_size: int) -> float:
    """Σ of the valid tokens' NLL, in batches of ``batch_size`` windows (the last padded: one compile)."""
    f = _nll_sum(mcfg)
    pad = -len(windows) % batch_size
    windows = np.concatenate([windows, np.zeros((pad, windows.shape[1]), np.int32)])
    valid = np.concatenate([valid, np.zeros((pad, valid.shape[1]), bool)])
    return sum(float(f(params, jnp.asarray(windows[i:i + batch_size]), jnp.asarray(valid[i:i + batch_size])))
               for i in range(0, len(windows), batch_size))


# --- data windows -----------------------------------------------------------------------------
def eval_windows(stream: np.ndarray, seq_len: int, count: int | None = None) -> np.ndarray:
    """Non-overlapping windows of ``seq_len + 1`` tokens (consecutive windows share one token, so every
    token but the first is predicted once); ``count`` evenly spaced ones when given."""
    n = (len(stream) - 1) // seq_len
    if n < 1:
        raise ValueError(f"a stream of {len(stream)} tokens is too short for one window of {seq_len + 1}")
    starts = np.arange(n) * seq_len
    if count is not None and count < n:
        starts = starts[np.linspace(0, n - 1, count).round().astype(int)]
    return np.stack([stream[s:s + seq_len + 1] for s in starts]).astype(np.int32)


def mean_loss(cfg: TrainConfig, params, windows: np.ndarray) -> float:
    """Mean per-token loss over ``windows`` (batched by ``cfg.batch_size``; the last batch padded)."""
    valid = np.ones((len(windows), windows.shape[1] - 1), bool)
    return _masked_nll(cfg.model_config(), params, windows, valid, cfg.batch_size) / valid.size


def window_perplexity(model: Llama, ids: np.ndarray, seq_len: int, batch_size: int = 8) -> float:
    """``exp`` of the mean NLL of ``ids[1:]`` scored in consecutive windows of ``seq_len`` predicted
    tokens, the context restarting at each window (the last, shorter window included)."""
    ids = np.asarray(ids, np.int32).ravel()
    n = ids.size
    if n < 2:
        raise ValueError(f"Expected at least 2 tokens to score, got {n}")
    n_w = -(-(n - 1) // seq_len)
    padded = np.zeros(n_w * seq_len + 1, np.int32)
    padded[:n] = ids
    starts = np.arange(n_w) * seq_len
    windows = padded[starts[:, None] + np.arange(seq_len + 1)]
    valid = starts[:, None] + np.arange(1, seq_len + 1) < n
    params = {k: jnp.asarray(v) for k, v in model.params_numpy().items()}
    return float(np.exp(_masked_nll(model.config, params, windows, valid, batch_size) / (n - 1)))


# --- training ---------------------------------------------------------------------------------
@dataclasses.dataclass
class TrainResult:
    model: Llama
    history: list[dict]  # {"step", "loss", "val_loss"?, "seconds"}
    seconds: float


def train_member(
    cfg: TrainConfig,
    train_tokens: np.ndarray,
    val_tokens: np.ndarray | None = None,
    *,
    progress: bool = True,
    desc: str = "training",
) -> TrainResult:
    """Train ``Llama(cfg.model_config())`` from scratch on windows of ``train_tokens`` (see the module
    docstring); validation loss on ``val_tokens`` every ``cfg.eval_every`` steps and at the end."""
    train_tokens = np.asarray(train_tokens, np.int32)
    if train_tokens.ndim != 1 or train_tokens.size < cfg.seq_len + 2:
        raise ValueError(f"Expected a 1-D token stream longer than seq_len + 1 = {cfg.seq_len + 1}, "
                         f"got shape {train_tokens.shape}")
    if train_tokens.min() < 0 or train_tokens.max() >= cfg.vocab_size:
        raise ValueError(f"token ids must lie in [0, {cfg.vocab_size}), got [{train_tokens.min()}, {train_tokens.max()}]")
    mcfg = cfg.model_config()
    tx, step_fn = _compiled(cfg)
    params = init_params(mcfg, jax.random.key(cfg.seed), cfg.init_std)
    opt_state = tx.init(params)
    rng = np.random.default_rng(cfg.seed)
    val_w = eval_windows(np.asarray(val_tokens, np.int32), cfg.seq_len, cfg.eval_windows) if val_tokens is not None else None
    n_starts = train_tokens.size - cfg.seq_len
    offsets = np.arange(cfg.seq_len + 1)
    history: list[dict] = []
    t0 = time.perf_counter()
    bar = tqdm(range(1, cfg.steps + 1), desc=desc, disable=not progress, dynamic_ncols=True)
    val = None
    for step in bar:
        starts = rng.integers(0, n_starts, size=cfg.batch_size)
        windows = jnp.asarray(train_tokens[starts[:, None] + offsets])
        params, opt_state, loss = step_fn(params, opt_state, windows)
        rec = {"step": step, "loss": float(loss)}
        if not np.isfinite(rec["loss"]):
            raise FloatingPointError(f"training loss became {rec['loss']} at step {step}: lower learning_rate")
        if val_w is not None and cfg.eval_every > 0 and (step % cfg.eval_every == 0 or step == cfg.steps):
            val = mean_loss(cfg, params, val_w)
            rec["val_loss"] = val
        rec["seconds"] = time.perf_counter() - t0
        history.append(rec)
        bar.set_postfix(loss=f"{rec['loss']:.3f}", **({"val": f"{val:.3f}"} if val is not None else {}))
    params = jax.tree.map(np.asarray, params)
    return TrainResult(Llama(mcfg, params), history, time.perf_counter() - t0)


def save_member(result: TrainResult, cfg: TrainConfig, out: str | os.PathLike, tokenizer=None,
                extra: Mapping | None = None) -> Path:
    """Write the member as a Hugging Face directory (+ tokenizer files, + ``jaxens_train.json``).
    The directory is assembled beside ``out`` and moved into place, replacing an old one."""
    out = Path(out).expanduser()
    with atomic_directory(out, file_mode=0o644) as tmp:
        save_hf_dir(result.model, tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        meta = {"format": FORMAT_VERSION, "recipe": cfg.to_dict(), "seconds": round(result.seconds, 1),
                "final_loss": result.history[-1]["loss"] if result.history else None,
                "history": [h for h in result.history if "val_loss" in h]}
        meta.update(extra or {})
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
    return out


def read_meta(path: str | os.PathLike) -> dict | None:
    p = Path(path) / META_FILE
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError:
        return None


def train_to_dir(cfg: TrainConfig, out: str | os.PathLike, *, load_tokenizer: Callable, data_dir=None,
                 progress: bool = True, desc: str = "training", heldout: str | None = "alice29.txt") -> Path:
    """Tokenise the texts with SmolLM2's tokenizer (``load_tokenizer(TOKENIZER_SOURCE, progress=...)``,
    e.g. :func:`jaxens.harness.zoo.load_tokenizer`), train, measure, save to ``out``."""
    digest = jdata.data_hash(data_dir)  # fails early, with the fix, when the data is missing or bad
    tok = load_tokenizer(TOKENIZER_SOURCE, progress=progress)
    if len(tok) != cfg.vocab_size:
        raise ValueError(f"the {TOKENIZER_SOURCE} tokenizer has {len(tok)} tokens but the recipe has "
                         f"vocab_size={cfg.vocab_size}")
    train_ids = jdata.token_stream(tok, "train", data_dir, cfg.files)
    val_ids = jdata.token_stream(tok, "validation", data_dir, cfg.files)
    result = train_member(cfg, train_ids, val_ids, progress=progress, desc=desc)
    params = {k: jnp.asarray(v) for k, v in result.model.params_numpy().items()}
    extra = {"data_hash": digest, "tokenizer": TOKENIZER_SOURCE, "train_tokens": int(train_ids.size),
             "val_loss": mean_loss(cfg, params, eval_windows(val_ids, cfg.seq_len))}
    if heldout:
        names = cfg.files if cfg.files is not None else tuple(jdata.read_all(data_dir))
        if heldout in names:
            test_ids = jdata.tokens(tok, "test", data_dir, [heldout])[heldout]
            extra["test_perplexity"] = {heldout: window_perplexity(result.model, test_ids, cfg.seq_len,
                                                                         cfg.batch_size)}
    return save_member(result, cfg, out, tok, extra)


# --- zoo members ------------------------------------------------------------------------------
def is_current(path: str | os.PathLike, cfg: TrainConfig, data_dir=None) -> tuple[bool, str]:
    """Whether the checkpoint at ``path`` was trained by ``cfg`` on the present data (and why not)."""
    path = Path(path)
    meta = read_meta(path)
    if meta is None or not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        return False, "no complete checkpoint"
    if meta.get("recipe") != cfg.to_dict():
        return False, "it was trained with a different recipe"
    try:
        digest = jdata.data_hash(data_dir)
    except (FileNotFoundError, ValueError):
        return True, "data directory unavailable; trusting the cached checkpoint"
    if meta.get("data_hash") != digest:
        return False, "the training texts changed since it was trained"
    return True, "up to date"


def load_or_train(name: str, out: str | os.PathLike, load_tokenizer: Callable, *, progress: bool = True,
                  data_dir=None) -> Path:
    """The recipe ``name``'s checkpoint directory ``out``: kept when its recipe and data hash match,
    else trained now with :data:`RECIPES` ``[name]`` (:func:`train_to_dir`) and written there."""
    if name not in RECIPES:
        raise ValueError(f"no training recipe for {name!r}; recipes: {', '.join(sorted(RECIPES))}")
    cfg = RECIPES[name]
    out = Path(out)
    ok, why = is_current(out, cfg, data_dir)
    if ok:
        return out
    if (out / META_FILE).exists():
        print(f"[jaxens] cached {name} is stale ({why}); retraining.", file=sys.stderr)
    print(f"[jaxens] {name} is trained from scratch on first use ({cfg.steps} steps, d={cfg.d_model}, "
          f"{cfg.n_layers} layers; a few minutes on a CPU); it is trained once and cached in {out}.",
          file=sys.stderr)
    return train_to_dir(cfg, out, load_tokenizer=load_tokenizer, data_dir=data_dir, progress=progress,
                        desc=f"training {name}")
