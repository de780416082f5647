"""The kinds of line in the privacy ledger, typed, and each one's mechanism as a dp-accounting
event.

One frozen dataclass per kind of line a run writes. Its fields are the line's keys in the order
the JSON object has them (`seq` aside: the ledger numbers its lines), so `to_json()` gives the
object the writers wrote as keyword dicts before these types existed, byte for byte once
dumped. `LedgerLine.from_json` reads a line back, by its `mechanism` (and, for the three kinds
of Gaussian line, by its keys), and refuses a line it does not know. `dp_event()` is what the
line records, as Google's dp-accounting describes mechanisms: `fedscore ledger verify`
composes the events of a budget and hands them to an independent accountant, so no reader
re-derives (sigma, q, steps) by hand.

A line with a `history` (transcript, horizontal region and user-level lines) carries its
budget's whole composition up to that line (`cumulative`); every other line records only its
own steps, composed with the lines before it.

delta: a line's (`epsilon`, `delta`) holds for everything its budget released up to it. A
mechanism may add a delta of its own outside the Gaussian accounting (`extra_delta`: a silo's
statistics release keeps a category value only past a threshold that a value held by one person
passes with that probability); such deltas add up, so a line's `delta` is the accountant's delta
plus the `extra_delta` of every line composed up to it (`budget_extra_delta`), and the
accountant's epsilon is computed at `delta` minus that sum.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import dp_accounting as dpa

from clients.protocol.accounting import joint_multiplier
from server import ledger
from server.label_dp import flip_probability
from server.ledger import LedgerError

# (noise multiplier, sample rate, steps), run-length encoded as the accountants keep it.
HistoryEntry = tuple[float, float, int]


# ---- events -----------------------------------------------------------------------------------


def gaussian_steps(sigma: float, q: float, steps: int) -> dpa.DpEvent:
    """`steps` Gaussian mechanisms of noise multiplier `sigma`, each on a Poisson sample at rate
    `q` (q = 1: on everyone, no sampling, as every release of a person's transcript)."""
    if steps <= 0:
        return dpa.NoOpDpEvent()
    gaussian = dpa.GaussianDpEvent(sigma)
    one = gaussian if q >= 1.0 else dpa.PoissonSampledDpEvent(q, gaussian)
    return dpa.SelfComposedDpEvent(one, int(steps))


def history_event(history: Iterable[HistoryEntry]) -> dpa.DpEvent:
    """The composition of an accountant's history."""
    return compose(gaussian_steps(sigma, q, steps) for sigma, q, steps in history)


def compose(events: Iterable[dpa.DpEvent]) -> dpa.ComposedDpEvent:
    """Events one after the other. Nested compositions are flattened, no-ops dropped, and
    neighbouring self-compositions of one mechanism merged, as Opacus run-length encodes its
    history: the same composition, computed by the PLD accountant as one self-convolution
    instead of one per line."""
    out: list[dpa.DpEvent] = []
    for event in _flat(events):
        last = out[-1] if out else None
        if (isinstance(event, dpa.SelfComposedDpEvent)
                and isinstance(last, dpa.SelfComposedDpEvent) and last.event == event.event):
            out[-1] = dpa.SelfComposedDpEvent(event.event, last.count + event.count)
        else:
            out.append(event)
    return dpa.ComposedDpEvent(out)


def _flat(events: Iterable[dpa.DpEvent]) -> Iterable[dpa.DpEvent]:
    for event in events:
        if isinstance(event, dpa.ComposedDpEvent):
            yield from _flat(event.events)
        elif not isinstance(event, dpa.NoOpDpEvent):
            yield event


def budget_event(lines: Iterable[LedgerLine]) -> dpa.ComposedDpEvent:
    """What a budget's lines (in ledger order) spend together: each line's own steps after the
    ones before it, a cumulative line standing for everything up to it."""
    events: list[dpa.DpEvent] = []
    for line in lines:
        events = [line.dp_event()] if line.cumulative else [*events, line.dp_event()]
    return compose(events)


def budget_extra_delta(lines: Iterable[LedgerLine]) -> float:
    """The delta a budget's lines (in ledger order) add outside their events, composed as
    `budget_event` composes the events: summed, a cumulative line standing for everything up
    to it. The last line's `delta` minus this is the delta its accountant composed at."""
    total = 0.0
    for line in lines:
        own = line.extra_delta or 0.0
        total = own if line.cumulative else total + own
    return total


# ---- the JSON form of fields ------------------------------------------------------------------


def _history(value: Any) -> tuple[HistoryEntry, ...]:
    return tuple((h[0], h[1], h[2]) for h in value)


def _blocks(value: Any) -> tuple[Block, ...]:
    return tuple(Block(**b) for b in value)


def _history_field() -> Any:
    return field(metadata={"from_json": _history})


def _kind(value: str) -> Any:
    """The line's constant `mechanism` (or `event`): written, never passed in."""
    return field(default=value, init=False)


def _json_value(value: object) -> object:
    if isinstance(value, Block):
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, tuple):
        return [_json_value(v) for v in value]
    return value


