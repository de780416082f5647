"""What a message carries, for the tests that check what crosses a party's boundary."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np


def arrays_in(obj: Any) -> list[tuple[str, np.ndarray]]:
    """Every array inside a message (a dataclass), with its field path: fields, arrays in
    tuples, and dataclasses in tuples, recursively."""
    found: list[tuple[str, np.ndarray]] = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, np.ndarray):
            found.append((f.name, value))
        elif isinstance(value, tuple):
            for item in value:
                if dataclasses.is_dataclass(item):
                    found += [(f"{f.name}.{k}", a) for k, a in arrays_in(item)]
                elif isinstance(item, np.ndarray):
                    found.append((f.name, item))
    return found
