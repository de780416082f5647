"""Reason codes: which of a person's features cost the most points, and what to do about them.

Why on the silo side: in `sum` mode the authority computes z = b + sum_k g_k(x_k) and never
sees a silo's features, so only the silo can say which of its features moved g_k. Each silo
attributes its own contribution against its typical person (the column-wise median of its
model inputs) and sends points, never features; the authority merges the silos' points.

From logit to points. The score is offset - factor * (a * z + b') with factor = PDO / ln 2 and
(a, b') the authority's Platt calibration (server/scoring.py), so silo k moves a person's score
by -factor * a * (g_k(x) - g_k(reference)) points against its typical person, exactly: the
unrounded, unclipped score is the score of a person typical in every silo plus the sum of the
silos' points. (The published score is rounded and clipped to 300..850, so the identity holds
before that step.) `a` comes from the authority; with a = 1 the points are in uncalibrated units.

Within a silo, `feature_attributions` splits g_k(x) - g_k(reference) over the features:
- "path" (default): walk from the reference to x one feature at a time and credit each feature
  with the change of g as it switches; do it in schema order and in reverse order and average.
  Each walk telescopes, so the attributions add up to g(x) - g(reference) exactly (up to float
  rounding). One walk alone ("sequential") is exact too but order-dependent: an interaction goes
  wholly to whichever feature switches last. Averaging the two orders splits every pairwise
  interaction equally, which makes "path" equal to the baseline Shapley value for any g with at
  most pairwise interactions (a test checks this against brute force); only interactions of
  three or more features are split unevenly. Cost: 2 (F + 1) evaluations of g per person for F
  features, against 2^F for exact Shapley (10,000 people x 10 features through a 32-16 MLP in
  numpy: about 0.2 s).
- "marginal": g(x) - g(x with feature j set to the reference), one feature at a time. Intuitive
  ("what if this one field were typical?") but does not add up when features interact.
For a linear g every method gives w_j * (x_j - ref_j).

Everything is vectorised over people: the substituted matrices are built in blocks of rows and g
is called once per block, never per person. No torch at module level: a silo passes its bottom
model wrapped as a numpy callable.

In the protocol (clients/protocol/): the silo attributes and ranks its features with it
(clients/silo/explain.py), the authority merges the silos' points with the same ranking
(server/explanations.py), and the texts people read are the same on every side.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, TypeVar

import numpy as np
import numpy.typing as npt

from clients.protocol.schema import SILO_FEATURES

log = logging.getLogger(__name__)

Model = Callable[[np.ndarray], npt.ArrayLike]  # (m, d) inputs -> (m,) logit contributions
Method = Literal["path", "sequential", "marginal"]
K = TypeVar("K", bound=Hashable)

MAX_REASONS = 4
# Elements (rows x columns) of one substituted block handed to the model: 4M float64 = 32 MB.
BLOCK_ELEMENTS = 1 << 22


class ReasonError(ValueError):
    """Inputs the attribution cannot use: the message names the problem and the fix."""


# ---- the catalogue ----------------------------------------------------------------------------

@dataclass(frozen=True)
class ReasonText:
    """What a feature is called when it lowers a score, and what the person can do about it."""

    label_en: str
    label_zh: str
    tip_en: str
    tip_zh: str


def _t(label_en: str, label_zh: str, tip_en: str, tip_zh: str) -> ReasonText:
    return ReasonText(label_en, label_zh, tip_en, tip_zh)


# In the seeds' spirit ("how to raise your score"): each tip is something the person can do.
CATALOGUE: dict[str, dict[str, ReasonText]] = {
    "payments": {
        "on_time_repayment_rate": _t(
            "Low on-time repayment rate", "按时还款率偏低",
            "Repay every instalment in full and on time; automatic repayment helps.",
            "每期按时足额还款,可开通自动还款避免遗忘。"),
        "overdue_count": _t(
            "Overdue repayments", "存在逾期记录",
            "Clear overdue amounts now and avoid new late payments; an overdue record stays "
            "for 12 months.",
            "尽快结清逾期欠款,避免再次逾期;违约记录会保留12个月。"),
        "overdue_max_days": _t(
            "Long overdue spell", "逾期时间较长",
            "When a payment is late, settle it as soon as possible: the longer it stays "
            "overdue, the more it costs.",
            "一旦逾期请尽快还清,逾期时间越长,对信用分的影响越大。"),
        "balance": _t(
            "Low account balance", "账户余额偏低",
            "Keep a steady balance in your wallet instead of emptying it every month.",
            "保持零钱账户有一定余额留存,避免频繁清零。"),
        "spend_level": _t(
            "Little everyday spending through the wallet", "日常消费较少",
            "Use the wallet for everyday payments in different scenarios (dining, shopping, "
            "transport), within your means.",
            "在餐饮、购物、出行等多种场景使用微信支付,量入为出。"),
        "spend_stability": _t(
            "Unstable monthly spending", "消费波动较大",
            "Keep monthly spending steady (within about 20 % from month to month); avoid "
            "sudden large purchases.",
            "保持每月消费稳定(波动在20%以内),避免短时间内突击大额消费。"),
        "wealth_holdings": _t(
            "Little savings or wealth management", "理财储蓄较少",
            "Build savings steadily, e.g. a fixed monthly amount into a money-market fund, "
            "and hold it.",
            "稳健理财,如每月定期定额投入货币基金并长期持有。"),
        "bill_payments": _t(
            "Few bills paid", "生活缴费较少",
            "Pay utility and phone bills through the wallet, on time.",
            "通过微信按时缴纳水电燃气费、话费等生活费用。"),
        "high_risk_merchant_share": _t(
            "Spending at high-risk merchants", "在高风险商户消费",
            "Stop paying at high-risk merchants (gambling- or fraud-related).",
            "不在涉赌、涉诈等高风险商户消费。"),
        "complaints": _t(
            "Complaints against you", "存在被投诉记录",
            "Settle disputes with merchants and counterparties promptly and keep your "
            "agreements.",
            "及时处理交易纠纷与投诉,诚信履约。"),
    },
    "social": {
        "interaction_freq": _t(
            "Little interaction with contacts", "好友互动较少",
            "Keep in regular contact with friends and family.",
            "与亲友保持正常、稳定的日常互动。"),
        "red_packet_exchange": _t(
            "Few red-packet exchanges", "红包往来较少",
            "Exchange red packets with family and friends on normal occasions, in moderate "
            "amounts.",
            "节假日等场合与亲友正常红包往来,金额适中。"),
        "group_activity": _t(
            "Low group activity", "群组活跃度低",
            "Take part in the legitimate groups you have joined.",
            "积极参与正规群组的讨论,分享正能量内容。"),
        "contacts_avg_standing": _t(
            "Contacts' average standing", "好友平均信用水平",
            "This reflects your contacts rather than you and weighs less than your own "
            "record: repaying on time helps most.",
            "该项反映好友的平均信用水平,影响小于您自身的履约记录:按时还款最有帮助。"),
        "mini_program_use": _t(
            "Little use of mini-programs and services", "小程序与公众号使用较少",
            "Use mini-programs and official-account services for everyday needs.",
            "日常多使用小程序、公众号等服务。"),
        "donations": _t(
            "No charitable giving", "公益参与较少",
            "Small regular donations through the charity module count, e.g. monthly.",
            "可通过公益平台定期小额捐款。"),
        "violation_reports": _t(
            "Violation reports against you", "存在违规举报记录",
            "Follow the platform rules: do not post illegal, misleading or harmful content.",
            "遵守平台规则,不发布违法违规、谣言等不良信息。"),
    },
    "device": {
        "common_device_share": _t(
            "Many logins from unusual devices", "常用设备登录占比低",
            "Log in mainly from your own usual device (more than 80 % of logins).",
            "尽量使用本人常用设备登录(常用设备占比80%以上)。"),
        "devices_90d": _t(
            "Many devices in use", "近90天使用设备较多",
            "Use few devices for your account and remove those you no longer use.",
            "减少登录设备数量,及时移除不再使用的设备。"),
        "abnormal_location_logins": _t(
            "Logins from unusual locations", "存在异地异常登录",
            "Avoid logins from unusual places and sensitive operations on public Wi-Fi; "
            "confirm new logins with a second check.",
            "避免异地登录和在公共Wi-Fi下进行敏感操作,异地登录请完成二次验证。"),
        "rebinding_count": _t(
            "Frequent phone or card rebinding", "频繁换绑手机或银行卡",
            "Stop rebinding your phone number or bank card frequently: more than 3 changes "
            "in 3 to 6 months is flagged.",
            "避免频繁更换绑定的手机号、银行卡:3-6个月内超过3次会引发风控。"),
        "two_factor_on": _t(
            "Two-factor authentication off", "未开启双重验证",
            "Turn on two-factor authentication (a verification code sent to your phone).",
            "开启双重验证(绑定手机动态验证码)。"),
        "password_age_days": _t(
            "Password not changed for a long time", "密码长期未更换",
            "Change your password every 3 to 6 months and make it strong (letters, digits "
            "and symbols, more than 8 characters).",
            "每3-6个月更换一次密码,使用字母、数字、符号组合且长度超过8位的复杂密码。"),
        "location_stability": _t(
            "Unstable location pattern", "生活轨迹不稳定",
            "Keep a stable pattern of usual places (home, work); frequent jumps look like a "
            "shared or stolen account.",
            "保持稳定的常驻地与生活轨迹(如住所、工作地)。"),
    },
}


def generic_text(feature: str) -> ReasonText:
    """For a feature the catalogue does not know (real data with its own schema)."""
    return ReasonText(
        feature, feature,
        "This field lowered the score against the typical person; if the record is wrong, "
        "file a dispute to have it corrected.",
        "该项低于典型用户水平;如记录有误,可提起申诉要求更正。")


def reason_text(silo: str, feature: str) -> ReasonText:
    """The catalogue's entry, or a generic one for features outside the generated schema."""
    return CATALOGUE.get(silo, {}).get(feature) or generic_text(feature)


