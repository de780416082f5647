"""Red team: each curious party plays its attack with exactly what it received.

DESIGN.md, "Attacks are part of the design". A silo's attacks read only the messages that silo
received in a run (captured with FEDSCORE_CAPTURE_DIR, clients/protocol/capture.py) and the run's
public config.json. The experiment layer (`Truth`, redteam_scoring.py) then reads what no party
may: the authority's labels, its private split, the released scores; it is used ONLY to score
the attacks.

Attacks (tests/test_attacks.py holds each to its bound), each in its own module:

1. Label inference from the gradients a silo receives (Li et al., "Label Leakage and Protection
   in Two-party Split Learning", ICLR 2022): the sign of d loss / d contribution, its norm
   (the rarer class has the larger |p - y| early on), and, for vector gradients (concat mode),
   the direction: cosine to the batch's largest gradient. Under label DP (randomised response,
   epsilon e) every attack's balanced accuracy and AUC are at most e^e / (1 + e^e).
   redteam_gradients.py.
2. Split / evaluation pattern: which positions appear in plans and in eval messages. Two
   attacks: pattern statistics (how often a position is sampled, whether it is evaluated), and
   a Bayesian replay of the OLD stratified split from the public seed (`stratified_replay`).
   redteam_split.py.
3. Seed replay: what the old code drew from the public seed (batch plans, label flips, the
   order of positions) replayed and compared with what the silo actually received.
   redteam_seed.py.
4. Membership on the released scores: a loss threshold per label (simulations/analysis/audit.py's
   audit turns it into an epsilon lower bound).
5. Secrets: no party's randomness secret or the pepper in anything another party reads.
   4 and 5: redteam_leaks.py.

The `old_*` functions (redteam_seed.py) reproduce the mechanisms of the code before commit
e13c364 (draws from `np.random.default_rng([seed, salt])`, a split stratified on labels), so a
test can show each attack succeeding when the protection is off.

This module reads what one silo received: its captured messages, as a `SiloView`
per silo, and the run's public config.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from clients.protocol.capture import MESSAGES_DIR

STEP = "train.step"
ALIGN = "query.align"
HELLO = "query.hello"


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
