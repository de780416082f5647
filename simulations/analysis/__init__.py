"""What a run is measured against: central baselines, membership and canary audits, the red
team's attacks, score curves and the independent ledger check. Reads data/, never runs."""
