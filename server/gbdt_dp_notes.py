"""What authority.json says of a tree run: the DP trees' mode, privacy note and what the
authority sees (here), the SecureBoost trees' by server/gbdt_run.py `annotate`."""

from __future__ import annotations

from clients.protocol.gbdt import DP_UNITS
from server import gbdt_dp_init, gbdt_run
from server.config import AuthorityConfig
from server.gbdt_dp_run import dp_trees


def annotate(out: dict, cfg: AuthorityConfig) -> None:
    """authority.json for a tree run: the DP trees' here, the SecureBoost trees' by
    server/gbdt_run.py `annotate` (which leaves an MLP run alone)."""
    if not dp_trees(cfg):
        gbdt_run.annotate(out, cfg)
        return
    g, eps = cfg.gbdt, (out.get("epsilon") or {}).get("model")
    out["model"] = {**out["model"], "kind": "gbdt"}
    out["model_kind"] = "gbdt"
    out["gbdt"] = {
        **{k: getattr(g, k) for k in ("trees", "depth", "bins", "lr", "reg_lambda",
                                      "sample_rate", "batch", "hessian_noise", "max_leaf",
                                      "guide_every", "guide_sigma", "guide_beta",
                                      "guide_mix", "guide_stat", "guide_bins",
                                      "guide_share", "leaf_rule", "hs_kappa", "eb_decay",
                                      "reuse", "init", "init_share")},
        "mode": ("dp trees guided by noisy split histograms (server/gbdt_dp_guide.py)"
                 if g.guide_every else
                 "a DP WoE scorecard stage, then dp random trees boosted on its margin "
                 "(server/gbdt_dp_init.py)" if g.init != "none"
                 else "dp random trees (server/gbdt_dp.py)"),
        "input_scale": DP_UNITS,
        "model_epsilon": eps,
        "model_note": (f"the trees (structure, noisy leaf values, noisy prior) and the scores "
                       f"are ({eps:.4g}, {out.get('delta', 0):.3g})-DP for the combined model "
                       "(training people: the silos' statistics, "
                       + ("the first stage's counts and Newton steps, and the leaves; "
                          if g.init != "none" else "prior and leaves; ") +
                       "validation people: the statistics and the DP calibration)"
                       if eps is not None else "no epsilon recorded"),
        "label_protection": ("not needed: the silos receive only the training positions and "
                             "their own (column, bin) pairs, drawn from the authority's "
                             "secret stream before any data is read; privacy.label_epsilon "
                             "is not spent (no randomised response is drawn)"),
        "reasons": gbdt_run.REASONS_NOTE + (
            "; node values from the released noisy leaf sums only (an inner node's: the "
            "Newton step of its leaves' summed G~ and H~ with each leaf's lambda, i.e. the "
            "mean of its leaves' released values weighted by max(H~, 0) + lambda), so each "
            "person's reasons and points are "
            "post-processing of the DP model and their own leaves: no privacy budget. "
            "`contributions` stays empty: a summary over people would be a statistic outside "
            "the accountant"),
    }
    out["authority_sees"] = [
        "every aligned person's left/right bit at each split of every tree (one routing "
        "request per silo), hence every person's leaf in every tree",
        "each split's (silo, feature index, bin), drawn by the authority itself; never the "
        "silo's threshold",
    ] if not g.guide_every else [
        "every aligned person's bin on every silo column of the public equal-width grid (one "
        "routing request per silo for all its (column, bin) pairs), hence every person's leaf "
        "in every tree; never a silo's raw value, range or threshold",
        "each split's (silo, feature index, bin), drawn by the authority from its noisy "
        "(accounted) split histograms",
    ]
    if g.init != "none":
        out["authority_sees"].append(
            "the first stage's question: every aligned person's pre-bin of every silo column "
            f"(the bit at every threshold, {gbdt_dp_init.UNITS:g} standard units), as the DP "
            "scorecard's; the stage's tables and coefficients stay with the authority")
    if out["model"].get("reasons"):
        out["authority_sees"].append(gbdt_run.REASONS_SEEN)