def missing_from_catalogue() -> list[tuple[str, str]]:
    """(silo, feature) pairs of the schema without a catalogue entry; empty when in sync."""
    return [(silo, f.name) for silo, feats in SILO_FEATURES.items() for f in feats
            if f.name not in CATALOGUE.get(silo, {})]


# ---- attributions -----------------------------------------------------------------------------

def feature_groups(columns: Sequence[str], features: Sequence[str]) -> list[np.ndarray]:
    """Model-input column indices of each feature, in `features` order.

    A silo's matrix (clients/silo/data.py) has one column per numeric feature, plus
    `<feature>__missing` indicators and `<feature>=<value>` one-hot columns; a feature's
    columns switch together, so "balance" and "balance__missing" are attributed as one."""
    owner: list[int] = []
    for col in columns:
        hits = [i for i, f in enumerate(features)
                if col == f or col.startswith(f + "__") or col.startswith(f + "=")]
        if len(hits) != 1:
            what = "no feature" if not hits else "several features"
            raise ReasonError(f"model input column {col!r} belongs to {what} of "
                              f"{', '.join(features)}; pass the silo's own feature list")
        owner.append(hits[0])
    groups = [np.flatnonzero(np.asarray(owner) == i) for i in range(len(features))]
    empty = [f for f, g in zip(features, groups, strict=True) if g.size == 0]
    if empty:
        raise ReasonError(f"feature(s) {', '.join(empty)} have no model input column; pass the "
                          "columns of the matrix the model was trained on")
    return groups


