"""Where real data comes from: `uci`, a CSV in the UCI layout, or a directory of one table per
party plus `mapping.json` (format: `MAPPING_HELP`, shown by `fedscore data check --help` and
`fedscore run --help`; docs/real-data.md). A mapping with mistakes is refused with all of them
at once (`MappingProblem`), each naming where and the fix.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from clients.protocol.schema import AUTHORITY, COLUMN_KINDS, categories_problem
from crypto.identity import ID_KINDS, IdentifierError, IdentifierFormat, check_party_name

UCI_NAME = "uci"
MAPPING_FILE = "mapping.json"
TABLE_SUFFIXES = (".csv", ".parquet")

MAPPING_HELP = """\
--data DIR: one table per party (.csv or .parquet) and DIR/mapping.json:

  {"identifier": "ID",              the identifier column (a party may name its own below)
   "identifier_kind": "plain",      "plain": compared as text; "phone": E.164-normalised
   "fold_case": false,              plain ids: "AB12" and "ab12" are one person
   "strip_leading_zeros": false,    plain ids: "00123" and "123" are one person
   "authority": {"file": "labels.csv", "label": "default",
                 "label_positive": "bad"},       the label value meaning "defaulted"
   "silos": {"payments": {"file": "payments.csv", "columns": ["pay_0", "bill", "region"],
                          "identifier": "customer_no",    this party's identifier column
                          "kinds": {"pay_0": "category", "region": "category"},
                          "categories": {"region": ["north", "south"]}},  public values
             "profile":  {"file": "profile.parquet", "columns": ["age", "job"]}}}

