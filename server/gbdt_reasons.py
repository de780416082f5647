"""Reason codes and per-silo points of the trees (`model.kind=gbdt`, issue 20 item 1), in the
form of the MLP's and the scorecard's (server/explanations.py `Explained`, one per silo, merged
into the scores file's points_<silo> and reason_<j> columns by `points_frame`).

Path attribution (Saabas). Every node of a tree has a value: a leaf its leaf value, an inner
node the leaf value it would have had (the Newton step of the sums of its leaves). Along a
person's path, the change of value at each split is credited to the split's (silo, column), so
that per tree: leaf value = root value + the credits of the splits on the path, exactly. Over
the trees: margin = bias + sum of every credit, bias = base margin + every root value. A silo's
contribution (its points, once `points_frame` turns logits into points) is the sum of its
columns' credits; a feature's share is the sum over its columns (a missing indicator and one-hot
columns count as their feature: the silo says which column is which). The reference person is
the root: every tree's root value, i.e. the hessian-weighted average training person, so
points_frame's `reference` is 0 for every silo.

Who computes them, and the silo's policy. The authority already knows each split's (silo,
column) and every person's path (the routing bits), so it credits the splits itself: asking a
silo to rank its own columns' credits would send it, per person, node values that depend on
which nodes the person reached, i.e. on the OTHER silos' splits. The silo's say is its consent,
asked before training (`query.gbdt_explain` with k): it answers with its feature names only when
its policy `explain` allows k reason codes per person. Beyond it, a run that configured
explain.reasons is refused (it stops before any tree is grown); the default ask is declined
and the run goes on without reason codes. As for the scorecard, a tree run asks
k = explain.reasons, or MAX_REASONS when none are configured (server/run_plan.py
`reasons_asked`): the reasons show the authority nothing it does not hold already. Each silo's
Explained carries at most k of its features, as a silo's own answer would.

Privacy. SecureBoost trees: node values from the exact training g, h (the trees are released
without DP anyway). DP trees (server/gbdt_dp.py): node values come only from the released noisy
leaf sums (G~, H~) (`DpTrees.sums`, the Gaussian mechanism's output): an inner node's value is the
Newton step of its leaves' summed G~ and H~ with each leaf's lambda (`released_values`: the mean
of its leaves' released values weighted by max(H~, 0) + lambda). A person's reasons and
points are then post-processing of the DP model and that person's own routing, as their score
is: they cost no privacy budget. No summary over people (quantiles of the silos' points) is
made for the DP trees: that would be a statistic of the data outside the accountant.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from flwr.app import Message

from clients.protocol import messages as m
from clients.protocol.gbdt import EXPLAIN
from clients.protocol.reasons import top_reasons_matrix
from server import gbdt, gbdt_dp
from server.explanations import Explained
from server.federation import FederationError
from server.gbdt_silos import FlowerSilos

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FeatureNames:
    """A silo's consent: its feature names and the feature index of each of its columns."""

    features: list[str]
    columns: np.ndarray  # (columns,) index into `features`


class ExplainedSilos(FlowerSilos):
    """The trees' silos, which can also be asked for their consent to reason codes."""

    def consent(self, reasons: int, required: bool) -> dict[str, FeatureNames | None]:
        """Every silo's consent to `reasons` codes per person (its policy `explain`): beyond
        it a `required` request is refused (the run stops here, before training), an
        optional one declined (None)."""
        replies = self._exchange(EXPLAIN, {
            name: m.make_content({"reasons": reasons, "required": int(required)})
            for name in self.features})
        return {name: _names(name, reply, self.features[name], reasons)
                for name, reply in replies.items()}


def _names(name: str, reply: Message, width: int, reasons: int) -> FeatureNames | None:
    consent = m.config_int(m.get_config(reply), "consent")
    if consent == 0:
        return None
    if consent != reasons:
        raise FederationError(f"silo {name!r} consented to {consent} reason codes, not the "
                              f"{reasons} asked")
    features = [str(f) for f in m.get_config(reply).get("explain.features", [])]
    columns = m.get_array(reply, "columns", np.int64, 1)
    if columns.shape != (width,) or (columns < 0).any() or (columns >= len(features)).any():
        raise FederationError(f"silo {name!r} named its features for the wrong columns")
    return FeatureNames(features, columns)


