"""Compare two results/tables/all.csv files row by row (`make test-slurm`).

Rows are matched on their identifying columns; every other cell must be
equal as written (the tables round metrics to 6 decimals). Prints the
differences and exits 1 when there are any.
"""

import argparse
import sys

import pandas as pd

from ood.tables import COLUMNS

KEYS = ["benchmark", "ood_dataset", "method", "variant", "seed"]


def differences(expected: pd.DataFrame, actual: pd.DataFrame) -> list[str]:
    problems = []
    for name, table in (("expected", expected), ("actual", actual)):
        if list(table.columns) != COLUMNS:
            problems.append(f"{name} columns {list(table.columns)} != {COLUMNS}")
    if problems:
        return problems
    left = expected.set_index(KEYS)
    right = actual.set_index(KEYS)
    for key in left.index.difference(right.index):
        problems.append(f"row {key} only in expected")
    for key in right.index.difference(left.index):
        problems.append(f"row {key} only in actual")
    shared = left.index.intersection(right.index)
    left, right = left.loc[shared], right.loc[shared]
    for column in left.columns:
        for key in shared[(left[column] != right[column]).to_numpy()]:
            problems.append(
                f"{key} {column}: {left.at[key, column]!r} != {right.at[key, column]!r}"
            )
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("expected", help="all.csv of the reference (local) run")
    parser.add_argument("actual", help="all.csv of the run to check")
    args = parser.parse_args(argv)
    expected = pd.read_csv(args.expected, dtype=str, keep_default_na=False)
    actual = pd.read_csv(args.actual, dtype=str, keep_default_na=False)
    problems = differences(expected, actual)
    for line in problems[:50]:
        print(line, file=sys.stderr)
    if problems:
        print(
            f"{len(problems)} differences between {args.expected} and {args.actual}",
            file=sys.stderr,
        )
        return 1
    print(f"[test-slurm] {args.actual}: {len(actual)} rows, equal to {args.expected}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
