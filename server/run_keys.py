"""The keys that address a run's secret draws (crypto/secret_random.py): the authority's secret,
the run key (every setting that changes what is computed) and the people key (who is in
training, validation and test). Keys, not secrets: they never let anyone without the secret
replay a draw."""

from __future__ import annotations

import json
import math
from pathlib import Path

from clients.protocol.schema import AUTHORITY
from crypto.at_rest import Keystore
from crypto.secret_random import SecretRandom
from server import config_scorecard


def authority_random(store: Keystore | None, data_dir: Path) -> SecretRandom:
    """The authority's secret streams: its secret lives in its keystore (or, without one, in its
    own party directory), 0600, never in config, messages or outputs."""
    return SecretRandom.load_or_create(store.path if store else data_dir / AUTHORITY, AUTHORITY)


# Settings that do not change what a run computes, left out of its run key.
NOT_COMPUTED_PREFIXES = ("storage.",)
NOT_COMPUTED_KEYS = frozenset({"privacy.guardrails"})
# A tune's selection score (privacy.selection_noise) changes the calibration's noise; left out
# of the key when unset, so every other run keeps the key it had before the setting existed.
SELECTION_KEY = "privacy.selection_noise"
# Keeping the best-validation epoch (the default) is what every run without the key did since
# issue 20 item 5; only turning it off in a non-private MLP run changes what is computed.
KEEP_BEST_KEY = "train.keep_best"
# The trees' settings change nothing an MLP run computes: left out of an MLP run's key, so a
# default run keeps the key (and every secret draw) it had before model.kind existed.
TREE_KEYS = ("model.kind", "gbdt.")
# Likewise the DP trees' own settings in a tree run without DP (privacy.epsilon=inf): such a
# run keeps the key it had before the DP trees were wired.
DP_TREE_KEYS = frozenset({"gbdt.sample_rate", "gbdt.batch", "gbdt.hessian_noise",
                          "gbdt.max_leaf"})
# The guided DP trees' settings (server/gbdt_dp_guide.py) change nothing unless
# gbdt.guide_every > 0: left out otherwise, so every other run keeps the key it had before.
GUIDE_PREFIX = "gbdt.guide_"
# The DP trees' post-processing (server/gbdt_dp_post.py) changes nothing at its old
# defaults (leaf_rule newton, no reuse): its keys are left out then, so such a run keeps the
# key it had before they existed; otherwise all of them enter (with DP only).
POST_KEYS = frozenset({"gbdt.leaf_rule", "gbdt.hs_kappa", "gbdt.eb_decay", "gbdt.reuse"})
# The DP trees' first additive stage (server/gbdt_dp_init.py): its keys enter only when it
# runs (gbdt.init other than none, with DP), so every other run keeps its key.
INIT_KEYS = frozenset({"gbdt.init", "gbdt.init_share"})
# The scorecard's settings (server/config_scorecard.py `computed`) enter only in a scorecard
# run, off their defaults and where they apply to its mode: every run keeps the key it had
# before they existed.
SCORECARD_PREFIX = config_scorecard.PREFIX
# Delay compensation applies to `sum` mode without DP-SGD only (server/run_plan.py
# `model_spec`): elsewhere it changes nothing, so a DP or concat run keeps the key it had
# before the setting existed.
COMPENSATION_KEY = "train.delay_compensation"
# And gbdt.binning in a DP tree run (always uniform there): such a run keeps the key it had
# before the SecureBoost trees' quantile bins.
SECUREBOOST_KEYS = frozenset({"gbdt.binning"})
# Since issue 20's MLP defaults, privacy.max_grad_norm bounds a person's whole gradient and each
# of the K blocks clips at it / sqrt(K) (server/privacy.py): a DP-SGD run computes otherwise
# than before with the same settings, so its key says which clip it used (no resume or
# secret draw is shared with a run made before).
CLIP_MARK = {"privacy.clip_split": "joint"}


def computed_settings(config: dict) -> dict:
    """The settings that change what a run computes (see `derive_run_key`)."""
    mlp = config.get("model.kind", "mlp") == "mlp"
    dp = math.isfinite(float(config.get("privacy.epsilon", math.inf)))
    compensated = mlp and not dp and config.get("aggregation.mode", "sum") == "sum"
    guided = dp and int(config.get("gbdt.guide_every", 0) or 0) > 0
    posted = dp and (config.get("gbdt.leaf_rule", "newton") != "newton"
                     or float(config.get("gbdt.reuse", 0) or 0) > 0)
    staged = dp and config.get("gbdt.init", "none") != "none"
    mark = CLIP_MARK if mlp and dp and config.get("topology", "vertical") == "vertical" else {}
    card = config_scorecard.computed(config)
    return mark | card | {k: v for k, v in config.items()
            if not k.startswith(SCORECARD_PREFIX)
            and (guided or not k.startswith(GUIDE_PREFIX)) and (posted or k not in POST_KEYS)
            and (staged or k not in INIT_KEYS)
            and not k.startswith(NOT_COMPUTED_PREFIXES) and k not in NOT_COMPUTED_KEYS
            and not (mlp and k.startswith(TREE_KEYS)) and (dp or k not in DP_TREE_KEYS)
            and not (dp and k in SECUREBOOST_KEYS)
            and (compensated or k != COMPENSATION_KEY)
            and not (k == SELECTION_KEY and not float(v))
            and not (k == KEEP_BEST_KEY and (v in (True, "true") or dp or not mlp))}


def derive_run_key(random: SecretRandom, config: dict) -> str:
    """The run's public key, derived from the authority's secret and the configuration: the
    same keystore and config give the same run (bit for bit), other keystores other runs.
    Where the keystore sits (storage.*) says where files live, not what is computed: a keystore
    moved or copied to another machine still reproduces its runs. Nor does
    privacy.guardrails (whether a configuration that cannot learn is refused or only warned
    about) change what a run computes, nor, in an MLP run, the trees' settings."""
    computed = computed_settings(config)
    return random.key("run-key", json.dumps(computed, sort_keys=True))[:8].hex()


# What chooses which people a run trains, calibrates and tests on (with the aligned data).
PEOPLE_KEYS = ("seed", "split.train", "split.val")


def derive_people_key(random: SecretRandom, config: dict) -> str:
    """The key of the draws that say who is where: the shared order and the split. From the
    authority's secret, so the silos cannot predict them, but from only the seed and the split's
    shares, not the whole configuration: two runs on the same data and seed that differ in
    training or privacy settings test on the same people, so a sweep's differences between them
    are paired on the test set too, and their oracle is the same."""
    chosen = {k: config[k] for k in PEOPLE_KEYS}
    return random.key("people-key", json.dumps(chosen, sort_keys=True))[:8].hex()
