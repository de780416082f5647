"""`fedscore data check`: every problem of a mapping and its tables, found at once.

The same inspection runs before an import (`real_data.import_parties`), so `fedscore run --data
DIR` refuses bad data before any engine starts, with the same messages. Each problem names the
file, the column and the fix; none names an identifier. Who is held by which party is counted
on keyed hashes (HMAC under a key drawn for this check and then forgotten), never on the
identifiers themselves or an unkeyed hash of them.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from clients.protocol.schema import AUTHORITY
from clients.silo.text_columns import count_text, is_text, not_numeric, text_cells
from crypto.identity import IdentifierError, IdentifierFormat, keyed_refs, unique_ids
from simulations.data.mapping import MAPPING_FILE, Mapping, MappingProblem

log = logging.getLogger(__name__)

# The normalisation options of plain identifiers, tried when a silo shares no one with the
# authority: if they find people in common, the problem says which options to set.
LENIENT = ("fold_case", "strip_leading_zeros")


@dataclass(frozen=True, kw_only=True)
class DataCheck:
    """What `inspect` found: the problems, and for a summary rows and overlaps (counts only)."""

    problems: tuple[MappingProblem, ...]
    files: dict[str, str]  # party -> table file name
    id_columns: dict[str, str]  # party -> identifier column
    rows: dict[str, int]  # party -> rows of its table (readable tables only)
    shared: dict[str, int]  # silo -> people it shares with the authority
    joint: int | None  # people every party holds (None when a table could not be read)
    identifiers: str  # the identifier format, in words
    # silo -> {column: "declared" or "detected"}: its text category columns
    text_columns: dict[str, dict[str, str]] = field(default_factory=dict)
    # party -> the table as it will be imported (labels as 0/1); not for display.
    frames: dict[str, pd.DataFrame] = field(default_factory=dict, repr=False)

    @property
    def ok(self) -> bool:
        return not self.problems


def inspect(mapping: Mapping) -> DataCheck:
    """Read every party's table once and collect every problem of every party."""
    problems: list[MappingProblem] = []
    frames: dict[str, pd.DataFrame] = {}
    text: dict[str, dict[str, str]] = {}
    refs: dict[str, set[str]] = {}
    key = secrets.token_bytes(32)  # this check's own: its hashes mean nothing afterwards
    fmt = mapping.id_format
    for party, path in mapping.files.items():
        needed = (mapping.label,) if party == AUTHORITY else mapping.silos[party]
        found: list[MappingProblem] = []
        declared = mapping.categories.get(party, {})
        # Declared text values are read as text: "01" stays "01".
        as_text = tuple(c for c, v in declared.items() if v and isinstance(v[0], str))
        frame = _read(path, mapping.id_column(party), needed, found, as_text)
        if frame is not None:
            where, id_col = path.name, mapping.id_column(party)
            if party == AUTHORITY:
                frame = _labels(frame, mapping, where, found)
            else:
                frame, text[party] = _features(frame, needed, where,
                                               mapping.kinds.get(party, {}), declared, found)
            try:
                ids = unique_ids(frame[id_col], fmt)
                refs[party] = set(keyed_refs(ids.to_numpy(), key))
            except IdentifierError as exc:
                found.append(MappingProblem(where=where, column=id_col,
                                            text=f"{exc} ({fmt.describe()})"))
            frames[party] = frame
        problems += found
    shared, joint = _overlaps(mapping, refs, frames, key, problems)
    return DataCheck(
        problems=tuple(problems), files={p: f.name for p, f in mapping.files.items()},
        id_columns={p: mapping.id_column(p) for p in mapping.files},
        rows={p: len(f) for p, f in frames.items()}, shared=shared, joint=joint,
        identifiers=fmt.describe(), text_columns={p: t for p, t in text.items() if t},
        frames=frames)


