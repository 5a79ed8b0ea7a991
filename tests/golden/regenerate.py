"""Rewrite every golden case's expected.json from the current code; review the diff after.

.venv/bin/python -m tests.golden.regenerate
"""

from __future__ import annotations

from invoicer.documents import invoice_to_json
from tests.golden.casefiles import case_names, load_case, rate_case


def main() -> None:
    for name in case_names():
        case = load_case(name)
        case.expected_path.write_text(invoice_to_json(rate_case(case)) + "\n", encoding="utf-8")
        print(f"wrote {case.expected_path}")


if __name__ == "__main__":
    main()
