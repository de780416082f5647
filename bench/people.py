"""Issue 7's acceptance figures on a finished run (by default the default run):

1. reason codes: for 1,000 random scored people, base + silo points (+ what the 300..850 limits
   cut off) against the integer score;
2. fixing the first reason raises the score: the feature named first is set to the silo's
   typical value (the median of its table, the reference the points are measured against) with
   the silo's own model and preparation, and the person's score is recomputed;
3. single-person scoring through the federation: p50 of `query.score` round trips (served);
4. disputes: wall time of `fedscore dispute` from the shell, through `fedscore serve` and
   without it (each opening the engine);
5. a tampered audit log fails, and no phone number (nor an unkeyed hash) is in the run dir.

Experiment-layer code: it reads the silos' tables and checkpoints directly (it is the
simulation, holding every key), as no party could.

    .venv/bin/python bench/people.py RUN_DIR [--people 1000] [--disputes 10] [--cold 3]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from clients.protocol.tables import read_table
from clients.silo.data import find_table, load_silo
from crypto.at_rest import Keystore, read_encrypted, read_party_file
from crypto.identity import keyed_refs, load_or_create_pepper
from server.audit_log import AuditLog
from server.scores_file import read_scores
from server.scoring import SCORE_MAX, SCORE_MIN, scale
from simulations.service.session import open_finished

CLI = [sys.executable, "-m", "simulations.cli"]


def silo_model(parties: Path, silo: str, store: Keystore, run_key: str, round_: int):
    from clients.protocol.model import ModelSpec
    from clients.silo.trainer import SiloTrainer
    from crypto.secret_random import SecretRandom

    directory = parties / silo / "checkpoints" / run_key
    model = json.loads((directory / "model.json").read_text())
    name = f"round-{round_}.pt"
    blob = read_encrypted(store, directory / f"{name}.enc",
                          f"fedscore/{run_key}/{silo}/{name}".encode())
    trainer = SiloTrainer(int(model["inputs"]), ModelSpec.from_config(model), int(model["salt"]),
                          random=SecretRandom.load_or_create(store.path, silo), run_key=run_key)
    trainer.load_bytes(blob)
    return trainer


def reason_checks(run_dir: Path, people: int, seed: int) -> dict:
    run = open_finished(run_dir)
    scores = read_scores(run_dir, run.keystore)
    scored = np.flatnonzero((scores["status"] == "scored").to_numpy())
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(scored, size=min(people, len(scored)), replace=False))
    s = scores.iloc[pick]
    silos = [c.removeprefix("points_") for c in s if c.startswith("points_")
             and c not in ("points_base", "points_limit")]
    total = s[["points_base", *[f"points_{k}" for k in silos], "points_limit"]].sum(axis=1)
    gap = (total - s["score"].astype(float)).abs()
    out = {"people": len(pick), "sum_within_1": float((gap <= 1).mean()),
           "max_gap": float(gap.max()), "clipped": int((s["points_limit"] != 0).sum())}

    # Fix the first reason: that feature to the silo's typical (median) value.
    store = run.store
    scorer = run.scorer
    _, factor = scale(run.cfg.authority.score)
    slope = -factor * scorer.calibrate.a
    raw = total - s["points_limit"]  # the unrounded, unclipped score
    new_raw = raw.to_numpy().copy()
    first = s["reason_1"].astype(str).to_numpy()
    has = s["reason_1"].notna().to_numpy()
    # Positions -> each silo's rows, from the silo's own alignment.
    for silo in silos:
        mine = has & np.char.startswith(first.astype(str), f"{silo}.")
        if not mine.any():
            continue
        directory = run.parties / silo / "checkpoints" / scorer.run_key
        pos2row = np.load(io.BytesIO(read_encrypted(
            store, directory / "alignment.npy.enc",
            f"fedscore/{scorer.run_key}/{silo}/alignment.npy".encode())), allow_pickle=False)
        trainer = silo_model(run.parties, silo, store, scorer.run_key, scorer.final_round)
        matrix = load_silo(run.parties / silo, silo, store)
        table = read_table(find_table(run.parties / silo), silo, store)
        rows = pos2row[pick[mine]]
        fields = [f.split(".", 1)[1] for f in first[mine]]
        changed = table.iloc[rows].copy()
        for i, field in enumerate(fields):
            changed.iloc[i, changed.columns.get_loc(field)] = float(np.nanmedian(table[field]))
        before = trainer.contributions(matrix.x[rows]).astype(np.float64)
        after = trainer.contributions(matrix.prep.transform(changed)).astype(np.float64)
        new_raw[mine] += slope * (after - before)
    new_score = np.clip(np.rint(new_raw), SCORE_MIN, SCORE_MAX)
    old = s["score"].astype(float).to_numpy()
    gain = (new_score - old)[has]
    promised = -s["reason_1_points"].to_numpy()[has]
    out.update({
        "with_a_first_reason": int(has.sum()),
        "fix_raises_score": float((gain > 0).mean()),
        "fix_keeps_or_raises": float((gain >= 0).mean()),
        "fix_gain_median": float(np.median(gain)),
        "first_reason_points_median": float(np.median(promised)),
    })
    return out


def phones_of(run_dir: Path, positions: np.ndarray) -> list[str]:
    run = open_finished(run_dir)
    truth = pd.read_parquet(io.BytesIO(read_party_file(
        run.parties / "simulation" / "truth.parquet.enc", "simulation", run.store)))
    pepper = load_or_create_pepper(run.parties / "authority" / "pepper.key")
    refs = pd.Series(truth["phone"].to_numpy(),
                     index=keyed_refs(truth["phone"].to_numpy(), pepper, "sha256"))
    scores = read_scores(run_dir, run.keystore)
    return [str(refs[scores["subject_ref"].iloc[p]]) for p in positions]


def timed(args: list[str], env: dict, phone: str | None = None) -> tuple[float, str]:
    """Seconds and output of one CLI command; a person's phone goes on stdin, never on the
    command line (where `ps` and Ray's job table would show it)."""
    t = time.perf_counter()
    proc = subprocess.run(CLI + args, capture_output=True, text=True, env=env, check=False,
                          input=None if phone is None else phone + "\n")
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    return time.perf_counter() - t, proc.stdout


def dispute_args(run_dir: Path, value: int) -> list[str]:
    return ["dispute", str(run_dir), "--silo", "payments", "--field",
            "overdue_count", "--value", str(value), "--category", "transaction"]


def latency_checks(run_dir: Path, disputes: int, cold: int, seed: int) -> dict:
    env = {**os.environ, "COLUMNS": "200"}
    scores = read_scores(run_dir, open_finished(run_dir).keystore)
    scored = np.flatnonzero((scores["status"] == "scored").to_numpy())
    phones = phones_of(run_dir, np.random.default_rng(seed + 1).choice(scored, 2))
    out: dict = {}
    cold_times = [timed(dispute_args(run_dir, i % 2), env, phones[0])[0] for i in range(cold)]
    out["dispute_cold_s"] = cold_times
    server = subprocess.Popen([*CLI, "serve", str(run_dir)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    t = time.perf_counter()
    try:
        while not (run_dir / "serve.json").exists():
            if server.poll() is not None:
                raise RuntimeError(server.stderr.read()[-2000:])
            time.sleep(0.2)
        out["serve_ready_s"] = time.perf_counter() - t
        warm = [timed(dispute_args(run_dir, i % 2), env, phones[1])[0] for i in range(disputes)]
        out["dispute_served_s"] = warm
        _, text = timed(["score", str(run_dir), "--repeat", "100"], env, phones[1])
        out["score_round_trip"] = text.strip().splitlines()[-1]
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=120)
    return out


def integrity_checks(run_dir: Path, scratch: Path) -> dict:
    run = open_finished(run_dir)
    copy = scratch / "audit.log"
    shutil.copy(run_dir / "audit.log", copy)
    log = AuditLog(copy, run.store, log_name=f"{run.scorer.run_key}/audit")
    ok = bool(log.verify())
    data = bytearray(copy.read_bytes())
    data[len(data) // 2] ^= 0x04
    copy.write_bytes(bytes(data))
    tampered = log.verify()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.conftest import assert_no_identifiers

    assert_no_identifiers(run_dir)
    return {"audit_verifies": ok, "tampered_verifies": bool(tampered),
            "tampered_reason": tampered.reason, "phones_in_run_dir": 0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--people", type=int, default=1000)
    p.add_argument("--disputes", type=int, default=10)
    p.add_argument("--cold", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = p.parse_args()
    run_dir = args.run_dir.resolve()
    figures = {"reasons": reason_checks(run_dir, args.people, args.seed)}
    print(json.dumps(figures, indent=2), flush=True)
    figures["latency"] = latency_checks(run_dir, args.disputes, args.cold, args.seed)
    scratch = Path(os.environ.get("TMPDIR", "/tmp")) / f"people-bench-{os.getpid()}"
    scratch.mkdir(exist_ok=True)
    figures["integrity"] = integrity_checks(run_dir, scratch)
    lat = figures["latency"]
    lat["dispute_served_p50_s"] = float(np.median(lat["dispute_served_s"]))
    lat["dispute_cold_p50_s"] = float(np.median(lat["dispute_cold_s"]))
    text = json.dumps(figures, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