@dataclass(frozen=True, kw_only=True)
class Block:
    """One party's block of the joint DP-SGD gradient: clipped at `clip`, noised at
    `noise_multiplier` times it."""

    party: str
    noise_multiplier: float
    clip: float


class LedgerLine:
    """One line of the ledger. Subclasses are frozen dataclasses whose fields are the line's
    keys in order; those every line has are declared here for the readers."""

    party: str
    budget: str
    mechanism: str
    steps: int
    round: int
    epsilon: float | None
    delta: float
    accountant: str
    # True when the line's event is its budget's whole composition up to it (it has a history).
    cumulative: ClassVar[bool] = False

    # The delta this line's mechanism adds outside its event (None: none); kinds that can have
    # one declare it as a field.
    extra_delta: float | None = None

    def dp_event(self) -> dpa.DpEvent:
        raise NotImplementedError

    def to_json(self) -> dict[str, object]:
        """The line as the ledger writes it (without `seq`), keys in the order of the fields;
        a field marked `omit_none` is left out when None."""
        return {f.name: _json_value(getattr(self, f.name))
                for f in dataclasses.fields(self)  # type: ignore[arg-type]
                if not (f.metadata.get("omit_none") and getattr(self, f.name) is None)}

    @classmethod
    def from_json(cls, entry: Mapping[str, object], where: str = "ledger line") -> LedgerLine:
        """The typed line of a parsed JSON object (its `seq` ignored); `where` names the line in
        errors. Refuses an unknown mechanism, a line whose keys fit none of its mechanism's
        kinds, and, called on a subclass, a line of another kind."""
        keys = set(entry) - {ledger.SEQ}
        mechanism = entry.get("mechanism")
        kinds = _KINDS.get(mechanism) if isinstance(mechanism, str) else None
        if kinds is None:
            raise LedgerError(f"{where}: unknown mechanism {mechanism!r} (a ledger line is one "
                              f"of {', '.join(sorted(_KINDS))})")
        fits = [k for k in kinds if k.fits(keys)]
        if not fits:
            raise LedgerError(f"{where}: a {mechanism!r} line with keys {', '.join(sorted(keys))}"
                              " fits no kind of ledger line")
        line = fits[0]._parse(entry, where)
        if not isinstance(line, cls):
            raise LedgerError(f"{where}: a {type(line).__name__} line, not a {cls.__name__}")
        return line

    @classmethod
    def fits(cls, keys: set[str]) -> bool:
        """Whether an object with these keys is a line of this kind: every field's key, but
        for the `omit_none` ones, and no other."""
        fields = dataclasses.fields(cls)  # type: ignore[arg-type]
        return ({f.name for f in fields if not f.metadata.get("omit_none")} <= keys
                <= {f.name for f in fields})

    @classmethod
    def _parse(cls, entry: Mapping[str, object], where: str) -> LedgerLine:
        kwargs: dict[str, object] = {}
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            if not f.init:
                if entry[f.name] != f.default:
                    raise LedgerError(f"{where}: {f.name} {entry[f.name]!r} is not "
                                      f"{f.default!r}")
                continue
            if f.name in entry:
                parse: Callable[[Any], object] = f.metadata.get("from_json", lambda v: v)
                try:
                    kwargs[f.name] = parse(entry[f.name])
                except (TypeError, KeyError, IndexError) as exc:
                    raise LedgerError(f"{where}: {f.name} is malformed ({exc})") from None
        return cls(**kwargs)


# ---- the kinds of line --------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class GaussianRelease(LedgerLine):
    """A Gaussian release of one party outside DP-SGD: preparation statistics, the prior and
    contribution summaries (population "all": everyone), the calibration (validation people).
    A silo's preparation statistics carry `extra_delta`, the delta of their category
    thresholds (clients/protocol/dp_constants.py THRESHOLD_DELTA); lines without one (and
    ledgers written before it existed) leave the key out."""

    party: str
    budget: str = "model"
    population: str
    mechanism: str = _kind("gaussian")
    purpose: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    round: int
    epsilon: float
    delta: float
    extra_delta: float | None = field(default=None, metadata={"omit_none": True})
    accountant: str

    def dp_event(self) -> dpa.DpEvent:
        return gaussian_steps(self.noise_multiplier, self.sample_rate, self.steps)


@dataclass(frozen=True, kw_only=True)
class JointRound(LedgerLine):
    """One round of DP-SGD steps on the combined model: every party's block noised on one
    shared Poisson batch. The event's multiplier is recomputed from the blocks, not read from
    `noise_multiplier`."""

    party: str = "*"
    budget: str = "model"
    population: str = "train"
    mechanism: str = _kind("joint_poisson_gaussian")
    blocks: tuple[Block, ...] = field(metadata={"from_json": _blocks})
    noise_multiplier: float
    sample_rate: float
    steps: int
    round: int
    epsilon: float
    delta: float
    accountant: str

    def dp_event(self) -> dpa.DpEvent:
        sigma = joint_multiplier([b.noise_multiplier for b in self.blocks])
        return gaussian_steps(sigma, self.sample_rate, self.steps)