def _read(path: Path, id_col: str, needed: tuple[str, ...], problems: list[MappingProblem],
          as_text: tuple[str, ...] = ()) -> pd.DataFrame | None:
    """The identifier and `needed` columns of a table (`as_text` read as text from a CSV), or
    None with the problems noted."""
    if not path.exists():
        problems.append(MappingProblem(where=path.name, text=f"does not exist; add the file or "
                                       f"fix its name in {MAPPING_FILE}"))
        return None
    try:
        header = (pq.read_schema(path).names if path.suffix == ".parquet"
                  else list(pd.read_csv(path, nrows=0).columns))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        problems.append(MappingProblem(where=path.name, text=f"cannot be read as "
                                       f"{path.suffix[1:]} ({type(exc).__name__}); export it "
                                       "again"))
        return None
    missing = [c for c in dict.fromkeys((id_col, *needed)) if c not in header]
    for col in missing:
        problems.append(MappingProblem(where=path.name, column=col, text=_missing_text(
            col, header)))
    if missing:
        return None
    columns = list(dict.fromkeys((id_col, *needed)))
    if path.suffix == ".parquet":
        return pd.read_parquet(path, columns=columns)
    return pd.read_csv(path, usecols=columns, low_memory=False,
                       dtype={id_col: "string", **dict.fromkeys(as_text, "string")})


def _missing_text(col: str, header: list[str]) -> str:
    near = [h for h in header if h.strip().lower() == col.strip().lower()]
    hint = f" ({near[0]!r} differs only in case or spaces)" if near else ""
    shown = ", ".join(map(repr, header[:12])) + (", ..." if len(header) > 12 else "")
    return (f"no such column{hint}; the table has {shown}: fix the column's name in the table "
            f"or in {MAPPING_FILE}")


def _labels(frame: pd.DataFrame, mapping: Mapping, where: str,
            problems: list[MappingProblem]) -> pd.DataFrame:
    """The table with its label column as 0/1 (1 = defaulted), or as read with a problem."""
    label, positive = mapping.label, mapping.label_positive
    raw = frame[label]
    empty = raw.isna() | (raw.astype("string").str.strip() == "")
    if empty.any():
        problems.append(MappingProblem(where=where, column=label, text=(
            f"{int(empty.sum())} rows have no label; drop them or fill them in")))
        return frame
    if positive is None:
        values = pd.to_numeric(raw, errors="coerce")
        bad = ~values.isin((0, 1))
        if bad.any():
            seen = _few_values(raw)
            problems.append(MappingProblem(where=where, column=label, text=(
                f"{int(bad.sum())} rows are not 0 or 1{seen}; recode them, or name the value "
                'that means default with authority.label_positive (e.g. "bad" or 1)')))
            return frame
        return frame.assign(**{label: values.astype(np.int8)})
    if isinstance(positive, str):
        hit = raw.astype("string").str.strip() == positive.strip()
    else:
        hit = pd.to_numeric(raw, errors="coerce") == positive
    hit = hit.fillna(False).astype(bool)
    distinct = raw.astype("string").str.strip().nunique()
    if not hit.any() or hit.all() or distinct != 2:
        why = (f"no row has the value {positive!r}" if not hit.any() else
               "every row has it" if hit.all() else f"the column holds {distinct} values")
        problems.append(MappingProblem(where=where, column=label, text=(
            f"label_positive {positive!r}: {why}{_few_values(raw)}; the label needs exactly "
            "two values, one of them label_positive")))
        return frame
    return frame.assign(**{label: hit.astype(np.int8)})


def _few_values(raw: pd.Series) -> str:
    """The label's distinct values when there are a few (class names, never identifiers)."""
    values = raw.astype("string").str.strip().dropna().unique()
    if len(values) > 5:
        return ""
    return f" (values: {', '.join(sorted(map(repr, map(str, values))))})"