Labels are 0/1 (1 = defaulted) unless label_positive names the default value ("bad", 2, ...).
Feature columns are numbers or text (empty = missing); "kinds" per column: auto, signed_log,
category, amount, count, rate, flag, real. A text column ("job") is a category: its listed
values, else its common values (a noisy count), the rest "other". Check the data first:
fedscore data check DIR
"""

# Keys each level of mapping.json may hold: anything else is a typo worth reporting.
TOP_KEYS = frozenset({"identifier", "identifier_kind", "fold_case", "strip_leading_zeros",
                      "authority", "silos"})
AUTHORITY_KEYS = frozenset({"file", "label", "label_positive", "identifier"})
SILO_KEYS = frozenset({"file", "columns", "kinds", "categories", "identifier"})


@dataclass(frozen=True, kw_only=True)
class MappingProblem:
    """One thing wrong with real data: where (a file), which column, what to do."""

    where: str  # mapping.json or a party's table, by file name
    column: str | None = None
    text: str  # what is wrong and the fix; never an identifier

    def __str__(self) -> str:
        column = f", column {self.column!r}" if self.column is not None else ""
        return f"{self.where}{column}: {self.text}"


class DataImportError(ValueError):
    """Real data that cannot be imported as it is; nothing was written. `problems` lists every
    problem found (a single-problem error has one)."""

    def __init__(self, message: str, problems: tuple[MappingProblem, ...] = ()) -> None:
        super().__init__(message)
        self.problems = problems or (MappingProblem(where="data", text=message),)

    @classmethod
    def of(cls, problems: list[MappingProblem]) -> DataImportError:
        lines = "\n".join(f"  - {p}" for p in problems)
        noun = "problem" if len(problems) == 1 else "problems"
        return cls(f"{len(problems)} {noun} with the data (nothing was written):\n{lines}",
                   tuple(problems))


@dataclass(frozen=True)
class Mapping:
    identifier: str  # the identifier column of every party that names none of its own
    identifier_kind: str
    label: str
    silos: dict[str, tuple[str, ...]]
    files: dict[str, Path]  # party -> table (one file may serve every party)
    # silo -> {column: kind} for columns not prepared "auto" (COLUMN_KINDS of
    # clients/protocol/schema.py)
    kinds: dict[str, dict[str, str]] = field(default_factory=dict)
    # silo -> {column: declared values (numbers or texts)} of category columns: declared values
    # cost no privacy (without them a silo picks them by a noisy, thresholded count;
    # clients/silo/data.py)
    categories: dict[str, dict[str, list]] = field(default_factory=dict)
    # party -> its own identifier column, where it differs from `identifier`
    identifiers: dict[str, str] = field(default_factory=dict)
    # The label value meaning "defaulted" (None: labels are already 0/1).
    label_positive: str | float | None = None
    fold_case: bool = False
    strip_leading_zeros: bool = False

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise DataImportError.of(problems)

    def id_column(self, party: str) -> str:
        return self.identifiers.get(party, self.identifier)

    @property
    def id_format(self) -> IdentifierFormat:
        return IdentifierFormat(kind=self.identifier_kind, fold_case=self.fold_case,
                                strip_leading_zeros=self.strip_leading_zeros)

    def problems(self) -> list[MappingProblem]:
        """Everything wrong with the mapping itself (not yet the tables)."""
        out: list[MappingProblem] = []

        def problem(text: str, column: str | None = None) -> None:
            out.append(MappingProblem(where=MAPPING_FILE, column=column, text=text))

        if self.identifier_kind not in ID_KINDS:
            problem(f"identifier_kind {self.identifier_kind!r}: choose one of "
                    f"{', '.join(ID_KINDS)}")
        else:
            try:
                _ = self.id_format
            except IdentifierError as exc:
                problem(f"{exc}; remove them or set identifier_kind to plain")
        for silo in self.silos:
            # A silo's name becomes its directory under the parties root: "../../x" must not.
            try:
                check_party_name(silo, "silo")
            except IdentifierError as exc:
                problem(str(exc))
        if len(self.silos) < 2:
            problem("name at least two silos (vertical FL needs features split across parties)")
        if AUTHORITY in self.silos:
            problem(f"{AUTHORITY!r} is the label holder, not a silo; rename it")
        if isinstance(self.label_positive, bool) or (
                isinstance(self.label_positive, float) and not math.isfinite(self.label_positive)):
            problem("authority.label_positive must be the label value meaning default, e.g. "
                    '"bad" or 1', self.label)
        # No identifier column of any party may become a feature (a shared file holds them all).
        identifiers = {self.identifier, *self.identifiers.values()} - {""}
        seen: dict[str, str] = {}
        for silo, columns in self.silos.items():
            if not columns:
                problem(f"silo {silo!r} has no columns; list its feature columns")
            for col in columns:
                if col in identifiers or col == self.label:
                    problem(f"silo {silo!r} lists it, but it is an identifier or the label; "
                            "remove it", col)
                elif col in seen:
                    problem(f"mapped to both {seen[col]!r} and {silo!r}; give each column to one "
                            "silo", col)
                seen[col] = silo
        for silo, kinds in self.kinds.items():
            for col, kind in kinds.items():
                if col not in self.silos.get(silo, ()):
                    problem(f"silo {silo!r}: kinds names it, but it is not one of the silo's "
                            "columns", col)
                elif kind not in COLUMN_KINDS:
                    problem(f"silo {silo!r}: kind {kind!r}; choose one of "
                            f"{', '.join(COLUMN_KINDS)}", col)
        for silo, declared in self.categories.items():
            for col, values in declared.items():
                why = categories_problem(values)
                if col not in self.silos.get(silo, ()):
                    problem(f"silo {silo!r}: categories names it, but it is not one of the "
                            "silo's columns", col)
                elif self.kinds.get(silo, {}).get(col) != "category":
                    problem(f'silo {silo!r}: categories lists its values; add "kinds": '
                            f'{{"{col}": "category"}}', col)
                elif why is not None:
                    problem(f"silo {silo!r}: the categories {why}", col)
        return out


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
                          "UCI layout, or a directory with one table per party and mapping.json)")


def read_mapping(directory: Path) -> Mapping:
    """The mapping in `directory`, or DataImportError listing every problem with it."""
    path = directory / MAPPING_FILE
    if not path.exists():
        raise DataImportError(f"{directory} has no {MAPPING_FILE}; add one naming each party's "
                              "table and columns (see `fedscore data check --help`)")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataImportError(f"{path} is not a valid mapping (not JSON: {exc}); it needs "
                              "identifier, authority.file, authority.label and "
                              "silos.<name>.file / .columns") from None
    problems: list[MappingProblem] = []
    parsed = _parse(raw, directory, problems)
    if parsed is None or problems:
        raise DataImportError.of(problems)
    return parsed


def _parse(raw: object, directory: Path, problems: list[MappingProblem]) -> Mapping | None:
    def problem(text: str) -> None:
        problems.append(MappingProblem(where=MAPPING_FILE, text=text))

    if not isinstance(raw, dict):
        problem("must be a JSON object with identifier, authority and silos")
        return None
    _unknown_keys(raw, TOP_KEYS, "the top level", problem)
    authority = raw.get("authority")
    silos = raw.get("silos")
    usable = True  # whether a Mapping can be built, to report its own problems too
    if not isinstance(authority, dict):
        problem('authority: give {"file": "labels.csv", "label": "default"}')
        authority, usable = {}, False
    if not isinstance(silos, dict) or not silos:
        problem('silos: give {"<name>": {"file": "x.csv", "columns": ["a", "b"]}, ...}')
        silos, usable = {}, False
    _unknown_keys(authority, AUTHORITY_KEYS, "authority", problem)
    files, identifiers, parties_usable = _party_files(authority, silos, directory, problem)
    label = authority.get("label")
    if authority and (not isinstance(label, str) or not label):
        problem("authority.label: name the label column (1 or label_positive = defaulted)")
        usable = False
    identifier = raw.get("identifier")
    if identifier is not None and not (isinstance(identifier, str) and identifier):
        problem("identifier: name the identifier column")
    missing_id = [p for p in (AUTHORITY, *silos) if p not in identifiers]
    if identifier is None and missing_id:
        problem(f"identifier: name the identifier column (for {', '.join(missing_id)}), or give "
                "each party its own `identifier`")
    columns, columns_usable = _silo_columns(silos, problem)
    flags = {}
    for key in ("fold_case", "strip_leading_zeros"):
        value = raw.get(key, False)
        if not isinstance(value, bool):
            problem(f"{key}: true or false")
        flags[key] = value is True
    positive = authority.get("label_positive")
    if positive is not None and (isinstance(positive, bool)
                                 or not isinstance(positive, str | int | float)):
        problem('authority.label_positive: the label value meaning default, e.g. "bad" or 1')
        positive = None
    kind = raw.get("identifier_kind", "plain")
    if not (usable and parties_usable and columns_usable):
        return None
    try:
        return Mapping(
            identifier or "", kind, str(label), columns, files,
            {s: dict(spec.get("kinds", {})) for s, spec in silos.items()},
            {s: dict(spec["categories"]) for s, spec in silos.items() if spec.get("categories")},
            identifiers, positive, **flags)
    except DataImportError as exc:
        problems.extend(exc.problems)
        return None
    except (TypeError, ValueError, AttributeError) as exc:
        problem(f"kinds and categories map column names to a kind and to a list of values "
                f"({type(exc).__name__})")
        return None


def _party_files(authority: dict, silos: dict, directory: Path, problem: Callable[[str], None]
                 ) -> tuple[dict[str, Path], dict[str, str], bool]:
    """Each party's table and own identifier column, and whether every silo's entry is an
    object; the problems of each entry."""
    files: dict[str, Path] = {}
    identifiers: dict[str, str] = {}
    usable = True
    for party, spec in ((AUTHORITY, authority), *silos.items()):
        what = "authority" if party == AUTHORITY else f"silos.{party}"
        if party != AUTHORITY:
            if not isinstance(spec, dict):
                problem(f'{what}: give {{"file": "x.csv", "columns": ["a", "b"]}}')
                usable = False
                continue
            _unknown_keys(spec, SILO_KEYS, what, problem)
        name = spec.get("file")
        if not isinstance(name, str) or not name:
            problem(f"{what}.file: name the party's table (a .csv or .parquet file beside "
                    f"{MAPPING_FILE})")
        elif not name.endswith(TABLE_SUFFIXES):
            problem(f"{what}.file {name!r}: use a .csv or .parquet table")
        else:
            files[party] = directory / name
        if "identifier" in spec:
            if isinstance(spec["identifier"], str) and spec["identifier"]:
                identifiers[party] = spec["identifier"]
            else:
                problem(f"{what}.identifier: name the party's identifier column")
    return files, identifiers, usable


def _silo_columns(silos: dict, problem: Callable[[str], None]
                  ) -> tuple[dict[str, tuple[str, ...]], bool]:
    """Each silo's feature columns, and whether every silo lists them."""
    columns: dict[str, tuple[str, ...]] = {}
    usable = True
    for silo, spec in silos.items():
        cols = spec.get("columns") if isinstance(spec, dict) else None
        if not isinstance(cols, list) or not all(isinstance(c, str) for c in cols):
            problem(f"silos.{silo}.columns: list the silo's feature columns, e.g. [\"a\", \"b\"]")
            usable = False
            continue
        columns[silo] = tuple(cols)
    return columns, usable


def _unknown_keys(spec: dict, allowed: frozenset[str], what: str, problem) -> None:
    unknown = sorted(set(spec) - allowed)
    if unknown:
        problem(f"{what}: unknown key(s) {', '.join(map(repr, unknown))}; the keys are "
                f"{', '.join(sorted(allowed))}")
