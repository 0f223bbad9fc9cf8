"""Sampling methods: small frozen dataclasses that turn one step's logits into next tokens.

Every method maps `logits f32[B, V]` and one uniform number per row to `int32[B]` tokens
(`select(logits, u)`; `sample(rng, logits)` draws `u` from a key):

| method        | draws from                                                                 |
|---------------|----------------------------------------------------------------------------|
| `Greedy`      | `argmax_v logits[v]` (no randomness)                                       |
| `Categorical` | `softmax(logits / T)` (plain temperature sampling)                         |
| `TopK`        | the tempered distribution restricted to the `k` most likely tokens         |
| `TopP`        | ... restricted to the smallest set of most likely tokens with mass >= `p`  |
|               | (nucleus sampling; Holtzman et al., 2020)                                   |
| `MinP`        | ... restricted to tokens with `p(v) >= p * max_v' p(v')` (Nguyen et al., 2024) |
| `Filtered`    | top-k, then top-p, then min-p, each on what the previous one kept (transformers' order) |

Log-probabilities: the sampler reports `log softmax(logits / T)[token]` of the **untruncated**
tempered distribution (`method.temperature`, 1 for `Greedy`), computed by
`rlhf_jax.logprobs.token_logprobs`, because that is what the trainer recomputes from the same
logits (`rlhf_jax.rollout.completion_logprobs(..., temperature=T)`), so on-policy importance ratios
are exactly 1. With `TopK`/`TopP`/`MinP`/`Filtered` the token was actually drawn from the truncated,
renormalised distribution, whose log-prob is higher by `-log(kept mass)` for every kept token; the
reported value is the one the policy-gradient objective differentiates (as in TRL and verl).
The same holds for `min_new_tokens` (`SamplingConfig`, `Request`): while fewer than that many tokens
are out, the stop ids' logits are -inf before the method sees them (`suppress_stop_ids`), so a
token is drawn from the distribution renormalised without them, and the reported log-prob is still
the unmasked `log softmax(logits / T)[token]`: the trainer's recomputed (old) log-probs and
`sampler_logprob_diff` compare like with like, and `old_logprobs="sampler"` or TIS weights see a
ratio of exactly 1 on-policy (a masked-distribution log-prob would be higher by `-log(1 - p_stop)`
at those steps and tilt every such ratio by that much, with no config saying so).

Sampling is exact inverse-CDF sampling with one uniform number per row (two-level: a block of 128
tokens, then the token inside it), which costs one pass over the vocabulary, unlike Gumbel-max
sampling that draws `V` random numbers per row and step.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Union

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import _checks

__all__ = [
    "Greedy",
    "Categorical",
    "TopK",
    "TopP",
    "MinP",
    "Filtered",
    "SamplingMethod",
    "make_method",
    "sample_from_logits",
    "select_per_row",
    "suppress_stop_ids",
    "METHOD_KINDS",
]

_BLOCK = 128  # vocabulary block of the two-level inverse CDF
_NEG_INF = -jnp.inf
_F32_TINY, _F32_MAX = float(np.finfo(np.float32).tiny), float(np.finfo(np.float32).max)


def _check_temperature(owner: str, temperature) -> None:
    # The range of the float32 the logits are divided by: 1e-50 rounds to 0 and 1e40 to inf there (a
    # subnormal one may be flushed to 0), and every logit would become +-inf or NaN.
    if not _checks.is_number(temperature) or not _F32_TINY <= temperature <= _F32_MAX:
        # vLLM reads temperature 0 as greedy decoding; here that is a method of its own.
        hint = "; for greedy (argmax) decoding use Greedy() or make_method(greedy=True)" if temperature == 0 else ""
        raise ValueError(f"{owner}.temperature must be a finite number > 0 (a normal float32, in "
                         f"[{_F32_TINY:.3g}, {_F32_MAX:.3g}]), got {temperature!r}{hint}")


def _as_int(what: str, value, *, low: int, note: str = "") -> int:
    """`value` as a Python int (NumPy integers too, not bools), or ValueError naming `what`."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < low:
        raise ValueError(f"{what} must be an int >= {low}{note}, got {value!r}")
    return int(value)


