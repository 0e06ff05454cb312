#!/usr/bin/env python3
"""Rebuild enrichers/data/sensitive_types.csv, the bundled table of Microsoft's built-in sensitive
information types (id -> name, category), from the ids published on Microsoft Learn.

Source: the "sensitive information type entity definition" pages (`sit-defn-*.md`) of the
Microsoft 365 documentation (https://github.com/MicrosoftDocs/microsoft-365-docs, folder
`microsoft-365/compliance/` in 2022; today https://learn.microsoft.com/purview/sit-sensitive-information-type-entity-definitions).
Each page carries an XML snippet `<!-- Credit Card Number --> <Entity id="50842eb7-…">`. The
documentation is licensed CC BY 4.0 by Microsoft; the table keeps that attribution.

Input, either of:
- a CSV with columns `guid,name_in_xml_comment,doc_page_slug` (lines starting with `#` are comments),
  as extracted from those pages;
- a folder of `sit-defn-*.md` pages (a checkout of the docs repository), read directly.

Usage:
    python scripts/build_sensitive_types.py SOURCE [--output enrichers/data/sensitive_types.csv] [--source-note TEXT]

Microsoft publishes no category for a type, so the category is decided here: `CATEGORY_OF` for
the types a keyword would misfile, then keywords on the name. A built-in type is never "custom".
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from pathlib import Path

DEFAULT_OUTPUT = Path(__file__).resolve().parent.parent / "enrichers" / "data" / "sensitive_types.csv"

# Pages whose XML snippet has no name comment: the name from the page's title.
NAME_OF_PAGE = {
    "sit-defn-czech-drivers-license-number": "Czech Driver's License Number",
    "sit-defn-hungary-drivers-license-number": "Hungary Driver's License Number",
    "sit-defn-international-banking-account-number": "International Banking Account Number (IBAN)",
    "sit-defn-international-classification-of-diseases-icd-9-cm": "International Classification of Diseases (ICD-9-CM)",
    "sit-defn-japan-residence-card-number": "Japan Residence Card Number",
    "sit-defn-malaysia-identification-card-number": "Malaysia Identification Card Number",
    "sit-defn-sql-server-connection-string": "SQL Server Connection String",
    "sit-defn-swift-code": "SWIFT Code",
    "sit-defn-thai-population-identification-code": "Thai Population Identification Code",
    "sit-defn-turkey-national-identification-number": "Turkish National Identification Number",
}

# Known errors of the pages: (page, id) pairs that are not that page's type. The Ireland driver's
# licence page shows the IP Address id.
WRONG_ROWS = {("sit-defn-ireland-drivers-license-number", "1daa4ad5-e2dd-4ca4-a788-54722c09efb2")}

# Types the keywords below would misfile, by id.
CATEGORY_OF: dict[str, str] = {
    "0f587d92-eb28-44a9-bd1c-90f2892b47aa": "credentials",  # Azure Document DB Auth Key
    "4d235014-e564-47f4-a6fb-6ebb4a826834": "credentials",  # Azure SAS
    "722e12ac-c89a-4ec8-a1b7-fea3469f89db": "health",  # Canada PHIN (Personal Health Information Number)
    "3192014e-2a16-44e9-aa69-4b20375c9a78": "health",  # U.K. NHS Number
    "9b58b5cd-5e90-4df6-b34f-1ebcc88ceae4": "financial",  # Brazil Legal Entity Number (CNPJ): a company's tax id
    "9f5a721c-2fd2-446a-a27e-0c02fbe4630c": "financial",  # India GST number
    "9e0eaf79-ff20-4ffb-b3e4-e7368d5db6ff": "financial",  # Japanese My Number - Corporate
    "dd0fe2bc-7bcf-455f-bac1-83b1e3eb25fd": "financial",  # New Zealand Inland Revenue Number
    "fc87b421-f437-4f8b-b739-29a735ead0d9": "financial",  # Polish REGON Number (business register)
}

# Checked in this order; the first category with a word in the lowercased name wins. A name no
# word matches is a personal identifier (most built-in types are national ids of some kind).
KEYWORDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("credentials", ("password", "connection string", "access key", "account key", "shared access", "client secret", "secret", "token", "private key", "credential")),
    ("health", ("health", "medical", "drug", "disease", "icd-", "dea number", "medicare", "medicaid", "pharmac", "hospital")),
    ("financial", ("credit card", "debit card", "bank", "iban", "swift", "routing", "aba ", "tax", "vat", "cuit", "business number", "company number",
                   "fiscal", "financial", "account number", "banking")),
    ("personal", ()),
)


def category(type_id: str, name: str) -> str:
    if type_id in CATEGORY_OF:
        return CATEGORY_OF[type_id]
    lowered = name.lower()
    for name_of_category, words in KEYWORDS:
        if any(word in lowered for word in words):
            return name_of_category
    return "personal"


_ENTITY = re.compile(r"(?:<!--\s*(?P<name>[^>]*?)\s*-->\s*)?<Entity\s+id=\"(?P<id>[0-9a-fA-F-]{36})\"")


def rows_from_pages(folder: Path) -> list[tuple[str, str, str]]:
    rows = []
    for page in sorted(folder.rglob("sit-defn-*.md")):
        match = _ENTITY.search(page.read_text(encoding="utf-8"))
        if match:
            rows.append((match["id"], match["name"] or "", page.stem))
    return rows


def rows_from_csv(path: Path) -> list[tuple[str, str, str]]:
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip() and not line.startswith("#")]
    reader = csv.DictReader(lines)
    return [(row["guid"], row.get("name_in_xml_comment") or "", row.get("doc_page_slug") or "") for row in reader]


def build(rows: list[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
    """(id, name, category) per distinct id, sorted by name; wrong rows dropped, missing names filled."""
    table: dict[str, tuple[str, str]] = {}
    for type_id, name, page in rows:
        type_id = type_id.strip().lower()
        if (page, type_id) in WRONG_ROWS:
            continue
        name = name.strip() or NAME_OF_PAGE.get(page) or page.removeprefix("sit-defn-").replace("-", " ").title()
        if type_id in table and table[type_id][0] != name:
            raise SystemExit(f"{type_id} has two names ({table[type_id][0]!r}, {name!r}): add the wrong one to WRONG_ROWS")
        table[type_id] = (name, category(type_id, name))
    return sorted(((type_id, name, cat) for type_id, (name, cat) in table.items()), key=lambda row: (row[1].lower(), row[0]))


HEADER = """\
# Microsoft's built-in sensitive information types: id, name, category.
# Ids and names: Microsoft Learn, "Sensitive information type entity definitions" (the sit-defn-* pages),
# https://learn.microsoft.com/purview/sit-sensitive-information-type-entity-definitions
# (c) Microsoft Corporation, licensed under CC BY 4.0 (https://creativecommons.org/licenses/by/4.0/).
# {source_note}
# Categories are this project's (Microsoft publishes none). Rebuilt by scripts/build_sensitive_types.py; do not edit by hand.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="the extracted CSV, or a folder holding the sit-defn-*.md pages")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--source-note", default="Extracted from the pages' <Entity id> XML snippets and their name comments.", help="one line saying which revision of the pages was read")
    args = parser.parse_args(argv)
    rows = rows_from_pages(args.source) if args.source.is_dir() else rows_from_csv(args.source)
    if not rows:
        print(f"{args.source}: no sensitive information type found", file=sys.stderr)
        return 1
    table = build(rows)
    with args.output.open("w", encoding="utf-8", newline="") as out:
        out.write(HEADER.format(source_note=args.source_note))
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(("id", "name", "category"))
        writer.writerows(table)
    print(f"{args.output}: {len(table)} types")
    return 0


if __name__ == "__main__":
    sys.exit(main())
