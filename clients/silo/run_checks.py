"""What a silo allows in a run, judged by the run's announced mode (clients/protocol/run_mode.py).

The authority announces the run's `model.kind` and target epsilon with `query.align`; the silo
pins them (node state `model`, `<silo dir>/checkpoints/<run key>/model.json`). Every later
request of the run is checked here against the pinned mode, not against what the request
says of itself:

- each message belongs to some kinds of run (`REQUESTS`): a DP tree run, whose announced
  MLP spec has no DP-SGD noise, must not be answered `train.step` contributions, nor
  `query.score` ones; a scorecard run asks root histograms only;
- a request only a non-private run makes is refused in a run announced at a finite epsilon:
  the SecureBoost trees' histograms and splits choose thresholds on the data, the
  scorecard's training logits have no DP version, and quantile bins put data-dependent
  edges behind every split (the DP trees' splits are drawn over bins fixed before any data
  is read); the pre-bins a DP scorecard asks (`query.gbdt_route`) are refused in a
  non-private scorecard run, which needs none;
- `query.gbdt_start` must name the announced run key, so the trees' answers are bound to the
  pinned mode;
- the same run key cannot be announced again with another mode (a run key names one
  configuration, server/run_keys.py).

A refusal is `REFUSED` (clients/protocol/messages.py), naming the request and the mode.
"""

from __future__ import annotations

import json
from pathlib import Path

from clients.node import Node
from clients.protocol import messages as m
from clients.protocol.gbdt import EXPLAIN, LEVEL, ROUTE, SPLIT, START
from clients.protocol.run_mode import KIND, RunMode, RunModeError
from clients.protocol.scorecard import LOGITS, SCORE, WOE

MODEL_FILE = "model.json"  # in the run's checkpoint directory: the pinned announcement


class RunModeRefusalError(Exception):
    """A request the run's announced mode does not allow."""


ANY, NON_PRIVATE, DP_ONLY = "any", "non-private", "dp"  # at which privacy a kind sends it

# message type -> {the kind of run that sends it: at which privacy}
REQUESTS: dict[str, dict[str, str]] = {
    m.STEP: {"mlp": ANY},
    START: {"gbdt": ANY, "scorecard": ANY},  # its binning is checked by `check_tree_start`
    LEVEL: {"gbdt": NON_PRIVATE, "scorecard": NON_PRIVATE},
    SPLIT: {"gbdt": NON_PRIVATE},
    # The DP trees' one request after the start; the DP scorecard's too (each person's
    # pre-bin, from which the authority computes the noisy counts and Newton steps). A
    # non-private scorecard needs no pre-bins: its authority sees merged bins' logits only.
    ROUTE: {"gbdt": ANY, "scorecard": DP_ONLY},
    # The trees' reason codes: the silo's consent and its feature names (no data), in a DP
    # run too (the reasons are post-processing of the released trees, server/gbdt_reasons.py).
    EXPLAIN: {"gbdt": ANY},
    WOE: {"scorecard": ANY},  # the released WoE tables, DP ones in a DP run
    LOGITS: {"scorecard": NON_PRIVATE},  # training rows' partial logits: no DP version
    SCORE: {"scorecard": ANY},
    # Contributions of the MLP's bottom model: a tree or scorecard run has trained none, and
    # its announced spec has no DP noise (the untrained model's exact outputs, every person).
    m.SCORE: {"mlp": ANY},
}


def announced(cfg: dict) -> RunMode:
    """The mode a `query.align` announces."""
    try:
        return RunMode.from_config(cfg)
    except RunModeError as exc:
        raise m.ProtocolError(f"the announcement's run mode: {exc}") from None


def check_same_mode(directory: Path, run_key: str, mode: RunMode) -> None:
    """A run key announced before keeps the mode it was first announced with: otherwise an
    authority announces a DP run, then re-aligns the same run key as a non-private one and
    asks what only a non-private run may ask, under the DP run's name."""
    path = directory / MODEL_FILE
    if not path.exists():
        return
    try:
        record = json.loads(path.read_text())
        if not isinstance(record, dict) or KIND not in record:
            return  # from a version that announced no mode: nothing pinned to hold it to
        before = RunMode.from_config(record)
    except (ValueError, RunModeError):
        return  # unreadable: nothing pinned to hold it to
    if before != mode:
        raise RunModeRefusalError(
            f"run {run_key} was announced as {before.describe()}; it cannot be announced "
            f"again as {mode.describe()} (a run key names one configuration)")


def pinned(node: Node) -> tuple[str, RunMode]:
    """The run key and mode this silo pinned at `query.align` (or `query.resume`)."""
    if "model" not in node.state:
        raise m.ProtocolError("no run announced: the authority must send query.align first")
    record = dict(m.config_record(node.state, "model"))
    try:
        return str(record["run"]), RunMode.from_config(record)
    except RunModeError as exc:
        raise m.ProtocolError(f"the pinned run mode: {exc}") from None


def check_request(node: Node, message_type: str) -> RunMode:
    """Refuse `message_type` unless the pinned run is of a kind that sends it, at the
    privacy the run was announced with."""
    _, mode = pinned(node)
    sent_by = REQUESTS[message_type]
    if mode.kind not in sent_by:
        raise RunModeRefusalError(f"{message_type} is no request of a model.kind={mode.kind} "
                                  "run (as announced with query.align)")
    when = sent_by[mode.kind]
    if when == NON_PRIVATE and mode.private:
        raise RunModeRefusalError(
            f"{message_type} is a request of a non-private run only (its answers are "
            f"released without DP), and this run was announced as {mode.describe()}")
    if when == DP_ONLY and not mode.private:
        raise RunModeRefusalError(
            f"{message_type} is a request of a DP run only in a model.kind={mode.kind} run, "
            f"and this run was announced as {mode.describe()}")
    return mode


SELECTION_KEYS = ("keep", "restore")  # a train.step's epoch selection (non-private runs)


def check_selection(node: Node, config: dict, spec_private: bool) -> bool:
    """A `train.step` that keeps this silo's weights as the best epoch so far (`keep`) or goes
    back to them (`restore`): whether it asks either, refused unless the pinned run is
    non-private. Choosing an epoch on validation labels is a selection on private labels
    that no DP run accounts for; a DP run keeps its last epoch. `spec_private`: the pinned
    model spec adds DP-SGD or transcript noise (refused too, whatever the announced epsilon)."""
    asked = [key for key in SELECTION_KEYS if config.get(key)]
    if not asked:
        return False
    mode = check_request(node, m.STEP)
    if mode.private or spec_private:
        what = mode.describe() if mode.private else "a model with DP noise"
        raise RunModeRefusalError(
            f"{m.STEP} with {' and '.join(asked)} chooses an epoch on validation labels (a "
            f"selection no DP accounting covers), and this run was announced as {what}; a DP "
            "run keeps its last epoch")
    return True


def check_tree_start(node: Node, run: str, binning: str) -> RunMode:
    """`query.gbdt_start`: the announced run, a tree or scorecard run, and in a DP run bins
    fixed before any data is read."""
    run_key, _ = pinned(node)
    if run != run_key:
        raise RunModeRefusalError(f"{START} names run {run}, but this silo was aligned for "
                                  f"run {run_key}")
    mode = check_request(node, START)
    if mode.private and binning != "uniform":
        raise RunModeRefusalError(
            f"binning={binning} places bin edges at this silo's own data (a release no DP "
            f"accounting covers), and this run was announced as {mode.describe()}; a DP run "
            "bins uniformly")
    return mode