def _check_logits_u(fn: str, logits, u) -> None:
    """Trace-time shape checks: `logits [N, V]` (one row per sequence) and `u [N]` (or None)."""
    if jnp.ndim(logits) != 2:
        raise ValueError(f"{fn}: logits must be [N, V] (one row of vocabulary logits per sequence), got shape "
                         f"{tuple(jnp.shape(logits))}; add a leading axis for a single row")
    if u is not None and tuple(jnp.shape(u)) != tuple(jnp.shape(logits))[:1]:
        raise ValueError(f"{fn}: u must be [N] = {list(jnp.shape(logits))[:1]} (one uniform number per row of "
                         f"logits {tuple(jnp.shape(logits))}), got shape {tuple(jnp.shape(u))}")


def _check_unit_interval(what: str, value) -> None:
    """ValueError naming `what` (e.g. "TopP.p") unless `value` is a number in (0, 1]."""
    if not _checks.is_number(value) or not 0 < value <= 1:
        raise ValueError(f"{what} must be in (0, 1], got {value!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Greedy:
    """Pick the most likely token: `argmax_v logits[v]` (ties: lowest id). Log-probs at T = 1.

    Example:
      >>> Greedy().select(jnp.log(jnp.array([[0.1, 0.6, 0.3], [0.4, 0.2, 0.4]])), None).tolist()
      [1, 0]
    """

    @property
    def temperature(self) -> float:
        return 1.0

    @property
    def filters(self) -> tuple[int, float, float]:
        """`(top_k, top_p, min_p)` in Hugging Face's knobs: all off."""
        return 0, 1.0, 0.0

    def select(self, logits: jax.Array, u: jax.Array) -> jax.Array:
        """int32 `[B]` argmax tokens of `logits [B, V]` (`u` is unused)."""
        _check_logits_u("Greedy.select", logits, None)
        del u
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def sample(self, rng: jax.Array, logits: jax.Array) -> jax.Array:
        """int32 `[B]` argmax tokens of `logits [B, V]` (`rng` is unused)."""
        del rng
        return self.select(logits, None)


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Tempered:
    """Base of the random methods: temper, truncate (subclass), then inverse-CDF sample."""

    temperature: float = 1.0

    def __post_init__(self):
        _check_temperature(type(self).__name__, self.temperature)

    @property
    def filters(self) -> tuple[int, float, float]:
        """`(top_k, top_p, min_p)` in Hugging Face's knobs (0 / 1.0 / 0.0 = off) this method applies."""
        return 0, 1.0, 0.0

    def truncate(self, z: jax.Array) -> jax.Array:
        """Tempered logits `z [B, V]` with tokens outside the support set to -inf (`_truncate`)."""
        top_k, top_p, min_p = self.filters
        return _truncate(z, top_k=top_k, top_p=top_p, min_p=min_p)

    def select(self, logits: jax.Array, u: jax.Array) -> jax.Array:
        """int32 `[B]` tokens of `softmax(truncate(logits / T))` at uniform numbers `u [B]` (inverse CDF)."""
        _check_logits_u(f"{type(self).__name__}.select", logits, u)
        z = _checks.f32(logits)
        if self.temperature != 1:
            z = z / jnp.float32(self.temperature)
        return sample_from_logits(self.truncate(z), u)

    def sample(self, rng: jax.Array, logits: jax.Array) -> jax.Array:
        """int32 `[B]` tokens drawn from `softmax(truncate(logits / T))` with a fresh key."""
        _check_logits_u(f"{type(self).__name__}.sample", logits, None)
        return self.select(logits, jax.random.uniform(rng, logits.shape[:1], jnp.float32))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Categorical(_Tempered):
    """Sample from `softmax(logits / temperature)` over the full vocabulary.

    Example (inverse CDF: the CDF of `[0.1, 0.6, 0.3]` is `[0.1, 0.7, 1.0]`):
      >>> logits = jnp.log(jnp.array([[0.1, 0.6, 0.3]] * 3))
      >>> Categorical().select(logits, jnp.array([0.05, 0.5, 0.95])).tolist()
      [0, 1, 2]
      >>> tokens = Categorical(temperature=0.7).sample(jax.random.key(0), jnp.zeros((1000, 3)))
      >>> tokens.shape, bool(jnp.all((tokens >= 0) & (tokens < 3)))
      ((1000,), True)
    """


@dataclasses.dataclass(frozen=True, kw_only=True)
class TopK(_Tempered):
    """Sample among the `k` highest logits (tokens tied with the k-th are kept too).

    `k >= V` keeps the whole vocabulary.

    Example:
      >>> jnp.isfinite(TopK(k=2).truncate(jnp.log(jnp.array([[0.1, 0.6, 0.3]])))).tolist()
      [[False, True, True]]
    """

    k: int

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "k", _as_int("TopK.k", self.k, low=1))  # a Python int: hashable, static

    @property
    def filters(self) -> tuple[int, float, float]:
        return self.k, 1.0, 0.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class TopP(_Tempered):
    """Nucleus sampling: keep the most likely tokens until their mass reaches `p` (Holtzman et al., 2020).

    A token is kept when the mass of the tokens strictly more likely than it is `< p`, so the most
    likely token is always kept; `p = 1` keeps the whole vocabulary. Without ties this is the set
    transformers' `TopPLogitsWarper` keeps (for `p` rounded to float32; like it, the test sums the
    tail mass from the least likely token, which stays accurate for a p near 1 at a 150k
    vocabulary); tokens tied with the last kept one are all kept here, where transformers (and
    vLLM) keep the part of the tie their sort happens to put first.

    Example (masses before each token, most likely first: 0, 0.6, 0.9):
      >>> logits = jnp.log(jnp.array([[0.1, 0.6, 0.3]]))
      >>> [jnp.isfinite(TopP(p=p).truncate(logits)).tolist() for p in (0.5, 0.65)]
      [[[False, True, False]], [[False, True, True]]]
    """

    p: float

    def __post_init__(self):
        super().__post_init__()
        _check_unit_interval("TopP.p", self.p)

    @property
    def filters(self) -> tuple[int, float, float]:
        return 0, self.p, 0.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class MinP(_Tempered):
    """Keep tokens whose probability is at least `p` times the top token's (Nguyen et al., 2024).

    `p(v) >= p * max p  <=>  z_v >= max z + log p` on tempered logits `z`; `p = 1` keeps only the
    most likely token(s).

    Example (the floor is `p x 0.6`):
      >>> logits = jnp.log(jnp.array([[0.1, 0.6, 0.3]]))
      >>> [jnp.isfinite(MinP(p=p).truncate(logits)).tolist() for p in (0.1, 0.4, 0.6)]
      [[[True, True, True]], [[False, True, True]], [[False, True, False]]]
    """

    p: float

    def __post_init__(self):
        super().__post_init__()
        _check_unit_interval("MinP.p", self.p)

    @property
    def filters(self) -> tuple[int, float, float]:
        return 0, 1.0, self.p


