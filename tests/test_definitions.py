"""One definition per figure: docs/definitions.md is the table of audit/definitions.py, every test it
names exists, and every page shows its own rows."""

import ast
import re
from pathlib import Path

import pytest

from audit import definitions

ROOT = Path(__file__).resolve().parent.parent


def test_the_document_is_written_from_the_table():
    assert (ROOT / "docs" / "definitions.md").read_text() == definitions.document(), \
        "run: python -m audit.definitions > docs/definitions.md"


@pytest.mark.parametrize("row", definitions.DEFINITIONS, ids=lambda row: row.figure)
def test_every_named_test_exists(row):
    path, name = row.test.split("::")
    tree = ast.parse((ROOT / path).read_text())
    assert name in {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}, row.test


@pytest.mark.parametrize("page", ["Model", "Activations", "Filters", "Attribution", "Pruning", "Report"])
def test_every_page_shows_its_own_definitions(page):
    source = (ROOT / "pages" / f"{page.lower()}.py").read_text()
    assert f'what_these_mean("{page}")' in source
    assert definitions.for_page(page)


def test_every_method_and_pruning_score_of_the_app_is_defined():
    from audit import attribution

    figures = " ".join(row.figure for row in definitions.DEFINITIONS)
    for method in attribution.METHODS:
        assert any(part in figures for part in re.split(r" / ", method)), method
    for score in ("L1 norm", "APoZ", "Taylor", "FPGM", "Redundancy", "Dead / near-dead", "Deletion AUC"):
        assert score in figures