def _features(frame: pd.DataFrame, columns: tuple[str, ...], where: str, kinds: dict[str, str],
              categories: dict[str, list], problems: list[MappingProblem]
              ) -> tuple[pd.DataFrame, dict[str, str]]:
    """The table with its feature columns as they will be imported (numbers as float64, text
    stripped, empty cells missing) and its text category columns ({column: "declared" or
    "detected"}); problems noted. The silo applies the same rules (clients/silo/data.py)."""
    out: dict[str, pd.Series] = {}
    text: dict[str, str] = {}
    for col in columns:
        values, kind = frame[col], kinds.get(col, "auto")
        listed = categories.get(col) or []
        listed_text = bool(listed) and isinstance(listed[0], str)

        def problem(message: str, col: str = col) -> None:
            problems.append(MappingProblem(where=where, column=col, text=message))

        # A category column of numbers stored as text ("1", "2") is a category of numbers, as
        # the same column stored as numbers would be, unless its listed values are texts.
        if is_text(values, kind) and (listed_text or count_text(values)[0] > 0):
            cells = text_cells(values)
            text[col] = "declared" if kind == "category" else "detected"
            if listed and not listed_text:
                problem(f"{count_text(values)[0]} of {len(values)} cells are text but its "
                        "categories are numbers; list its text values, or clean the column")
            elif cells.isna().all():
                problem("entirely empty; fill it or drop it from the mapping")
            out[col] = cells
            continue
        if not pd.api.types.is_numeric_dtype(values):
            if count_text(values)[0]:
                problem(not_numeric(col, kind, values))
                continue
            values = pd.Series(pd.to_numeric(text_cells(values)).to_numpy(
                dtype=np.float64, na_value=np.nan), index=values.index)  # numbers stored as text
        if listed_text:
            problem("holds numbers but its categories are texts; list its values as numbers, or "
                    "store the column as text")
        x = values.to_numpy(dtype=np.float64)  # true/false: imported as 1/0
        if np.isinf(x).any():
            problem(f"{int(np.isinf(x).sum())} infinite values; replace them with real numbers "
                    "or leave them empty")
        if np.isnan(x).all():
            problem("entirely empty; fill it or drop it from the mapping")
        out[col] = values.astype(np.float64)
    return frame.assign(**out), text


def _overlaps(mapping: Mapping, refs: dict[str, set[str]], frames: dict[str, pd.DataFrame],
              key: bytes, problems: list[MappingProblem]) -> tuple[dict[str, int], int | None]:
    """People each silo shares with the authority, and people every party holds."""
    if AUTHORITY not in refs:
        return {}, None
    authority = refs[AUTHORITY]
    shared = {s: len(refs[s] & authority) for s in mapping.silos if s in refs}
    for silo, count in shared.items():
        if count == 0:
            problems.append(MappingProblem(
                where=mapping.files[silo].name, column=mapping.id_column(silo),
                text=(f"shares no one with the authority's {mapping.files[AUTHORITY].name}: "
                      f"check that both hold {mapping.id_format.describe()} of the same "
                      f"people{_lenient_hint(mapping, frames, silo, key)}")))
    if len(refs) < len(mapping.files):
        return shared, None
    joint = len(set.intersection(*refs.values()))
    if joint == 0 and all(shared.values()):
        problems.append(MappingProblem(where=MAPPING_FILE, text=(
            "no person is held by every party; the vertical model needs people all parties "
            "know")))
    return shared, joint


def _lenient_hint(mapping: Mapping, frames: dict[str, pd.DataFrame], silo: str,
                  key: bytes) -> str:
    """For plain ids: the options (fold_case, strip_leading_zeros) that would match people."""
    fmt = mapping.id_format
    if fmt.kind != "plain":
        return ""
    current = {"fold_case": fmt.fold_case, "strip_leading_zeros": fmt.strip_leading_zeros}
    for option in ({"fold_case"}, {"strip_leading_zeros"}, set(LENIENT)):
        if all(current[o] for o in option):
            continue
        lenient = IdentifierFormat(kind="plain", **{**current, **dict.fromkeys(option, True)})
        try:
            mine, theirs = (set(keyed_refs(unique_ids(frames[p][mapping.id_column(p)],
                                                      lenient).to_numpy(), key))
                            for p in (silo, AUTHORITY))
        except IdentifierError:
            continue
        if mine & theirs:
            setting = " and ".join(f'"{o}": true' for o in sorted(option))
            return (f"; with {setting} in {MAPPING_FILE}, {len(mine & theirs):,} people "
                    "match")
    return ""
