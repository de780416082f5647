"""Real data in place of the generator: split a table (or one table per party) into party
folders.

`fedscore run --data uci` loads ../shared/data/uci_credit_card.csv (UCI "default of credit card
clients") and splits it into three silos as its README suggests; `--data FILE.csv` does the same
for any copy of that file; `--data DIR` takes one CSV or parquet table per party plus
`mapping.json` (format: simulations/data/mapping.py, docs/real-data.md).

The data are inspected first (simulations/data/check.py: every problem at once, nothing written
on any). The party folders then look like generated ones (features.parquet / labels.parquet,
encrypted with a keystore) plus each party's `schema.json`, and `parties.json` names the silos,
so the same pipeline runs on them, PSI included. There is no truth table, hence no oracle AUC.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pandas as pd

from clients.protocol.schema import AUTHORITY, PARTIES_FILE, SCHEMA_FILE
from crypto.at_rest import Keystore, write_party_file
from simulations.data.check import inspect
from simulations.data.mapping import (
    MAPPING_FILE,
    UCI_NAME,
    UCI_SILOS,
    DataImportError,
    Mapping,
    read_mapping,
    resolve_mapping,
    uci_default_path,
    uci_mapping,
)

# What callers used to find here, now in simulations/data/mapping.py.
__all__ = ["MAPPING_FILE", "UCI_NAME", "UCI_SILOS", "DataImportError", "Mapping",
           "fingerprint", "import_parties", "read_mapping", "resolve_mapping",
           "uci_default_path", "uci_mapping"]

log = logging.getLogger(__name__)

SOURCE_FILE = "source.json"


def fingerprint(mapping: Mapping) -> dict:
    """What the imported folders were made from: files by content hash, and the mapping."""
    digests = {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
               for p in sorted(set(mapping.files.values()))}
    source: dict[str, object] = {"files": digests, "identifier": mapping.identifier,
              "identifier_kind": mapping.identifier_kind, "label": mapping.label,
              "silos": {k: list(v) for k, v in mapping.silos.items()}, "kinds": mapping.kinds,
              "categories": mapping.categories}
    # Added only when set, so folders imported before these options existed are still reused.
    optional: dict[str, object] = {
        "identifiers": mapping.identifiers, "label_positive": mapping.label_positive,
        "fold_case": mapping.fold_case, "strip_leading_zeros": mapping.strip_leading_zeros}
    source.update({k: v for k, v in optional.items() if v})
    return source


def import_parties(mapping: Mapping, parties_dir: Path, store: Keystore | None = None) -> bool:
    """Write the party folders (or reuse them when made from the same data); returns True on
    reuse. Folders made from other data are never overwritten; data with problems are refused
    with all of them (`check.inspect`), before anything is written."""
    missing = [f"party {p!r}: {path} does not exist" for p, path in mapping.files.items()
               if not path.exists()]
    if missing:
        raise DataImportError(f"{'; '.join(missing)}; add the file(s) or fix their names in "
                              f"{MAPPING_FILE}")
    source = fingerprint(mapping)
    marker = parties_dir / SOURCE_FILE
    if marker.exists():
        if json.loads(marker.read_text()) == source:
            return True
        raise DataImportError(f"{parties_dir} holds parties imported from other data; choose "
                              "another --parties directory")
    if parties_dir.exists() and any(parties_dir.iterdir()):
        raise DataImportError(f"{parties_dir} is not empty; choose another --parties directory")
    checked = inspect(mapping)
    if checked.problems:
        raise DataImportError.of(list(checked.problems))
    log.info("data: %s people held by every party", f"{checked.joint:,}")
    for party, frame in checked.frames.items():
        _write_party(parties_dir / party, party, frame, mapping, store)
    (parties_dir / PARTIES_FILE).write_text(json.dumps({"silos": list(mapping.silos)}) + "\n")
    marker.write_text(json.dumps(source, indent=2) + "\n")
    log.info("imported %d parties into %s", len(checked.frames), parties_dir)
    return False


def _write_party(directory: Path, party: str, frame: pd.DataFrame, mapping: Mapping,
                 store: Keystore | None) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    schema: dict = {"id_column": mapping.id_column(party), "id_kind": mapping.identifier_kind}
    if mapping.fold_case:
        schema["id_fold_case"] = True
    if mapping.strip_leading_zeros:
        schema["id_strip_leading_zeros"] = True
    if party == AUTHORITY:
        schema["label_column"] = mapping.label  # 0/1 here, whatever label_positive said
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
        name = "features.parquet"  # numbers as float64, text stripped (check.inspect)
    (directory / SCHEMA_FILE).write_text(json.dumps(schema, indent=2) + "\n")
    buf = frame.to_parquet(index=False)
    write_party_file(directory / name, party, buf, store)
