"""Scoring a tree or scorecard run's people after the run (server/rescore.py dispatches here):
the same messages and arithmetic as the run's own scoring, for the positions asked.

Trees (`model.kind=gbdt`, SecureBoost or DP): one `query.gbdt_route` per silo owning splits,
all at once, asking its bits at its own splits (column, bin) for the positions, as the run's
final routing did; each person's leaf in every tree, the margin as the run summed it, and the
credits of the splits on each path (server/gbdt_reasons.py) for points and reasons. The silo
routes with its kept bins (clients/silo/kept_state.py): a threshold never leaves it.

Scorecard (non-private or DP): one `query.scorecard_score` per silo with its coefficients and
the positions, answered with each person's partial logit (and, asked for reasons, the bins that
cost the most points), as at the end of the run; no points are sent, so the silos' tables stay
as the run wrote them.

What the authority learns is what the run's last phase let it learn, for the people asked:
their bits at every split (trees) or each silo's partial logit and reasons (scorecard),
recomputed from the silos' current records (a dispute's correction applied).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import Message

from clients.protocol import messages as m
from clients.protocol.scorecard import SCORE
from server import gbdt
from server.explanations import Explained, parse
from server.federation import Federation, FederationError
from server.gbdt_reasons import Credits, explained
from server.gbdt_scores import leaf_positions, route
from server.gbdt_silos import FlowerSilos
from server.kept_model import names_of, trees_of


def tree_margins(fed: Federation, record: dict, positions: np.ndarray, k: int
                 ) -> tuple[np.ndarray, dict[str, Explained]]:
    """Margins of the positions under the kept trees, and (k > 0, the silos consented in the
    run) each silo's reason codes in the run's form."""
    trees, values = trees_of(record)
    widths = {s: int(w) for s, w in record["widths"].items()}
    if set(widths) != set(fed.silos):
        raise FederationError("the federation's silos are not the run's")
    silos = FlowerSilos(fed, widths, route_positions=positions)
    model = gbdt.Model(params=gbdt.GbdtParams(), base_margin=float(record["base_margin"]),
                       trees=tuple(trees))
    bits = route(model, silos)
    rows = len(positions)
    margin = np.full(rows, model.base_margin)
    credits = Credits(widths, rows)
    for t, (tree, value) in enumerate(zip(trees, values, strict=True)):
        leaf = leaf_positions(tree, t, bits, rows)
        margin += value[leaf]
        credits.add(tree, value, leaf)
    names = names_of(record)
    return margin, (explained(credits, names, k) if k and names else {})


def scorecard_margins(fed: Federation, record: dict, positions: np.ndarray, k: int
                      ) -> tuple[np.ndarray, dict[str, Explained]]:
    """Margins of the positions under the kept scorecard (its intercept plus each silo's
    partial logit), and with k > 0 each silo's reason codes."""
    coef: Mapping[str, list[float]] = record["coef"]
    if set(coef) != set(fed.silos):
        raise FederationError("the federation's silos are not the run's")
    replies = fed.exchange(SCORE, {
        name: m.make_content({"reasons": k}, weights=np.asarray(coef[name], dtype=np.float64),
                             positions=positions) for name in coef})
    margin = float(record["intercept"]) + sum(
        (_logits(name, replies[name], len(positions)) for name in coef), np.zeros(len(positions)))
    if not k:
        return margin, {}
    return margin, {name: parse(replies[name], name, len(positions), k) for name in coef}


def _logits(name: str, reply: Message, rows: int) -> np.ndarray:
    logits = m.get_array(reply, "logits", np.float64, 1)
    if logits.shape != (rows,):
        raise FederationError(f"silo {name!r} returned partial logits of the wrong shape")
    return logits