def median_reference(x: npt.ArrayLike) -> np.ndarray:
    """The silo's typical person: the median of each model-input column.

    For standardised numeric columns this is the median person column by column; missing
    indicators come out 0 (most people are present). A one-hot group gets its majority value
    when one category holds more than half the people, else all zeros."""
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] == 0:
        raise ReasonError(f"need a non-empty (people, inputs) matrix, got shape {arr.shape}")
    return np.median(arr, axis=0)


def _check_groups(groups: Sequence[npt.ArrayLike] | None, d: int) -> list[np.ndarray]:
    if groups is None:
        return [np.array([j]) for j in range(d)]
    out = [np.asarray(g, dtype=np.int64).ravel() for g in groups]
    if not out:
        raise ReasonError("groups is empty; pass one index array per feature, or None")
    counts = np.bincount(np.concatenate(out), minlength=d) if d else np.zeros(0, int)
    if len(counts) != d or (counts != 1).any() or any(g.size == 0 for g in out):
        raise ReasonError(f"groups must split the {d} input columns into non-empty, disjoint "
                          "sets that cover every column; build them with feature_groups()")
    return out


def _evaluate(f: Model, states: np.ndarray) -> np.ndarray:
    m = states.shape[0]
    out = np.asarray(f(states), dtype=np.float64)
    if out.shape not in ((m,), (m, 1)):
        raise ReasonError(f"the model returned shape {out.shape} for {m} rows; it must return "
                          "one logit contribution per row, shape (m,) or (m, 1)")
    return out.reshape(m)