@dataclasses.dataclass(frozen=True, kw_only=True)
class Filtered(_Tempered):
    """Top-k, then top-p, then min-p: the filters combined as transformers' `generate` chains them.

    `generate(do_sample=True, temperature=T, top_k=k, top_p=p, min_p=m)` applies its warpers in this
    order (`GenerationMixin._get_logits_processor`): temperature, `TopKLogitsWarper`,
    `TopPLogitsWarper`, `MinPLogitsWarper`, each on the distribution the one before left. So the
    nucleus is taken over the renormalised top-k distribution, and min-p keeps `p(v) >= m * max p`
    of what is left (the same set as min-p of the full distribution, intersected: a ratio to the top
    token is unchanged by renormalising). Each filter keeps ties as `TopK` / `TopP` / `MinP` do, and
    one alone gives that method's tokens bit for bit. vLLM applies min-p *before* top-k / top-p;
    with both min-p and top-p active its nucleus can be smaller than this one.

    Fields use the Hugging Face knobs and their "off" values: `top_k=0`, `top_p=1.0`, `min_p=0.0`.
    `make_method` returns this class only when two or more filters are on.

    Example (top-2 of `[0.1, 0.6, 0.3]` is `[0, 2/3, 1/3]`; its nucleus at 0.6 is the top token alone,
    where top-p 0.6 of the full distribution keeps two tokens):
      >>> logits = jnp.log(jnp.array([[0.1, 0.6, 0.3]]))
      >>> jnp.isfinite(Filtered(top_k=2, top_p=0.6).truncate(logits)).tolist()
      [[False, True, False]]
    """

    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "top_k", _as_int("Filtered.top_k", self.top_k, low=0, note=" (0 = off)"))
        _check_unit_interval("Filtered.top_p", self.top_p)
        if not _checks.is_number(self.min_p) or not 0 <= self.min_p <= 1:
            raise ValueError(f"Filtered.min_p must be in [0, 1] (0 = off), got {self.min_p!r}")

    @property
    def filters(self) -> tuple[int, float, float]:
        return self.top_k, self.top_p, self.min_p


