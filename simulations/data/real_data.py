"""Real data in place of the generator: split a table (or one CSV per party) into party folders.

`fedscore run --data uci` loads ../shared/data/uci_credit_card.csv (UCI "default of credit card
clients") and splits it into three silos as its README suggests; `--data FILE.csv` does the same
for any copy of that file; `--data DIR` takes one CSV per party plus `mapping.json`:

    {"identifier": "ID",                  // the column every party's CSV has
     "identifier_kind": "plain",          // "plain": compared as text; "phone": E.164-normalised
     "authority": {"file": "authority.csv", "label": "default"},
     "silos": {"payments": {"file": "payments.csv", "columns": ["PAY_0", "PAY_AMT1"]},
               "profile":  {"file": "profile.csv",  "columns": ["AGE"]}}}

The party folders then look like generated ones (features.parquet / labels.parquet, encrypted
with a keystore) plus each party's `schema.json`, and `parties.json` names the silos, so the same
pipeline runs on them, PSI included. There is no truth table, hence no oracle AUC.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from clients.protocol.schema import AUTHORITY, COLUMN_KINDS, ID_KINDS, PARTIES_FILE, SCHEMA_FILE
from crypto.at_rest import Keystore, write_party_file
from crypto.identity import PartyNameError, check_party_name

log = logging.getLogger(__name__)

UCI_NAME = "uci"
MAPPING_FILE = "mapping.json"
SOURCE_FILE = "source.json"


class DataImportError(ValueError):
    """Real data that cannot be imported as it is; nothing was written."""


@dataclass(frozen=True)
class Mapping:
    identifier: str
    identifier_kind: str
    label: str
    silos: dict[str, tuple[str, ...]]
    files: dict[str, Path]  # party -> CSV (one file may serve every party)
    # silo -> {column: kind} for columns not prepared "auto" (COLUMN_KINDS of
    # clients/protocol/schema.py)
    kinds: dict[str, dict[str, str]] = field(default_factory=dict)
    # silo -> {column: declared values} of category columns: declared values cost no privacy
    # (without them a silo picks them by a noisy, thresholded count; clients/silo/data.py)
    categories: dict[str, dict[str, list[float]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.identifier_kind not in ID_KINDS:
            raise DataImportError(f"identifier_kind {self.identifier_kind!r}: choose one of "
                                  f"{', '.join(ID_KINDS)}")
        for silo in self.silos:
            # A silo's name becomes its directory under the parties root: "../../x" must not.
            try:
                check_party_name(silo, "silo")
            except PartyNameError as exc:
                raise DataImportError(f"{MAPPING_FILE}: {exc}") from None
        if len(self.silos) < 2:
            raise DataImportError("name at least two silos in the mapping (vertical FL needs "
                                  "features split across parties)")
        if AUTHORITY in self.silos:
            raise DataImportError(f"{AUTHORITY!r} is the label holder, not a silo; rename it")
        seen: dict[str, str] = {}
        for silo, columns in self.silos.items():
            if not columns:
                raise DataImportError(f"silo {silo!r} has no columns in the mapping")
            for col in columns:
                if col in (self.identifier, self.label):
                    raise DataImportError(f"silo {silo!r} lists {col!r}, which is the "
                                          "identifier or the label; remove it")
                if col in seen:
                    raise DataImportError(f"column {col!r} is mapped to both {seen[col]!r} "
                                          f"and {silo!r}; give each column to one silo")
                seen[col] = silo
        for silo, kinds in self.kinds.items():
            for col, kind in kinds.items():
                if col not in self.silos.get(silo, ()):
                    raise DataImportError(f"silo {silo!r}: kinds names {col!r}, which is not "
                                          "one of its columns")
                if kind not in COLUMN_KINDS:
                    raise DataImportError(f"silo {silo!r}: column {col!r} has kind {kind!r}; "
                                          f"choose one of {', '.join(COLUMN_KINDS)}")


UCI_SILOS = {
    "payments": ("PAY_0", "PAY_2", "PAY_3", "PAY_4", "PAY_5", "PAY_6",
                 "PAY_AMT1", "PAY_AMT2", "PAY_AMT3", "PAY_AMT4", "PAY_AMT5", "PAY_AMT6"),
    "consumption": ("LIMIT_BAL", "BILL_AMT1", "BILL_AMT2", "BILL_AMT3", "BILL_AMT4",
                    "BILL_AMT5", "BILL_AMT6"),
    "profile": ("SEX", "EDUCATION", "MARRIAGE", "AGE"),
}


def uci_default_path() -> Path:
    """../shared/data/uci_credit_card.csv from the project root."""
    return Path(__file__).resolve().parents[3] / "shared" / "data" / "uci_credit_card.csv"


# Repayment status PAY_x is a code (-2 = no consumption, -1 = paid in full, 1..9 = months late),
# not an amount; bills and payments are heavy-tailed and bills can be negative. Measured on
# the central model (3 seeds, test AUC): one-hot PAY_x plus signed-log amounts 0.772
# non-private against 0.764 with everything standardised (bench/RESULTS.md).
UCI_KINDS = {
    "payments": {**dict.fromkeys(UCI_SILOS["payments"][:6], "category"),
                 **dict.fromkeys(UCI_SILOS["payments"][6:], "signed_log")},
    "consumption": dict.fromkeys(UCI_SILOS["consumption"], "signed_log"),
}
# The codes the dataset's documentation declares for PAY_x: public, so they cost no privacy.
UCI_CATEGORIES = {"payments": {col: [float(v) for v in range(-2, 10)]
                               for col in UCI_SILOS["payments"][:6]}}


def uci_mapping(path: Path) -> Mapping:
    parties = (AUTHORITY, *UCI_SILOS)
    return Mapping("ID", "plain", "default.payment.next.month", dict(UCI_SILOS),
                   dict.fromkeys(parties, path), UCI_KINDS, UCI_CATEGORIES)


def resolve_mapping(data: str) -> Mapping:
    """`uci`, a CSV file in the UCI layout, or a directory with mapping.json."""
    if data == UCI_NAME:
        path = uci_default_path()
        if not path.exists():
            raise DataImportError(f"--data uci expects {path}; put ../shared beside the project "
                                  "or pass the CSV's path")
        return uci_mapping(path)
    path = Path(data)
    if path.is_file():
        return uci_mapping(path)
    if path.is_dir():
        return read_mapping(path)
    raise DataImportError(f"--data {data}: no such file or directory (use `uci`, a CSV in the "
                          "UCI layout, or a directory with one CSV per party and mapping.json)")


def read_mapping(directory: Path) -> Mapping:
    path = directory / MAPPING_FILE
    if not path.exists():
        raise DataImportError(f"{directory} has no {MAPPING_FILE}; add one naming each party's "
                              "CSV and columns (see `fedscore run --help`)")
    try:
        raw = json.loads(path.read_text())
        authority = raw["authority"]
        silos = {name: tuple(spec["columns"]) for name, spec in raw["silos"].items()}
        files = {AUTHORITY: directory / authority["file"]}
        files.update({name: directory / spec["file"] for name, spec in raw["silos"].items()})
        kinds = {name: dict(spec.get("kinds", {})) for name, spec in raw["silos"].items()}
        categories = {name: dict(spec.get("categories", {}))
                      for name, spec in raw["silos"].items() if spec.get("categories")}
        return Mapping(raw["identifier"], raw.get("identifier_kind", "plain"),
                       authority["label"], silos, files, kinds, categories)
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise DataImportError(f"{path} is not a valid mapping ({type(exc).__name__}: {exc}); "
                              "it needs identifier, authority.file, authority.label and "
                              "silos.<name>.file / .columns") from None


def _read_csv(path: Path, party: str, mapping: Mapping, needed: tuple[str, ...]) -> pd.DataFrame:
    header = pd.read_csv(path, nrows=0).columns
    missing = [c for c in (mapping.identifier, *needed) if c not in header]
    if missing:
        raise DataImportError(f"party {party!r}: {path.name} lacks column(s) "
                              f"{', '.join(missing)}; fix the CSV or the mapping")
    return pd.read_csv(path, usecols=[mapping.identifier, *needed],
                       dtype={mapping.identifier: "string"})


def _check_label(frame: pd.DataFrame, label: str, path: Path) -> None:
    values = pd.to_numeric(frame[label], errors="coerce")
    bad = int((values.isna() | ~values.isin((0, 1))).sum())
    if bad:
        raise DataImportError(f"{path.name}: label column {label!r} must be 0 or 1 in every row "
                              f"({bad} rows are not); fix or drop them")


def fingerprint(mapping: Mapping) -> dict:
    """What the imported folders were made from: files by content hash, and the mapping."""
    digests = {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
               for p in sorted(set(mapping.files.values()))}
    return {"files": digests, "identifier": mapping.identifier,
            "identifier_kind": mapping.identifier_kind, "label": mapping.label,
            "silos": {k: list(v) for k, v in mapping.silos.items()}, "kinds": mapping.kinds,
            "categories": mapping.categories}


def import_parties(mapping: Mapping, parties_dir: Path, store: Keystore | None = None) -> bool:
    """Write the party folders (or reuse them when made from the same data); returns True on
    reuse. Folders made from other data are never overwritten."""
    for party, path in mapping.files.items():
        if not path.exists():
            raise DataImportError(f"party {party!r}: {path} does not exist; add the file or "
                                  f"fix its name in {MAPPING_FILE}")
    source = fingerprint(mapping)
    marker = parties_dir / SOURCE_FILE
    if marker.exists():
        if json.loads(marker.read_text()) == source:
            return True
        raise DataImportError(f"{parties_dir} holds parties imported from other data; choose "
                              "another --parties directory")
    if parties_dir.exists() and any(parties_dir.iterdir()):
        raise DataImportError(f"{parties_dir} is not empty; choose another --parties directory")
    frames = {AUTHORITY: _read_csv(mapping.files[AUTHORITY], AUTHORITY, mapping,
                                   (mapping.label,))}
    _check_label(frames[AUTHORITY], mapping.label, mapping.files[AUTHORITY])
    for silo, columns in mapping.silos.items():
        frames[silo] = _read_csv(mapping.files[silo], silo, mapping, columns)
        text = [c for c in columns if not pd.api.types.is_numeric_dtype(frames[silo][c])]
        if text:
            raise DataImportError(f"party {silo!r}: column(s) {', '.join(text)} are not numeric; "
                                  "convert them to numbers, leaving unknown values empty")
    for party, frame in frames.items():
        _write_party(parties_dir / party, party, frame, mapping, store)
    (parties_dir / PARTIES_FILE).write_text(json.dumps({"silos": list(mapping.silos)}) + "\n")
    marker.write_text(json.dumps(source, indent=2) + "\n")
    log.info("imported %d parties into %s", len(frames), parties_dir)
    return False


def _write_party(directory: Path, party: str, frame: pd.DataFrame, mapping: Mapping,
                 store: Keystore | None) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    schema: dict = {"id_column": mapping.identifier, "id_kind": mapping.identifier_kind}
    if party == AUTHORITY:
        schema["label_column"] = mapping.label
        # No account-status columns: the opening conditions that need them are switched off
        # when the labels are loaded (server/labels.py), with a log line saying so.
        schema["eligibility_columns"] = []
        name = "labels.parquet"
    else:
        schema["features"] = list(mapping.silos[party])
        if mapping.kinds.get(party):
            schema["kinds"] = mapping.kinds[party]
        if mapping.categories.get(party):
            schema["categories"] = mapping.categories[party]
        name = "features.parquet"
        frame = frame.astype(dict.fromkeys(mapping.silos[party], np.float64))
    (directory / SCHEMA_FILE).write_text(json.dumps(schema, indent=2) + "\n")
    buf = frame.to_parquet(index=False)
    write_party_file(directory / name, party, buf, store)
