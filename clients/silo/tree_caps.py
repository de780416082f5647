"""SecureBoost's per-row answers bounded by the run the authority announced (`model.kind=gbdt`
without DP; clients/silo/gbdt_handlers.py calls these).

A partition (`train.gbdt_split`) gives the authority one bit per row: which side of one of this
silo's (column, bin) thresholds each row of a node falls. Unchecked, an authority could ask
for any rows, any number of times: the whole binned matrix, bit by bit. An honest run asks
for what its trees need and no more, so the silo holds it to that:

- `query.gbdt_start` announces the trees and their depth (`trees`, `depth`); the first
  announcement of a run key is pinned in `<silo dir>/checkpoints/<run key>/trees.json`, with
  how many trees and splits were answered, so neither a re-sent start, a re-align nor a
  restart resets them, and a later start announcing other figures is refused;
- a tree's gradients come once, for a tree index above every earlier one and below `trees`;
- a level's sums are asked for the root over every training row, or for a node whose parent
  the silo can place (summed, or the sibling of a summed node: the authority takes the larger
  sibling's sums from the parent's, server/gbdt.py `_level_sums`) and whose rows lie within
  the parent's (are exactly the child's, when this silo partitioned the parent); never below
  `depth`;
- a split is answered for such a node of the current tree only, over exactly that node's rows
  (a summed node's, or the parent's less the summed sibling's), once per node, and at most
  trees x (2^depth - 1) splits in the run.

What is still answered: every node an honest run would split, over its own rows. The rows of
the nodes the silo does not split come from the other silos' partitions, which the authority
relays; a silo cannot check those, only that each child lies within its parent.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np

from clients.node import Node
from clients.protocol import messages as m
from clients.protocol.gbdt import LEVEL, SPLIT, START
from clients.silo.run_checks import RunModeRefusalError
from clients.silo.state import checkpoint_dir
from crypto.private_files import write_atomic

CAPS_FILE = "trees.json"  # in the run's checkpoint directory
KNOWN = "gbdt_known"  # node state: the current tree's nodes this silo can place, rows by node
NODES = "gbdt_nodes"  # node state: the current tree's nodes summed (or their sibling), split
MAX_TREES, MAX_DEPTH = 10_000, 12  # server/config.py GbdtConfig's bounds


@dataclass
class Caps:
    """The announced trees and depth, and what the run has had so far."""

    trees: int
    depth: int
    last_tree: int = -1
    splits: int = 0

    @property
    def inner(self) -> int:
        """Nodes that can be split in one tree (heap 0 .. 2^depth - 2)."""
        return 2**self.depth - 1


def announce(node: Node, run: str, cfg: dict) -> None:
    """`query.gbdt_start` of a SecureBoost run: pin its trees and depth (the first start of
    the run key), or check a repeated start names the same."""
    try:
        trees, depth = m.config_int(cfg, "trees"), m.config_int(cfg, "depth")
    except (KeyError, TypeError, ValueError, m.ProtocolError):
        raise m.ProtocolError(f"{START} of a tree run without DP must announce its trees and "
                              "depth (integers)") from None
    if not (1 <= trees <= MAX_TREES and 1 <= depth <= MAX_DEPTH):
        raise m.ProtocolError(f"trees must lie in [1, {MAX_TREES}], depth in [1, {MAX_DEPTH}]")
    path = checkpoint_dir(node, run) / CAPS_FILE
    if path.exists():
        before = _load(node, run)
        if (before.trees, before.depth) != (trees, depth):
            raise RunModeRefusalError(
                f"run {run} announced {before.trees} trees of depth {before.depth}; it cannot "
                f"announce {trees} of depth {depth} (a run key names one configuration)")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    _save(node, run, Caps(trees, depth))


def check_level(node: Node, run: str, tree: int, new_tree: bool, nodes: np.ndarray,
                groups: list[np.ndarray], rows: int) -> None:
    """A level's sums: for the current tree (a new one when it brings gradients), at nodes
    this silo can place, over rows within each node's parent."""
    caps = _load(node, run)
    if new_tree:
        if not caps.last_tree < tree < caps.trees:
            raise RunModeRefusalError(
                f"gradients for tree {tree}: this run announced {caps.trees} trees and had "
                f"trees up to {caps.last_tree}; each tree comes once, in order")
        caps.last_tree = tree
        _save(node, run, caps)
        node.state[KNOWN] = m.arrays()
        _set_nodes(node, set(), set())
    elif tree != caps.last_tree:
        raise RunModeRefusalError(f"{LEVEL} for tree {tree}; the current tree is "
                                  f"{caps.last_tree}")
    known = _known(node)
    summed, done = _nodes(node)
    for n, group in zip(nodes.tolist(), groups, strict=True):
        if not 0 <= n < caps.inner:
            raise RunModeRefusalError(f"{LEVEL} for node {n}: below the announced depth "
                                      f"{caps.depth}")
        _place(known, n, group, rows)
        summed |= {n, n + 1 if n % 2 else n - 1} if n else {0}
    node.state[KNOWN] = m.arrays(**{str(k): v for k, v in known.items()})
    _set_nodes(node, summed, done)