def _truncate(z: jax.Array, *, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0) -> jax.Array:
    """Tempered logits `z [B, V]` after top-k, then top-p, then min-p (0 / 1 / 0 = off), `-inf` outside.

    The order of transformers' `_get_logits_processor`; each filter sees the previous one's result:
    top-k keeps `z >= ` the k-th largest logit, the nucleus is `_nucleus_threshold` of the sorted
    logits left by top-k (so of the renormalised top-k distribution), min-p keeps
    `z >= max z + log min_p` (`max z` survives both filters). `select_per_row` applies the same cuts
    per row; the two agree bit for bit.
    """
    k = top_k if 0 < top_k < z.shape[-1] else 0
    if top_p < 1:
        sorted_z = -jnp.sort(-z, axis=-1)
        if k:
            kth = sorted_z[:, k - 1:k]
            z, sorted_z = (jnp.where(x >= kth, x, _NEG_INF) for x in (z, sorted_z))
        z = jnp.where(z >= _nucleus_threshold(sorted_z, jnp.float32(top_p)), z, _NEG_INF)
    elif k:
        z = jnp.where(z >= jax.lax.top_k(z, k)[0][:, -1:], z, _NEG_INF)
    if min_p > 0:
        z = jnp.where(z >= _min_p_threshold(z, jnp.float32(math.log(min_p))), z, _NEG_INF)
    return z


def _nucleus_threshold(sorted_z: jax.Array, p) -> jax.Array:
    """`[B, 1]` lowest kept logit of top-p: tokens (sorted descending) whose mass before them is `< p`.

    Tested as its complement, `tail(v) > 1 - p` with `tail(v)` the mass of `v` and every token after
    it, summed from the least likely token up (as transformers' `TopPLogitsWarper` and vLLM do): the
    tail's float32 sums keep their relative precision, where a running sum from the top stalls near
    1 (float32 spacing 6e-8 there, above the single-token masses a p of 0.999 cuts at a 150k
    vocabulary). `1 - p` is exact in float32 for `p >= 0.5` (Sterbenz). The first (most likely) token
    is always kept.
    """
    probs = jax.nn.softmax(sorted_z, axis=-1)
    tail = jnp.flip(jnp.cumsum(jnp.flip(probs, axis=-1), axis=-1), axis=-1)
    kept = (tail > 1 - p) | (jnp.arange(sorted_z.shape[-1]) == 0)
    return jnp.min(jnp.where(kept, sorted_z, jnp.inf), axis=-1, keepdims=True)