def feature_attributions(f: Model, x: npt.ArrayLike, reference: npt.ArrayLike,
                         groups: Sequence[npt.ArrayLike] | None = None,
                         method: Method = "path", order: Sequence[int] | None = None,
                         block_elements: int = BLOCK_ELEMENTS) -> np.ndarray:
    """Per-person, per-feature shares of f(x) - f(reference), shape (people, features).

    `f` maps an (m, d) array to m logit contributions; `x` is (n, d); `reference` is (d,) (the
    typical person) or (n, d). `groups` (see `feature_groups`) makes each feature a set of
    columns; None means one column per feature. `order` (feature indices) fixes the walk of
    "sequential" (default: schema order). See the module docstring for the methods."""
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ReasonError(f"x: need a non-empty (people, inputs) matrix, got shape {x.shape}")
    n, d = x.shape
    ref = np.asarray(reference)
    if ref.shape not in ((d,), (n, d)):
        raise ReasonError(f"reference: shape {ref.shape} fits neither ({d},) nor ({n}, {d}); "
                          "pass the typical person (median_reference) or one row per person")
    dtype = np.result_type(x.dtype, ref.dtype, np.float32)
    if not (np.isfinite(x).all() and np.isfinite(ref).all()):
        raise ReasonError("x or reference hold NaN or infinite values; attribute the prepared "
                          "(imputed) model inputs, not the raw table")
    gs = _check_groups(groups, d)
    G = len(gs)
    col_group = np.empty(d, dtype=np.int64)
    for g, idx in enumerate(gs):
        col_group[idx] = g
    if method in ("path", "sequential"):
        first = np.arange(G) if order is None else np.asarray(order, dtype=np.int64)
        if sorted(first.tolist()) != list(range(G)):
            raise ReasonError(f"order must be a permutation of 0..{G - 1}")
        orders = [first] if method == "sequential" else [first, first[::-1]]
        # masks[s, c]: column c holds x's value in state s (its feature switched in s steps).
        masks = []
        for o in orders:
            rank = np.empty(G, dtype=np.int64)
            rank[o] = np.arange(G)
            masks.append(rank[col_group][None, :] < np.arange(G + 1)[:, None])
        mask = np.concatenate(masks)  # (len(orders) * (G + 1), d)
    elif method == "marginal":
        # state 0: x; state j + 1: x with feature j set to the reference.
        mask = np.vstack([np.ones((1, d), bool), col_group[None, :] != np.arange(G)[:, None]])
    else:
        raise ReasonError(f"method={method!r}: choose 'path', 'sequential' or 'marginal'")
    if block_elements < 1:
        raise ReasonError("block_elements must be >= 1")
    S = mask.shape[0]
    rows = max(1, block_elements // (S * max(d, 1)))
    out = np.empty((n, G))
    for lo in range(0, n, rows):
        hi = min(n, lo + rows)
        xb = x[lo:hi].astype(dtype, copy=False)
        rb = (ref if ref.ndim == 1 else ref[lo:hi]).astype(dtype, copy=False)
        rb = np.broadcast_to(rb, xb.shape)
        states = np.where(mask[None, :, :], xb[:, None, :], rb[:, None, :])
        vals = _evaluate(f, states.reshape(-1, d)).reshape(hi - lo, S)
        if method == "marginal":
            out[lo:hi] = vals[:, :1] - vals[:, 1:]
            continue
        acc = np.zeros((hi - lo, G))
        for i, o in enumerate(orders):
            steps = np.diff(vals[:, i * (G + 1) : (i + 1) * (G + 1)], axis=1)
            acc[:, o] += steps
        out[lo:hi] = acc / len(orders)
    log.debug("attributed %d people over %d features (%s, %d states each)", n, G, method, S)
    return out


# ---- points -----------------------------------------------------------------------------------

def score_factor(pdo: float = 50.0) -> float:
    """Points per unit of log-odds: PDO / ln 2 (server/scoring.py's factor)."""
    if not pdo > 0:
        raise ReasonError(f"pdo={pdo!r}: points to double the odds must be > 0")
    return pdo / math.log(2.0)


def points_from_logit(delta_logit: npt.ArrayLike, factor: float, slope: float = 1.0
                      ) -> np.ndarray:
    """Score points of a change in default logit: more risk, fewer points.

    `slope` is the authority's Platt slope `a` (score = offset - factor * (a z + b'))."""
    return -factor * slope * np.asarray(delta_logit, dtype=np.float64)


def points_vs_reference(contrib_person: npt.ArrayLike, contrib_reference: npt.ArrayLike,
                        factor: float, slope: float = 1.0) -> np.ndarray:
    """A silo's points for each person against its typical person (negative: points lost)."""
    person = np.asarray(contrib_person, dtype=np.float64)
    return points_from_logit(person - np.asarray(contrib_reference, dtype=np.float64),
                             factor, slope)


def attribution_points(f: Model, x: npt.ArrayLike, reference: npt.ArrayLike, factor: float,
                       slope: float = 1.0, groups: Sequence[npt.ArrayLike] | None = None,
                       method: Method = "path") -> np.ndarray:
    """Per-person, per-feature points; with "path" or "sequential" each row adds up to the
    silo's `points_vs_reference`."""
    return points_from_logit(feature_attributions(f, x, reference, groups, method), factor,
                             slope)


# ---- the top reasons ---------------------------------------------------------------------------

def _check_k(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ReasonError(f"k={k!r}: must be an integer >= 1 (the issue asks for up to 4)")


def top_reasons(points_by_feature: Mapping[K, float], k: int = MAX_REASONS,
                min_loss: float = 0.0) -> list[tuple[K, float]]:
    """Up to `k` (key, points) that lower the score most, most negative first.

    Only losses count: points >= -min_loss (gains, zero, tiny losses) are skipped. Ties keep the
    mapping's order. Keys can be feature names or (silo, feature) pairs when merging silos."""
    _check_k(k)
    items = list(points_by_feature.items())
    if any(math.isnan(p) for _, p in items):
        raise ReasonError("points hold NaN; attribute prepared, finite inputs")
    losses = [(i, key, float(p)) for i, (key, p) in enumerate(items) if p < -min_loss]
    losses.sort(key=lambda t: (t[2], t[0]))
    return [(key, p) for _, key, p in losses[:k]]


def top_reasons_matrix(points: npt.ArrayLike, k: int = MAX_REASONS, min_loss: float = 0.0
                       ) -> tuple[np.ndarray, np.ndarray]:
    """`top_reasons` for every person at once: (feature index, points), each (people, k).

    Slots without a loss hold index -1 and points NaN. Vectorised: one stable argsort."""
    _check_k(k)
    p = np.asarray(points, dtype=np.float64)
    if p.ndim != 2:
        raise ReasonError(f"points: need a (people, features) matrix, got shape {p.shape}")
    if np.isnan(p).any():
        raise ReasonError("points hold NaN; attribute prepared, finite inputs")
    kk = min(k, p.shape[1])
    idx = np.argsort(p, axis=1, kind="stable")[:, :kk]
    val = np.take_along_axis(p, idx, axis=1)
    keep = val < -min_loss
    idx = np.where(keep, idx, -1)
    val = np.where(keep, val, np.nan)
    if kk < k:  # fewer features than slots
        pad = k - kk
        idx = np.hstack([idx, np.full((len(p), pad), -1)])
        val = np.hstack([val, np.full((len(p), pad), np.nan)])
    return idx, val


@dataclass(frozen=True)
class ReasonCode:
    silo: str
    feature: str
    points: float  # negative: points lost against the silo's typical person
    label_en: str
    label_zh: str
    tip_en: str
    tip_zh: str


def reason_codes(points: Mapping[tuple[str, str], float], k: int = MAX_REASONS,
                 min_loss: float = 0.0) -> list[ReasonCode]:
    """One person's reason codes from every silo's per-feature points, keyed (silo, feature)."""
    out = []
    for (silo, feature), p in top_reasons(points, k, min_loss):
        text = reason_text(silo, feature)
        out.append(ReasonCode(silo, feature, p, text.label_en, text.label_zh, text.tip_en,
                              text.tip_zh))
    return out