def check_split(node: Node, run: str, tree: int, nodes: np.ndarray,
                groups: list[np.ndarray], lefts: list[np.ndarray]) -> None:
    """Partitions (`lefts`, computed, not sent yet): of nodes of the current tree this silo
    can place, over exactly their rows, once each, within the run's trees x (2^depth - 1).
    The children of a node this silo partitions are then known to it exactly."""
    caps = _load(node, run)
    if tree != caps.last_tree or KNOWN not in node.state:
        raise RunModeRefusalError(f"{SPLIT} for tree {tree}; the current tree is "
                                  f"{caps.last_tree}")
    known = _known(node)
    summed, done = _nodes(node)
    asked = nodes.tolist()
    if len(set(asked)) != len(asked) or done & set(asked):
        raise RunModeRefusalError(f"{SPLIT}: each node is partitioned once")
    for n, group in zip(asked, groups, strict=True):
        if n not in summed:
            raise RunModeRefusalError(
                f"{SPLIT} for node {n}, whose sums this silo never gave (nor its sibling's)")
        if not np.array_equal(np.sort(group), known[n]):
            raise RunModeRefusalError(f"{SPLIT} for node {n} over other rows than the node's")
    if caps.splits + len(asked) > caps.trees * caps.inner:
        raise RunModeRefusalError(
            f"{SPLIT}: {caps.splits + len(asked)} partitions would exceed the announced "
            f"{caps.trees} trees x {caps.inner} nodes")
    caps.splits += len(asked)
    _save(node, run, caps)
    for n, left in zip(asked, lefts, strict=True):
        rows = known[n]
        known[2 * n + 1], known[2 * n + 2] = rows[left], rows[~left]
    node.state[KNOWN] = m.arrays(**{str(k): v for k, v in known.items()})
    _set_nodes(node, summed, done | set(asked))


def _place(known: dict[int, np.ndarray], n: int, group: np.ndarray, rows: int) -> None:
    """Record node n's rows (and its sibling's, the parent's less these) once checked."""
    group = np.sort(group)
    if n == 0:
        if not np.array_equal(group, np.arange(rows)):
            raise RunModeRefusalError(f"{LEVEL}: the root is every training row")
    else:
        parent = (n - 1) // 2
        if parent not in known:
            raise RunModeRefusalError(
                f"{LEVEL} for node {n}, whose parent this silo cannot place")
        if not np.isin(group, known[parent]).all():
            raise RunModeRefusalError(f"{LEVEL} for node {n} over rows outside its parent")
        sibling = n + 1 if n % 2 else n - 1
        known.setdefault(sibling, np.setdiff1d(known[parent], group))
    if n in known and not np.array_equal(known[n], group):
        raise RunModeRefusalError(f"{LEVEL} for node {n} over other rows than the node's")
    known[n] = group


def _nodes(node: Node) -> tuple[set[int], set[int]]:
    """(nodes summed, or whose sibling was; nodes partitioned) of the current tree."""
    if NODES not in node.state:
        return set(), set()
    record = m.array_record(node.state, NODES)
    return (set(record["summed"].numpy().tolist()), set(record["split"].numpy().tolist()))


def _set_nodes(node: Node, summed: set[int], split: set[int]) -> None:
    node.state[NODES] = m.arrays(summed=np.array(sorted(summed), dtype=np.int64),
                                 split=np.array(sorted(split), dtype=np.int64))


def _known(node: Node) -> dict[int, np.ndarray]:
    if KNOWN not in node.state:
        return {}
    return {int(k): v.numpy() for k, v in m.array_record(node.state, KNOWN).items()}


def _load(node: Node, run: str) -> Caps:
    path = checkpoint_dir(node, run) / CAPS_FILE
    if not path.exists():
        raise RunModeRefusalError(f"run {run} announced no trees (send {START} first)")
    try:
        return Caps(**json.loads(path.read_text()))
    except (ValueError, TypeError) as exc:
        raise RunModeRefusalError(f"{path} is unreadable ({exc}); start a new run") from None


def _save(node: Node, run: str, caps: Caps) -> None:
    write_atomic(checkpoint_dir(node, run) / CAPS_FILE, json.dumps(asdict(caps)), public=True)