def _min_p_threshold(z: jax.Array, log_p) -> jax.Array:
    """`[B, 1]` lowest kept logit of min-p: `max z + log p`."""
    return jnp.max(z, axis=-1, keepdims=True) + log_p


SamplingMethod = Union[Greedy, Categorical, TopK, TopP, MinP, Filtered]

# Per-row method codes (`select_per_row`, continuous batching's slot state).
GREEDY, CATEGORICAL, TOP_K, TOP_P, MIN_P, FILTERED = range(6)
METHOD_KINDS = {Greedy: GREEDY, Categorical: CATEGORICAL, TopK: TOP_K, TopP: TOP_P, MinP: MIN_P, Filtered: FILTERED}


def row_fields(method: SamplingMethod) -> dict[str, np.ndarray]:
    """A method as `select_per_row`'s per-row inputs: kind, temperature, top_k, top_p, log_min_p
    (numpy scalars; a filter the method does not apply reads 0 / 1 / -inf = off)."""
    top_k, top_p, min_p = method.filters
    return dict(kind=np.int32(METHOD_KINDS[type(method)]), temperature=np.float32(method.temperature),
                top_k=np.int32(top_k), top_p=np.float32(top_p),
                log_min_p=np.float32(math.log(min_p) if min_p > 0 else -np.inf))


