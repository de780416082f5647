"""Red team: each curious party plays its attack with exactly what it received.

DESIGN.md, "Attacks are part of the design". A silo's attacks read only the messages that silo
received in a run (captured with FEDSCORE_CAPTURE_DIR, clients/protocol/capture.py) and the run's
public config.json. The experiment layer (`Truth`) then reads what no party may: the authority's
labels, its private split, the released scores; it is used ONLY to score the attacks.

Attacks (tests/test_attacks.py holds each to its bound):

1. Label inference from the gradients a silo receives (Li et al., "Label Leakage and Protection
   in Two-party Split Learning", ICLR 2022): the sign of d loss / d contribution, its norm
   (the rarer class has the larger |p - y| early on), and, for vector gradients (concat mode),
   the direction: cosine to the batch's largest gradient. Under label DP (randomised response,
   epsilon e) every attack's balanced accuracy and AUC are at most e^e / (1 + e^e).
2. Split / evaluation pattern: which positions appear in plans and in eval messages. Two
   attacks: pattern statistics (how often a position is sampled, whether it is evaluated), and
   a Bayesian replay of the OLD stratified split from the public seed (`stratified_replay`).
3. Seed replay: what the old code drew from the public seed (batch plans, label flips, the
   order of positions) replayed and compared with what the silo actually received.
4. Membership on the released scores: a loss threshold per label (simulations/analysis/audit.py's
   audit turns it into an epsilon lower bound).
5. Secrets: no party's randomness secret or the pepper in anything another party reads.

The `old_*` functions reproduce the mechanisms of the code before commit e13c364 (draws from
`np.random.default_rng([seed, salt])`, a split stratified on labels), so a test can show each
attack succeeding when the protection is off.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.special import gammaln, logsumexp
from scipy.stats import rankdata

from clients.protocol.capture import MESSAGES_DIR
from clients.protocol.schema import AUTHORITY
from crypto.at_rest import Keystore
from crypto.identity import keyed_refs
from crypto.secret_random import SECRET_FILE
from server.labels import load_labels
from server.scores_file import PEPPER_FILE, read_scores
from server.training import batch_plan
from simulations.analysis.audit import membership_audit, per_example_loss
from simulations.data.paths import run_keystore, run_parties

STEP = "train.step"
ALIGN = "query.align"
HELLO = "query.hello"

# The salts of the old code's public-seed streams (pre-e13c364).
SPLIT_SALT = 0x5917
PLAN_SALT = 0xBA7C
FLIP_SALT = 0x1AB
POSITIONS_SALT = 0xA11


# ---- what one silo received ------------------------------------------------------------------


@dataclass(frozen=True)
class Captured:
    """One captured message (clients/protocol/capture.py's structured form)."""

    side: str
    silo: str | None
    message_type: str
    config: dict
    time_ns: int
    src_node: int
    dst_node: int
    path: Path  # the .npz of its arrays

    def arrays(self) -> dict[str, np.ndarray]:
        with np.load(self.path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}


def read_messages(capture_dir: Path) -> list[Captured]:
    """Every complete captured message, in the order recorded."""
    out = []
    for meta in sorted((Path(capture_dir) / MESSAGES_DIR).glob("*.json")):
        info = json.loads(meta.read_text())
        out.append(Captured(
            side=info["side"], silo=info.get("silo"), message_type=info["message_type"],
            config=info.get("config", {}), time_ns=int(info["time_ns"]),
            src_node=int(info["src_node"]), dst_node=int(info["dst_node"]),
            path=meta.with_suffix(".npz"),
        ))
    return sorted(out, key=lambda c: c.time_ns)


def _cuts(sizes: np.ndarray | None) -> np.ndarray:
    """Where a concatenated plan splits into its batches; without sizes, nowhere: the plan
    counts whole (as np.cumsum(None)[:-1], an empty array, had it)."""
    return np.cumsum(sizes)[:-1] if sizes is not None else np.array([], dtype=np.int64)


@dataclass(frozen=True)
class Step:
    """One `train.step` as a silo received it."""

    round: int
    plan: np.ndarray | None = None
    eval: np.ndarray | None = None
    done_plan: np.ndarray | None = None
    done_sizes: np.ndarray | None = None
    grad: np.ndarray | None = None


@dataclass
class SiloView:
    """Everything one silo received that the attacks use: the number of positions (from
    `query.align`) and its `train.step` messages in round order."""

    silo: str
    n_positions: int
    steps: list[Step] = field(default_factory=list)

    def plans(self) -> list[np.ndarray]:
        return [s.plan for s in self.steps if s.plan is not None]

    def evals(self) -> list[np.ndarray]:
        return [s.eval for s in self.steps if s.eval is not None]

    def batches(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """(positions, gradient rows) of every mini-batch whose gradient the silo received."""
        out = []
        for s in self.steps:
            if s.grad is None:
                continue
            if s.done_plan is None:  # the authority sends a gradient with the plan it answers
                raise ValueError(f"round {s.round}: a gradient without the plan it belongs to")
            cuts = _cuts(s.done_sizes)
            out += list(zip(np.split(s.done_plan, cuts), np.split(s.grad, cuts), strict=True))
        return out


def silo_views(capture_dir: Path) -> dict[str, SiloView]:
    """One view per silo, from the messages its ClientApp recorded as received (`silo-in`).
    A silo is named by its own hello reply where captured (node id -> name)."""
    messages = read_messages(capture_dir)
    names = {c.src_node: str(c.config["silo"]) for c in messages
             if c.side == "silo-out" and c.message_type == HELLO and "silo" in c.config}
    received: dict[str, list[Captured]] = {}
    for c in messages:
        if c.side == "silo-in":
            silo = names.get(c.dst_node, c.silo)
            received.setdefault(str(silo), []).append(c)
    views = {}
    for silo, msgs in received.items():
        aligns = [c for c in msgs if c.message_type == ALIGN]
        if not aligns:
            continue
        view = SiloView(silo, int(aligns[-1].config["positions"]))
        seen: set[int] = set()
        for c in msgs:
            if c.message_type != STEP:
                continue
            rnd = int(c.config.get("round", 0))
            if rnd in seen:  # a re-sent step carries the same content
                continue
            seen.add(rnd)
            arrays = c.arrays()
            view.steps.append(Step(rnd, **{k: arrays.get(k) for k in (
                "plan", "eval", "done_plan", "done_sizes", "grad")}))
        view.steps.sort(key=lambda s: s.round)
        views[silo] = view
    return views


def public_config(run_dir: Path) -> dict:
    """config.json: public; the only file of the run an attacker reads."""
    return json.loads((Path(run_dir) / "config.json").read_text())


# ---- scoring (experiment layer) --------------------------------------------------------------


def auc(y: np.ndarray, score: np.ndarray) -> float:
    """P(score of a 1 > score of a 0), ties counted half."""
    y = np.asarray(y).astype(bool)
    r = rankdata(np.asarray(score, dtype=np.float64))
    n1, n0 = int(y.sum()), int((~y).sum())
    return float((r[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def auc_standard_error(value: float, n1: int, n0: int) -> float:
    """Hanley and McNeil's (1982) standard error of an AUC from n1 positives, n0 negatives."""
    q1, q2 = value / (2 - value), 2 * value**2 / (1 + value)
    var = (value * (1 - value) + (n1 - 1) * (q1 - value**2) + (n0 - 1) * (q2 - value**2)) \
        / (n1 * n0)
    return math.sqrt(max(var, 0.0))


def balanced_accuracy(y: np.ndarray, guess: np.ndarray) -> float:
    """(TPR + TNR) / 2: a label-DP guarantee bounds this (not plain accuracy, which guessing
    the majority class already makes high)."""
    y, guess = np.asarray(y).astype(bool), np.asarray(guess).astype(bool)
    return float((guess[y].mean() + (~guess[~y]).mean()) / 2)


def label_dp_bound(epsilon: float) -> float:
    """e^eps / (1 + e^eps): the largest balanced accuracy, and the largest AUC, any attack on
    epsilon-label-DP labels can reach in expectation (1 without label DP)."""
    return 1.0 if math.isinf(epsilon) else 1.0 / (1.0 + math.exp(-epsilon))


@dataclass
class Truth:
    """What only the experiment layer knows, per position: the clean label, the authority's
    private split (0 train, 1 val, 2 test), the released probability (NaN when not scored),
    and the authority's table row; and the run's accounted epsilon and delta."""

    y: np.ndarray
    split: np.ndarray
    probability: np.ndarray
    authority_row: np.ndarray
    epsilon: float | None
    delta: float

    @classmethod
    def load(cls, run_dir: Path) -> Truth:
        run_dir = Path(run_dir)
        parties, keys = run_parties(run_dir), run_keystore(run_dir)
        scores = read_scores(run_dir, keys, with_split=True)
        ids, labels = load_labels(parties / AUTHORITY, Keystore(keys) if keys else None)
        metrics = json.loads((run_dir / "metrics.json").read_text())
        authority = json.loads((run_dir / "authority.json").read_text())
        ref_hash = authority["subject_ref"].removeprefix("hmac-")
        pepper = (parties / AUTHORITY / PEPPER_FILE).read_bytes()
        rows = pd.Index(keyed_refs(ids.to_numpy(), pepper, ref_hash)).get_indexer(
            scores["subject_ref"])
        if (rows < 0).any():
            raise ValueError("the scores name people the authority's table does not hold")
        split = pd.Categorical(scores["split"], categories=("train", "val", "test")).codes
        return cls(y=labels[rows].astype(np.int8), split=np.asarray(split, dtype=np.int8),
                   probability=scores["probability"].to_numpy(dtype=np.float64),
                   authority_row=rows.astype(np.int64),
                   # metrics' eps_model of the combined model (server.privacy.model_epsilon,
                   # not imported: it pulls in the training stack)
                   epsilon=(metrics.get("epsilon") or {}).get("model"),
                   delta=float(metrics["delta"]))


# ---- 1. labels from gradients ----------------------------------------------------------------


@dataclass
class LabelGuess:
    """Per position the attack saw: a score (higher = more likely a defaulter) and a guess."""

    positions: np.ndarray
    score: np.ndarray
    guess: np.ndarray


def _per_position(positions: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean of `values` per distinct position."""
    pos, inverse = np.unique(positions, return_inverse=True)
    total = np.bincount(inverse, weights=values, minlength=len(pos))
    count = np.bincount(inverse, minlength=len(pos))
    return pos, total / count


def _rows(view: SiloView) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    batches = view.batches()
    if not batches:
        raise ValueError(f"silo {view.silo} received no gradients")
    positions = np.concatenate([p for p, _ in batches])
    grads = np.concatenate([g.reshape(len(g), -1) for _, g in batches]).astype(np.float64)
    batch = np.concatenate([np.full(len(p), i) for i, (p, _) in enumerate(batches)])
    return positions, grads, batch


def sign_attack(view: SiloView) -> LabelGuess:
    """d loss / d z = p - y (forward-corrected under label DP): a negative gradient means the
    label the authority trained on was 1. Majority of signs over a position's appearances
    (scalar gradients; for vectors, the sum of the columns' signs)."""
    positions, grads, _ = _rows(view)
    pos, score = _per_position(positions, -np.sign(grads).sum(axis=1))
    return LabelGuess(pos, score, score > 0)


def norm_attack(view: SiloView) -> LabelGuess:
    """The norm of the first gradient each position received: early in training p is near
    the base rate for everyone, so a member of the rarer class has the larger |p - y| (Li et
    al.'s norm attack; later, as the model fits, every norm shrinks and the gap with it).
    Scored as an AUC; the guess is the larger side of the largest gap in log-norms."""
    positions, grads, _ = _rows(view)
    pos, first = np.unique(positions, return_index=True)  # batches are in the order received
    score = np.linalg.norm(grads[first], axis=1)
    logs = np.sort(np.log(score + 1e-30))
    cut = logs[np.argmax(np.diff(logs))] if len(logs) > 1 else logs[0]
    return LabelGuess(pos, score, np.log(score + 1e-30) > cut)


def cosine_attack(view: SiloView) -> LabelGuess:
    """Direction (Li et al.'s cosine attack without any known label): in each mini-batch the
    largest gradient is taken to be a defaulter's (the norm attack's insight), and every row is
    scored by its cosine to it; same direction = same label. Mean cosine per position."""
    positions, grads, batch = _rows(view)
    norms = np.linalg.norm(grads, axis=1)
    cos = np.zeros(len(grads))
    for b in np.unique(batch):
        rows = np.flatnonzero(batch == b)
        ref = grads[rows[np.argmax(norms[rows])]]
        denom = norms[rows] * np.linalg.norm(ref)
        cos[rows] = np.where(denom > 0, grads[rows] @ ref / np.where(denom > 0, denom, 1), 0)
    pos, score = _per_position(positions, cos)
    return LabelGuess(pos, score, score > 0)


# ---- 2. labels from the split and evaluation pattern -----------------------------------------


def pattern_attack(view: SiloView) -> np.ndarray:
    """Per position: how often it was sampled into a plan, plus 0.5 if an eval message that did
    not cover everyone named it. Any split, sampling or evaluation that depends on labels shows
    up here (higher or lower for defaulters: scored as |AUC - 0.5|)."""
    n = view.n_positions
    score = np.zeros(n)
    for plan in view.plans():
        score += np.bincount(plan, minlength=n)
    for ev in view.evals():
        if len(np.unique(ev)) < n:
            score[ev] += 0.5
    return score


@dataclass
class ReplayResult:
    """The stratified-split replay: P(y = 1) per position, P(old mechanism | what was seen),
    and the candidate defaulter counts that survived."""

    probability: np.ndarray
    p_old: float
    survivors: list[int]


def _observations(view: SiloView, poisson: bool, steps: int, q: float
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Per position an observation (0 sampled in a plan, 1 in a partial eval only, 2 neither)
    and the emission matrix E[o, c] for split code c (0 train, 1 val, 2 test). Under Poisson
    sampling a training person is never sampled with probability (1 - q)^steps."""
    n = view.n_positions
    planned = np.zeros(n, dtype=bool)
    for plan in view.plans():
        planned[plan] = True
    partial = [ev for ev in view.evals() if len(np.unique(ev)) < n]
    evaluated = np.zeros(n, dtype=bool)
    for ev in partial:
        evaluated[ev] = True
    obs = np.where(planned, 0, np.where(evaluated, 1, 2)).astype(np.int8)
    miss = (1 - q) ** steps if poisson else 0.0
    emit = np.zeros((3, 3))
    emit[0, 0], emit[2, 0] = 1 - miss, miss
    if partial:
        emit[1, 1], emit[2, 2] = 1.0, 1.0
    else:
        emit[2, 1], emit[2, 2] = 1.0, 1.0
    return obs, emit


def old_split_sizes(n: int, train: float, val: float) -> tuple[int, int, int]:
    n_train, n_val = round(train * n), round(val * n)
    return n_train, n_val, n - n_train - n_val


def _rank_codes(n0: int, n1: int, seed: int, train: float, val: float
                ) -> tuple[np.ndarray, np.ndarray]:
    """The old split's code (0/1/2) of the r-th smallest position of each class, for a guessed
    class size: `permutation` of a class's sorted positions depends only on their count."""
    rng = np.random.default_rng([seed, SPLIT_SALT])
    out = []
    for m in (n0, n1):
        perm = rng.permutation(m)
        nt, nv, _ = old_split_sizes(m, train, val)
        codes = np.empty(m, dtype=np.int8)
        codes[perm[:nt]], codes[perm[nt:nt + nv]], codes[perm[nt + nv:]] = 0, 1, 2
        out.append(codes)
    return out[0], out[1]


def _interleave(obs: np.ndarray, emit: np.ndarray, a: np.ndarray, b: np.ndarray,
                null: np.ndarray, stop: float, check: int = 64
                ) -> tuple[float, np.ndarray | None]:
    """Forward-backward over the ways of interleaving the two classes' rank codes `a` (class 0)
    and `b` (class 1) along the positions, each path weighted by the emissions of what was
    observed. Returns log P(observations | this class size, old mechanism) (uniform over
    labelings with len(b) ones) and P(position is class 1); stops early (None) once the log
    Bayes factor against `null` (per-position log-likelihoods under an independent split)
    falls below -`stop`."""
    n, n0, n1 = len(obs), len(a), len(b)
    ea = [emit[o][a] for o in range(3)]  # emission of class-0 rank i for observation o
    eb = [emit[o][b] for o in range(3)]
    log_c = gammaln(n + 1) - gammaln(n1 + 1) - gammaln(n0 + 1)
    null_cum = np.concatenate([[0.0], np.cumsum(null)])
    lo, alpha, logz = 0, np.ones(1), 0.0
    saved: list[tuple[int, np.ndarray]] = []
    for p in range(n):
        saved.append((lo, alpha))
        hi = lo + len(alpha) - 1
        o = obs[p]
        new = np.zeros(len(alpha) + 1)
        j0, j1 = max(lo, p - n0 + 1), min(hi, p)  # class-0 move: rank i = p - j < n0
        if j0 <= j1:
            new[j0 - lo:j1 - lo + 1] += alpha[j0 - lo:j1 - lo + 1] * ea[o][p - j1:p - j0 + 1][::-1]
        k1 = min(hi, n1 - 1)  # class-1 move: rank j < n1
        if lo <= k1:
            new[1:k1 - lo + 2] += alpha[:k1 - lo + 1] * eb[o][lo:k1 + 1]
        nz = np.flatnonzero(new)
        if len(nz) == 0:
            return -math.inf, None
        lo, alpha = lo + nz[0], new[nz[0]:nz[-1] + 1]
        total = alpha.sum()
        alpha, logz = alpha / total, logz + math.log(total)
        if (p + 1) % check == 0:
            # log P(first p+1 observations | n1): a path with j ones so far leaves
            # C(n - p - 1, n1 - j) completions of the labeling out of C(n, n1).
            j = np.arange(lo, lo + len(alpha))
            rest = n - p - 1
            ok = (n1 - j >= 0) & (n1 - j <= rest)
            if not ok.any():
                return -math.inf, None
            ways = (gammaln(rest + 1) - gammaln(n1 - j[ok] + 1) - gammaln(rest - n1 + j[ok] + 1))
            with np.errstate(divide="ignore"):
                partial = logz + logsumexp(np.log(alpha[ok]) + ways) - log_c
            if partial - null_cum[p + 1] < -stop:
                return -math.inf, None
    if not lo <= n1 < lo + len(alpha) or alpha[n1 - lo] == 0:
        return -math.inf, None
    loglik = logz + math.log(alpha[n1 - lo]) - log_c
    # Backward: beta(j) = weighted completions from (p, j) to (n, n1).
    post = np.zeros(n)
    blo, beta = n1, np.ones(1)

    def at(lo_: int, arr: np.ndarray, start: int, length: int) -> np.ndarray:
        out = np.zeros(length)
        s, e = max(start, lo_), min(start + length, lo_ + len(arr))
        if s < e:
            out[s - start:e - start] = arr[s - lo_:e - lo_]
        return out

    for p in range(n - 1, -1, -1):
        lo_p, al = saved[p]
        width = len(al)
        j = np.arange(lo_p, lo_p + width)
        o = obs[p]
        i = p - j
        w0 = np.where((i >= 0) & (i < n0), ea[o][np.clip(i, 0, n0 - 1)], 0.0)
        w1 = np.where(j < n1, eb[o][np.clip(j, 0, n1 - 1)], 0.0)
        stay, up = at(blo, beta, lo_p, width), at(blo, beta, lo_p + 1, width)
        m0, m1 = al * w0 * stay, al * w1 * up
        denom = m0.sum() + m1.sum()
        post[p] = m1.sum() / denom if denom > 0 else 0.0
        new_beta = w0 * stay + w1 * up
        top = new_beta.max()
        if top == 0:
            return loglik, None
        blo, beta = lo_p, new_beta / top
    return loglik, post


def stratified_replay(view: SiloView, config: dict, stop: float = 30.0,
                      max_candidates: int = 400) -> ReplayResult:
    """Replay the OLD stratified split (`np.random.default_rng([seed, 0x5917])` permuting each
    class's positions, cut train / val / test) from the public seed and ask which labelings
    explain the positions seen in plans and eval messages.

    For every guessed number of defaulters n1 (from the public default rate, most likely
    first), a forward-backward pass over the interleavings of the two classes' replayed codes
    gives P(what was seen | n1) and, per position, P(defaulter). Against the null of an
    independent split (today's mechanism) this is a Bayes factor; a guess whose running factor
    falls below e^-stop is dropped. Output: P(y=1) = P(old) * posterior + P(new) * rate."""
    n = view.n_positions
    seed = int(config["seed"])
    train, val = float(config["split.train"]), float(config["split.val"])
    rate = float(config.get("population.default_rate", 0.06))
    poisson = math.isfinite(float(config["privacy.epsilon"]))
    n_train_guess = max(1, round(train * n))
    q = min(1.0, int(config["train.batch_size"]) / n_train_guess)
    steps = int(config["train.epochs"]) * max(1, round(1 / q))
    obs, emit = _observations(view, poisson, steps, q)
    prior_codes = np.array([train, val, 1 - train - val])
    null = np.log(emit[obs] @ prior_codes)
    mean, sd = n * rate, math.sqrt(n * rate * (1 - rate))
    span = int(4 * sd) + 1
    candidates = sorted(range(max(1, int(mean) - span), min(n - 1, int(mean) + span) + 1),
                        key=lambda k: abs(k - mean))[:max_candidates]
    must = np.bincount(obs, minlength=3)
    weights, posts, survivors = [], [], []
    for n1 in candidates:
        n0 = n - n1
        sizes = np.add(old_split_sizes(n0, train, val), old_split_sizes(n1, train, val))
        # Counts first: a sampled position is a training one, so there must be enough of them.
        if sizes[0] < must[0] or (not poisson and sizes[0] != must[0]):
            continue
        a, b = _rank_codes(n0, n1, seed, train, val)
        loglik, post = _interleave(obs, emit, a, b, null, stop)
        if post is None:
            continue
        log_prior = (gammaln(n + 1) - gammaln(n1 + 1) - gammaln(n0 + 1)
                     + n1 * math.log(rate) + n0 * math.log(1 - rate))
        weights.append(loglik + log_prior)
        posts.append(post)
        survivors.append(n1)
    null_total = float(null.sum())
    if not weights:
        return ReplayResult(np.full(n, rate), 0.0, [])
    w = np.array(weights)
    log_old = logsumexp(w)  # P(obs | old), equal prior odds on old and new
    p_old = float(1 / (1 + math.exp(min(700.0, null_total - log_old))))
    mix = np.exp(w - log_old) @ np.array(posts)
    return ReplayResult(p_old * mix + (1 - p_old) * rate, p_old, survivors)


# ---- 3. seed replay -------------------------------------------------------------------------


def old_stratified_split(y: np.ndarray, train: float, val: float, seed: int) -> np.ndarray:
    """The pre-e13c364 split (server/split.py `stratified_split`): codes 0/1/2 per position."""
    rng = np.random.default_rng([seed, SPLIT_SALT])
    codes = np.empty(len(y), dtype=np.int8)
    for cls in (0, 1):
        idx = rng.permutation(np.flatnonzero(y == cls))
        nt, nv, _ = old_split_sizes(len(idx), train, val)
        codes[idx[:nt]], codes[idx[nt:nt + nv]], codes[idx[nt + nv:]] = 0, 1, 2
    return codes


def old_batch_plan(train: np.ndarray, batch_size: int, epoch: int, seed: int,
                   poisson: bool) -> list[np.ndarray]:
    """The pre-e13c364 batch plan: today's `batch_plan` fed from the public seed, as it was."""
    return batch_plan(train, batch_size, np.random.default_rng([seed, PLAN_SALT, epoch]), poisson)


def old_label_flips(n_train: int, epsilon: float, seed: int) -> np.ndarray:
    """Which training people (in position order) the pre-e13c364 randomised response flipped."""
    rho = 0.0 if math.isinf(epsilon) else 1.0 / (1.0 + math.exp(epsilon))
    return np.random.default_rng([seed, FLIP_SALT]).random(n_train) < rho


def old_position_order(n: int, seed: int) -> np.ndarray:
    """The pre-e13c364 order of positions: position p holds the perm[p]-th smallest of the
    authority's aligned rows."""
    return np.random.default_rng([seed, POSITIONS_SALT]).permutation(n)


def old_mechanism_view(y: np.ndarray, config: dict, silo: str = "replayed") -> SiloView:
    """What a silo received under the OLD code for labels `y` in position order: the stratified
    split from the public seed, batch plans from it, and validation-only eval messages."""
    seed = int(config["seed"])
    codes = old_stratified_split(y, float(config["split.train"]), float(config["split.val"]),
                                 seed)
    train, val = np.flatnonzero(codes == 0), np.flatnonzero(codes == 1)
    poisson = math.isfinite(float(config["privacy.epsilon"]))
    view = SiloView(silo, len(y))
    for epoch in range(int(config["train.epochs"])):
        plan = old_batch_plan(train, int(config["train.batch_size"]), epoch, seed, poisson)
        view.steps.append(Step(len(view.steps) + 1, plan=np.concatenate(plan),
                               eval=val if epoch > 0 else None,
                               done_sizes=np.array([len(b) for b in plan])))
    view.steps.append(Step(len(view.steps) + 1, eval=np.arange(len(y))))
    return view


def received_batches(view: SiloView) -> list[np.ndarray]:
    """Every mini-batch a silo was asked to compute, in order (plans cut by their sizes as the
    gradients later returned them; a plan whose gradient never came counts whole)."""
    out: list[np.ndarray] = []
    for s in view.steps:
        if s.done_plan is not None:
            out += np.split(s.done_plan, _cuts(s.done_sizes))
    if not out:  # a view without gradients (old_mechanism_view): plans cut by their sizes
        out = [b for s in view.steps if s.plan is not None and s.done_sizes is not None
               for b in np.split(s.plan, np.cumsum(s.done_sizes)[:-1])]
    return out


@dataclass
class PlanReplay:
    """Replayed against received batches, per batch: |replayed ∩ real| / |real| (the share of
    a real batch the replay predicts) and the Jaccard index; q is what chance gives."""

    overlap: float
    jaccard: float
    first_jaccard: float
    q: float
    batches: int


def replay_plans(view: SiloView, config: dict) -> PlanReplay:
    """Replay the old code's batch plans from config.json's seed over the training positions
    the silo saw (the union of its plans, sorted, as the old split returned them) and compare
    them batch by batch with the real ones."""
    real = received_batches(view)
    train = np.unique(np.concatenate(real))
    batch_size, seed = int(config["train.batch_size"]), int(config["seed"])
    poisson = math.isfinite(float(config["privacy.epsilon"]))
    replayed: list[np.ndarray] = []
    epoch = 0
    while len(replayed) < len(real):
        replayed += old_batch_plan(train, batch_size, epoch, seed, poisson)
        epoch += 1
    overlaps, jaccards = [], []
    for r, s in zip(real, replayed, strict=False):
        inter = len(np.intersect1d(r, s))
        overlaps.append(inter / max(1, len(r)))
        jaccards.append(inter / max(1, len(np.union1d(r, s))))
    return PlanReplay(float(np.mean(overlaps)), float(np.mean(jaccards)), float(jaccards[0]),
                      min(1.0, batch_size / len(train)), len(real))


def replay_flips(view: SiloView, config: dict, noisy: LabelGuess) -> LabelGuess:
    """Undo randomised response with the old code's flips replayed from the public seed: the
    label the gradients show (`noisy`, e.g. the sign attack) XOR the replayed flip."""
    train = np.unique(np.concatenate(received_batches(view)))
    flips = old_label_flips(len(train), float(config["privacy.label_epsilon"]),
                            int(config["seed"]))
    flipped = np.zeros(view.n_positions, dtype=bool)
    flipped[train] = flips
    guess = noisy.guess.astype(bool) ^ flipped[noisy.positions]
    return LabelGuess(noisy.positions, guess.astype(np.float64), guess)


def replay_position_order(view: SiloView, config: dict) -> np.ndarray:
    """The rank, among the aligned people, of each position's row in the authority's table,
    as the old code's public-seed permutation would give it."""
    return old_position_order(view.n_positions, int(config["seed"]))


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rho."""
    return float(np.corrcoef(rankdata(a), rankdata(b))[0, 1])


# ---- 4. membership on the released scores ----------------------------------------------------


def membership(truth: Truth, per_class: bool = True):
    """Loss-threshold membership inference by whoever receives the scores: training people
    (members) against test people, with the clean labels (simulations/analysis/audit.py).

    `per_class`: one threshold per label (Yeom et al.'s attack with class-dependent
    thresholds): the statistic is a person's loss percentile among all scored people of the
    same label, which the attacker can compute without knowing who is a member. Calibration
    squashes an overfit model's probabilities towards the base rate, which mixes the two
    classes' losses; within a class the order, and with it the memorisation, survives."""
    scored = ~np.isnan(truth.probability)
    loss = np.full(len(truth.y), np.nan)
    loss[scored] = per_example_loss(truth.y[scored].astype(np.float64),
                                    truth.probability[scored])
    if per_class:
        for label in (0, 1):
            same = scored & (truth.y == label)
            loss[same] = rankdata(loss[same]) / max(1, int(same.sum()))
    members = loss[(truth.split == 0) & scored]
    others = loss[(truth.split == 2) & scored]
    return membership_audit(members, others, truth.delta)


# ---- 5. secrets in what others can read ------------------------------------------------------


def party_secrets(keystore: Path | None, parties: Path) -> dict[str, bytes]:
    """Every party's randomness secret (crypto/secret_random.py) and the authority's pepper."""
    found = {}
    places = [p for p in (keystore, *(d for d in Path(parties).iterdir() if d.is_dir()))
              if p is not None]
    pattern = SECRET_FILE.format(party="*")
    for place in places:
        for path in Path(place).glob(pattern):
            found[str(path)] = path.read_bytes()
    pepper = Path(parties) / AUTHORITY / PEPPER_FILE
    if pepper.exists():
        found[str(pepper)] = pepper.read_bytes()
    return found


def secret_leaks(data: bytes, secrets: dict[str, bytes]) -> list[str]:
    """Which secrets appear in `data`: raw, or as hex (either case), or as base64."""
    import base64

    out = []
    lowered = data.lower()
    for name, secret in secrets.items():
        forms = (secret, secret.hex().encode(), base64.b64encode(secret).rstrip(b"="),
                 base64.urlsafe_b64encode(secret).rstrip(b"="))
        if any(f in data for f in forms) or secret.hex().encode() in lowered:
            out.append(name)
    return out