class Credits:
    """Per silo, per person, per column: the margin moved by the splits on that column."""

    def __init__(self, widths: Mapping[str, int], rows: int) -> None:
        self.silos = list(widths)
        self.offsets = dict(zip(self.silos, np.cumsum([0, *widths.values()])[:-1].tolist(),
                                strict=True))
        self.widths = dict(widths)
        self.rows = rows
        self._slots = sum(widths.values())
        self._flat = np.zeros(rows * self._slots)

    def add(self, tree: gbdt.Tree, values: np.ndarray, heap: np.ndarray) -> None:
        """One tree: `values` by heap index (every node's), `heap` each person's leaf (heap
        index). Walks every person up from the leaf, crediting each step's change of value to
        the parent's split.

        Only the (person, column) slots the tree touches are added to, at most one per level
        and person, in one scatter: a bincount over every slot allocated rows x columns floats
        per tree (80 MB at 100,000 people, 300 times in a DP run; bench/credits.py). A
        person's steps on the same column at two levels are summed first, in the walk's
        order, so the credits are bit for bit what that bincount gave."""
        slots, steps = _path_steps(tree, values, heap, self.offsets)
        if not slots.shape[1]:
            return
        _merge_repeats(slots, steps)
        live = slots >= 0  # each person's slots are distinct now: no index twice
        index = np.arange(self.rows, dtype=np.int64)[:, None] * self._slots + slots
        self._flat[index[live]] += steps[live]  # person by person: ascending, cache-friendly

    def add_columns(self, silo: str, table: np.ndarray) -> None:
        """(rows, columns) margin moved by each of `silo`'s columns outside the trees (the DP
        trees' first additive stage, server/gbdt_dp_init.py: coefficient x WoE)."""
        if table.shape != (self.rows, self.widths[silo]):
            raise ValueError(f"silo {silo}'s credits need one column per column of its own")
        view = self._flat.reshape(self.rows, self._slots)
        view[:, self.offsets[silo]:self.offsets[silo] + self.widths[silo]] += table

    def per_silo(self) -> dict[str, np.ndarray]:
        """(rows, columns) credits of each silo."""
        table = self._flat.reshape(self.rows, self._slots)
        return {s: table[:, self.offsets[s]:self.offsets[s] + self.widths[s]]
                for s in self.silos}

    def contributions(self) -> dict[str, np.ndarray]:
        """Per silo, per person: the margin its splits moved (its columns' credits summed)."""
        return {s: c.sum(axis=1) for s, c in self.per_silo().items()}