def make_method(
    *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0, greedy: bool = False,
    keys: str = "make_method: ",
) -> SamplingMethod:
    """The method for the usual Hugging Face-style knobs (0 / 1.0 / 0.0 switch a filter off).

    The filters apply to the tempered logits `logits / temperature` in transformers' order: top-k,
    then top-p, then min-p, each on what the previous one kept (`Filtered`). transformers'
    `GenerationConfig` defaults to `top_k=50`, so `generate(do_sample=True, top_p=0.9)` is
    `make_method(top_k=50, top_p=0.9)` here; vLLM's default `top_k` is off (-1 there, 0 here).

    Args:
      temperature: > 0.
      top_k: keep the `top_k` most likely tokens; 0 = off.
      top_p: nucleus mass in (0, 1]; 1.0 = off.
      min_p: relative probability floor in [0, 1]; 0.0 = off.
      greedy: argmax decoding (all other knobs must be off).
      keys: what an error message puts before a knob's name: a config section that maps its own
        fields to these knobs passes its prefix (`"rollout."`), so the message names the key the
        user wrote (`rollout.top_p must be in (0, 1], got 1.5`).

    Returns:
      `Greedy`, `Categorical`, `TopK`, `TopP` or `MinP` for at most one filter (their programs),
      `Filtered` for two or three.

    Example:
      >>> make_method(temperature=0.7, top_p=0.9)
      TopP(temperature=0.7, p=0.9)
      >>> make_method(temperature=0.7, top_k=50, top_p=0.95)
      Filtered(temperature=0.7, top_k=50, top_p=0.95, min_p=0.0)
    """
    top_k = _as_int(f"{keys}top_k", top_k, low=0, note=" (0 = off)")
    if not isinstance(greedy, (bool, np.bool_)):
        raise ValueError(f"{keys}greedy must be a bool, got {greedy!r}")
    if not _checks.is_number(min_p) or not 0 <= min_p <= 1:
        raise ValueError(f"{keys}min_p must be in [0, 1] (0 = off), got {min_p!r}")
    _check_unit_interval(f"{keys}top_p", top_p)
    active = [name for name, on in (("top_k", top_k > 0), ("top_p", top_p < 1), ("min_p", min_p > 0)) if on]
    if greedy:
        if active or temperature != 1.0:
            raise ValueError(f"{keys}greedy=True takes no temperature or filters, got {active or 'temperature'}")
        return Greedy()
    if len(active) > 1:
        return Filtered(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    if top_k > 0:
        return TopK(k=top_k, temperature=temperature)
    if top_p < 1:
        return TopP(p=top_p, temperature=temperature)
    if min_p > 0:
        return MinP(p=min_p, temperature=temperature)
    return Categorical(temperature=temperature)


def sample_from_logits(z: jax.Array, u: jax.Array) -> jax.Array:
    """Exact inverse-CDF sample of `softmax(z)` per row, from one uniform number per row.

    With `p = exp(z - max z)` and `F` its running sum over the vocabulary, returns the first token
    `v` with `F(v) > u * F(V)`. Two levels keep it one pass: blocks of 128 tokens pick the block,
    then the running sum inside that block picks the token. A token with `z = -inf` (zero mass) is
    never returned, including when float rounding puts `u * F(V)` at the very end.

    Args:
      z: float32 `[B, V]` logits; `-inf` marks excluded tokens (at least one finite per row).
      u: float32 `[B]` uniform numbers in `[0, 1)`.

    Returns:
      int32 `[B]` token ids.

    Example (a zero-mass token is skipped even at `u` on its CDF step):
      >>> z = jnp.log(jnp.array([[0.25, 0.0, 0.75]] * 3))
      >>> sample_from_logits(z, jnp.array([0.1, 0.25, 0.9])).tolist()
      [0, 2, 2]
    """
    _check_logits_u("sample_from_logits", z, u)
    b, v = z.shape
    nblocks = -(-v // _BLOCK)
    pad = nblocks * _BLOCK - v
    if pad:
        z = jnp.pad(z, ((0, 0), (0, pad)), constant_values=_NEG_INF)
    p = jnp.exp(z - jnp.max(z, axis=-1, keepdims=True)).reshape(b, nblocks, _BLOCK)
    block_mass = jnp.sum(p, axis=-1)                                   # [B, nblocks]
    block_cdf = jnp.cumsum(block_mass, axis=-1)
    total = block_cdf[:, -1:]
    # Strictly below the total, so some block's running sum exceeds it.
    target = jnp.minimum(u[:, None] * total, jnp.nextafter(total, jnp.float32(0)))
    block = _first_exceeding(block_cdf, target, block_mass)
    before = jnp.take_along_axis(block_cdf - block_mass, block[:, None], axis=-1)
    inner_p = jnp.take_along_axis(p, block[:, None, None], axis=1)[:, 0]  # [B, _BLOCK]
    inner_cdf = before + jnp.cumsum(inner_p, axis=-1)
    inner = _first_exceeding(inner_cdf, target, inner_p)
    return (block * _BLOCK + inner).astype(jnp.int32)


def _first_exceeding(cdf: jax.Array, target: jax.Array, mass: jax.Array) -> jax.Array:
    """Per row, the first index with `cdf > target` and positive mass (else the last positive one).

    Requiring positive mass keeps a zero-mass entry from being chosen when rounding makes the running
    sum step at it.
    """
    ok = (cdf > target) & (mass > 0)
    positions = jnp.arange(cdf.shape[-1], dtype=jnp.int32)
    last_positive = jnp.max(jnp.where(mass > 0, positions, 0), axis=-1)
    return jnp.where(jnp.any(ok, axis=-1), jnp.argmax(ok, axis=-1), last_positive).astype(jnp.int32)


def select_per_row(logits, u, kind, temperature, top_k, top_p, log_min_p, *, kinds: tuple[int, ...]):
    """Next tokens with a sampling method per row (continuous batching's slots); bit-equal to each
    method's own `select`, from the same thresholds (`row_fields` gives a method's row inputs).

    `kind[b]` (`METHOD_KINDS` of the row's method) picks row b's method; `kinds` (static) lists the kinds present, so
    the sort of top-k / top-p is compiled only when a row uses one. The cuts are `_truncate`'s, in its
    order: top-k (`TopK`, `Filtered` rows), top-p on the sorted logits top-k left (`TopP`, `Filtered`),
    min-p (`MinP`, `Filtered`); a `Filtered` row's filter that is off (0 / 1 / -inf) cuts nothing.
    """
    z = logits.astype(jnp.float32) / temperature[:, None]
    trunc = z
    vocab = z.shape[-1]
    filtered = kind == FILTERED           # rows that chain the filters (`Filtered`)
    if {TOP_K, TOP_P, FILTERED} & set(kinds):
        sorted_z = -jnp.sort(-z, axis=-1)
    if {TOP_K, FILTERED} & set(kinds):
        kth = jnp.take_along_axis(sorted_z, jnp.clip(top_k - 1, 0, vocab - 1)[:, None], axis=-1)
        off = (~((kind == TOP_K) | filtered) | (top_k < 1) | (top_k >= vocab))[:, None]
        trunc = jnp.where(off | (z >= kth), trunc, _NEG_INF)
        if {TOP_P, FILTERED} & set(kinds):
            sorted_z = jnp.where(off | (sorted_z >= kth), sorted_z, _NEG_INF)
    if {TOP_P, FILTERED} & set(kinds):
        threshold = _nucleus_threshold(sorted_z, top_p[:, None])
        off = (~((kind == TOP_P) | filtered) | (top_p == 1))[:, None]
        trunc = jnp.where(off | (z >= threshold), trunc, _NEG_INF)
    if {MIN_P, FILTERED} & set(kinds):
        threshold = _min_p_threshold(z, log_min_p[:, None])
        trunc = jnp.where(~((kind == MIN_P) | filtered)[:, None] | (z >= threshold), trunc, _NEG_INF)
    token = sample_from_logits(trunc, u) if kinds != (GREEDY,) else jnp.zeros(z.shape[:1], jnp.int32)
    if GREEDY in kinds:
        token = jnp.where(kind == GREEDY, jnp.argmax(logits, axis=-1).astype(jnp.int32), token)
    return token


def suppress_stop_ids(logits: jax.Array, stop_ids: jax.Array, suppress: jax.Array) -> jax.Array:
    """`logits [N, V]` with the stop ids' entries set to `-inf` in the rows where `suppress` is True.

    What `min_new_tokens` does before the sampling method runs: `suppress = t < min_new_tokens`
    with `t` the index of the token about to be drawn (0 for the first new token), so no sample
    ends before `min_new_tokens` tokens that are not stop ids (Hugging Face's
    `MinNewTokensLengthLogitsProcessor`, vLLM's `SamplingParams.min_tokens`). Top-k / top-p / min-p
    then act on the distribution renormalised without the stop ids, as both apply it before their
    warpers. Log-probs reported for the drawn tokens stay the unmasked ones (module docstring).

    Args:
      logits: float `[N, V]` one step's logits.
      stop_ids: int `[K]` (every row) or `[N, K]` (per row) token ids; entries `< 0` are unused.
      suppress: bool `[]` or `[N]`: mask this row's stop ids now.

    Returns:
      `logits` with `logits[r, stop_ids[r, k]] = -inf` where `suppress[r]` and `stop_ids[r, k] >= 0`.

    Example:
      >>> z = jnp.zeros((2, 4))
      >>> suppress_stop_ids(z, jnp.array([3, 1]), jnp.array([True, False])).tolist()
      [[0.0, -inf, 0.0, -inf], [0.0, 0.0, 0.0, 0.0]]
    """
    n, v = logits.shape
    ids = jnp.asarray(stop_ids, jnp.int32)
    ids = jnp.broadcast_to(ids if ids.ndim == 2 else ids[None], (n, ids.shape[-1]))
    on = jnp.broadcast_to(jnp.asarray(suppress, bool), (n,))[:, None] & (ids >= 0)
    ids = jnp.where(on, ids, v)                    # out of range: dropped by the scatter
    return logits.at[jnp.arange(n)[:, None], ids].set(_NEG_INF, mode="drop")
