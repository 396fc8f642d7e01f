"""tlunet.artifacts: the file contract's readers, including a file's older form."""

from __future__ import annotations

import csv
import io

from tlunet.artifacts import PER_PATIENT_COLUMNS, patient_counts
from tlunet.utils import csv_text


def _rows(header, rows):
    return list(csv.DictReader(io.StringIO(csv_text(header, rows))))


def test_patient_counts_are_read_and_rebuilt_for_older_tables() -> None:
    """Counts of today's per_patient.csv are read as written; a table written before it held
    them (tlunet 0.3.0) gets them rebuilt from its rounded Dice, to the same whole pixels."""
    counts = [(5321, 212, 97), (0, 0, 0), (0, 14, 0), (12, 0, 988)]
    rows = []
    for name, (tp, fp, fn) in zip("abcd", counts, strict=True):
        dice = 1.0 if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn)
        rows.append([name, 3, tp + fn, tp + fp, dice, 0.0, 0.0, 1.0, True, tp, fp, fn])
    expected = tuple([float(c[i]) for c in counts] for i in range(3))
    assert patient_counts(_rows(PER_PATIENT_COLUMNS, rows)) == expected
    older = _rows(PER_PATIENT_COLUMNS[:-3], [r[:-3] for r in rows])
    assert "tp_pixels" not in older[0]
    assert patient_counts(older) == expected