@dataclass(frozen=True, kw_only=True)
class LabelRelease(LedgerLine):
    """Randomised response on the labels, once before training: pure epsilon_rr label-DP."""

    party: str
    budget: str = "label"
    mechanism: str = _kind("randomized_response")
    epsilon_rr: float
    steps: int = 1
    round: int = 0
    epsilon: float
    delta: float = 0.0
    accountant: str = "pure"

    def dp_event(self) -> dpa.DpEvent:
        # Binary randomised response flipping with probability rho: with probability 2 rho the
        # label is replaced by a uniform draw over the two labels.
        event = dpa.RandomizedResponseDpEvent(2 * flip_probability(self.epsilon_rr), 2)
        return dpa.SelfComposedDpEvent(event, self.steps) if self.steps != 1 else event


@dataclass(frozen=True, kw_only=True)
class TranscriptLine(LedgerLine):
    """A silo's transcript budget after a round: the worst-off person's releases and model
    steps, composed without amplification (`history`); epsilon None without DP-SGD."""

    party: str
    budget: str = "transcript"
    mechanism: str = _kind("gaussian")
    history: tuple[HistoryEntry, ...] = _history_field()
    round: int
    steps: int
    epsilon: float | None
    delta: float
    accountant: str
    clip: float
    cumulative: ClassVar[bool] = True

    def dp_event(self) -> dpa.DpEvent:
        return history_event(self.history)


@dataclass(frozen=True, kw_only=True)
class Refusal(LedgerLine):
    """Steps refused because they would pass a cap; a model refusal carries the epsilon they
    would have reached, a transcript one none. Nothing was released."""

    party: str = "*"
    budget: str
    mechanism: str = _kind("refusal")
    event: str = _kind("refused")
    steps: int
    round: int
    delta: float
    accountant: str
    epsilon: float | None
    cap: float
    population: str | None = field(default=None, metadata={"omit_none": True})

    def dp_event(self) -> dpa.DpEvent:
        return dpa.NoOpDpEvent()


@dataclass(frozen=True, kw_only=True)
class RegionLine(LedgerLine):
    """Horizontal topology, sample-level DP: one noise setting of a region's DP-SGD, its
    customers a population of their own; `history` is the region's accountant up to it."""

    party: str
    budget: str = "model"
    population: str
    mechanism: str = _kind("poisson_gaussian")
    noise_multiplier: float
    sample_rate: float
    steps: int
    round: int
    epsilon: float
    delta: float
    accountant: str
    adjacency: str
    scope: str
    history: tuple[HistoryEntry, ...] = _history_field()
    cumulative: ClassVar[bool] = True

    def dp_event(self) -> dpa.DpEvent:
        return history_event(self.history)


@dataclass(frozen=True, kw_only=True)
class UserLevelLine(LedgerLine):
    """Horizontal topology, user-level DP: the Gaussian noise on the average of the regions'
    clipped updates, one mechanism per round, every region in every round."""

    party: str
    budget: str = "user"
    mechanism: str = _kind("gaussian")
    noise_multiplier: float
    sample_rate: float
    steps: int
    round: int
    epsilon: float
    delta: float
    accountant: str
    adjacency: str
    sensitivity: float
    scope: str
    history: tuple[HistoryEntry, ...] = _history_field()
    cumulative: ClassVar[bool] = True

    def dp_event(self) -> dpa.DpEvent:
        return history_event(self.history)


KINDS: tuple[type[LedgerLine], ...] = (GaussianRelease, JointRound, LabelRelease,
                                       TranscriptLine, Refusal, RegionLine, UserLevelLine)
# Lines of the model budget carry the population they spend on.
ModelLine = GaussianRelease | JointRound | RegionLine


def _by_mechanism() -> dict[str, list[type[LedgerLine]]]:
    """The kinds of each mechanism (three Gaussian ones, told apart by their keys: no object
    fits two of them)."""
    out: dict[str, list[type[LedgerLine]]] = {}
    for kind in KINDS:
        mechanism = next(f.default for f in dataclasses.fields(kind)  # type: ignore[arg-type]
                         if f.name == "mechanism")
        out.setdefault(str(mechanism), []).append(kind)
    return out


_KINDS = _by_mechanism()


def read(path: Path) -> list[LedgerLine]:
    """The typed lines of a run's ledger (a run directory or its ledger.jsonl)."""
    file = path / ledger.LEDGER_FILE if path.is_dir() else path
    return [LedgerLine.from_json(entry, f"{file}:{number}")
            for number, entry in enumerate(ledger.read(path), start=1)]