def _path_steps(tree: gbdt.Tree, values: np.ndarray, heap: np.ndarray,
                offsets: Mapping[str, int]) -> tuple[np.ndarray, np.ndarray]:
    """Every person's path from its leaf up, (rows, levels) each, one column per step up (the
    leaf's step first): the slot (offset of the split's silo + its column) of the parent's
    split, -1 once the person is at the root; and the change of value of that step."""
    slot = np.full(len(values), -1, dtype=np.int64)
    for n, split in tree.splits.items():
        slot[n] = offsets[split.silo] + split.feature
    node = np.asarray(heap, dtype=np.int64)
    slots, steps = [], []
    while (up := node > 0).any():
        parent = np.where(up, (node - 1) // 2, 0)
        slots.append(np.where(up, slot[parent], -1))
        steps.append(np.where(up, values[node] - values[parent], 0.0))
        node = parent
    if not slots:
        return np.zeros((len(node), 0), np.int64), np.zeros((len(node), 0))
    return np.stack(slots, axis=1), np.stack(steps, axis=1)


def _merge_repeats(slots: np.ndarray, steps: np.ndarray) -> None:
    """In place: a person's steps on a column it met at several levels summed into the first
    of them, in the walk's order (as a bincount over the walk adds them), the others' slots
    set to -1. Only the people with a repeated slot are walked."""
    ordered = np.sort(slots, axis=1)
    repeat = np.flatnonzero(((ordered[:, 1:] == ordered[:, :-1])
                             & (ordered[:, 1:] >= 0)).any(axis=1))
    if not len(repeat):
        return
    some, step = slots[repeat].T, steps[repeat].T  # (levels, people with a repeat)
    for i in range(len(some)):
        for j in range(i + 1, len(some)):
            same = (some[j] >= 0) & (some[j] == some[i])
            step[i, same] += step[j, same]
            some[j, same] = -1
    slots[repeat], steps[repeat] = some.T, step.T

def heap_values(tree: gbdt.Tree, values: Mapping[int, float]) -> np.ndarray:
    """A node-value mapping as an array by heap index (0 where no node)."""
    out = np.zeros(max([*tree.leaves, *tree.splits]) + 1)
    out[list(values)] = list(values.values())
    return out


def leaf_array(tree: gbdt.Tree, depth: int) -> np.ndarray:
    """A complete tree's leaf values in heap order (its leaves are 2^depth - 1 ...)."""
    offset = 2**depth - 1
    return np.array([tree.leaves[offset + i] for i in range(offset + 1)])


def released_values(leaf_values: np.ndarray, sums: np.ndarray, params: gbdt_dp.DpTreeParams
                    ) -> np.ndarray:
    """A complete DP tree's node values by heap index from the released model and its released
    leaf sums only ((2, 2^depth): G~, H~). A leaf's is its released value (whatever
    `gbdt.leaf_rule` made of its sums; the Newton step by default); an inner node's the
    Newton step of its leaves' summed G~ and H~ with each leaf's lambda, i.e.
    the mean of its leaves' released values weighted by max(H~, 0) + lambda. (One lambda for
    the summed sums, as a leaf of that node would have had, gave values far beyond the leaves':
    the leaves are shrunk by lambda each, and the summed noise grows with the leaves; on 3,000
    generated people at eps 1 the base points came out near 1,200 and a silo's near -480.)
    A weighted mean stays within the leaves' values, so credits are bounded by the leaves'
    range. Post-processing of the release: nothing here reads a person's g or h."""
    leaves = 2**params.depth
    if sums.shape != (2, leaves):
        raise ValueError(f"need (2, {leaves}) leaf sums, got {sums.shape}")
    value = np.zeros(2 * leaves - 1)
    weight = np.zeros(2 * leaves - 1)
    value[leaves - 1:] = leaf_values
    weight[leaves - 1:] = np.maximum(sums[1], 0.0) + params.lambda_
    for n in range(leaves - 2, -1, -1):
        kids = [2 * n + 1, 2 * n + 2]
        weight[n] = weight[kids].sum()
        value[n] = (weight[kids] @ value[kids] / weight[n] if weight[n] > 0
                    else value[kids].mean())
    return value


def dp_credits(trees: gbdt_dp.DpTrees, params: gbdt_dp.DpTreeParams, leaf: np.ndarray,
               widths: Mapping[str, int]) -> tuple[Credits, float]:
    """The DP trees' credits of every routed person ((trees, rows) leaf 0 .. 2^depth - 1) and
    the bias (noisy prior + every root value), from the released model and sums only."""
    if len(trees.sums) != len(trees.model.trees):
        raise ValueError("the DP trees carry no released leaf sums")
    credits = Credits(widths, leaf.shape[1])
    bias = trees.model.base_margin
    offset = 2**params.depth - 1
    used = trees.leaves(leaf)  # each tree's own structure's leaves (structure reuse)
    for t, (tree, values) in enumerate(zip(trees.model.trees, dp_values(trees, params),
                                           strict=True)):
        bias += float(values[0])
        credits.add(tree, values, offset + used[t].astype(np.int64))
    return credits, bias


def dp_values(trees: gbdt_dp.DpTrees, params: gbdt_dp.DpTreeParams) -> list[np.ndarray]:
    """Every DP tree's node values by heap index (`released_values`)."""
    if len(trees.sums) != len(trees.model.trees):
        raise ValueError("the DP trees carry no released leaf sums")
    return [released_values(leaf_array(tree, params.depth), trees.sums[t], params)
            for t, tree in enumerate(trees.model.trees)]


def explained(credits: Credits, names: Mapping[str, FeatureNames], k: int
              ) -> dict[str, Explained]:
    """Each silo's reason codes as its own answer would carry them: its contribution
    (delta, against the root: reference 0) and the k of its features whose credits raise the
    default logit most, with those credits (clients/silo/explain.py's format)."""
    out = {}
    for silo, table in credits.per_silo().items():
        features = names[silo].features
        to_feature = np.zeros((table.shape[1], len(features)))
        to_feature[np.arange(table.shape[1]), names[silo].columns] = 1.0
        shares = table @ to_feature
        index, value = top_reasons_matrix(-shares, k)
        share = np.where(index >= 0, -np.nan_to_num(value), 0.0)
        out[silo] = Explained(table.sum(axis=1), index.astype(np.int64), share, 0.0,
                              list(features))
    return out


def consent_and_names(silos: ExplainedSilos, reasons: int, required: bool
                      ) -> dict[str, FeatureNames]:
    """The silos' consent before training (none asked for `reasons` = 0). `required`: the run
    configured explain.reasons, so a silo's refusal stops it; otherwise (the trees' default
    ask) a silo declining means no reason codes for anyone: one silo's points would follow
    from the score and the others'."""
    if not reasons:
        return {}
    answers = silos.consent(reasons, required)
    declined = sorted(name for name, names in answers.items() if names is None)
    if declined:
        log.warning("no reason codes: silo(s) %s allow fewer than %d per person (policy "
                    "`explain`); set explain.reasons to what they allow", ", ".join(declined),
                    reasons)
        return {}
    log.info("reason codes: every silo consents to %d per person", reasons)
    return {name: names for name, names in answers.items() if names is not None}


def settle(names: Mapping[str, FeatureNames], credits: Credits, reasons: int
           ) -> dict[str, Explained]:
    """The run's reason codes (none without consent)."""
    return explained(credits, names, reasons) if names and reasons else {}

