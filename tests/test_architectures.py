"""The models users bring: every capability on each architecture, saved to .keras and loaded back.

The models come from audit.zoo.architectures (weights=None, small inputs). A model rebuilt from a
file is not the one built in memory (a Sequential keeps a stale graph, nested bases their own), so
each goes through `models.load("file:...")` as a user's upload would. Each capability is a cell: ok,
or refused with a reason; never failed. The README's table of tested architectures is this suite's
result (regenerate it with `python -m bench.architectures --readme`).
"""

import re
from pathlib import Path

import pytest

from audit import conformance, models
from audit.zoo import architectures

README = Path(__file__).resolve().parents[1] / "README.md"
RESULTS: dict[str, conformance.Summary] = {}
# Only surgery may refuse here: the surgery of this issue cuts plain chains (the dependency groups of
# the pruning issue widen it).
MAY_REFUSE = {"surgery"}


def load_from_file(name: str, folder: Path) -> models.LoadedModel:
    path = folder / (re.sub(r"[^A-Za-z0-9]+", "_", name) + ".keras")
    architectures.build(name).save(path)
    return models.load(f"file:{path}")


@pytest.mark.parametrize("name", list(architectures.ARCHITECTURES))
def test_every_capability_is_ok_or_refused_with_a_reason(name, tmp_path):
    loaded = load_from_file(name, tmp_path)
    cells = conformance.check(loaded)
    RESULTS[name] = conformance.summarise(loaded, architectures.SOURCES[name], cells)
    failed = [f"{cell.capability}: {cell.detail}" for cell in cells if cell.status == "failed"]
    assert not failed, failed
    refused = {cell.capability: cell.detail for cell in cells if cell.status == "refused"}
    assert set(refused) <= MAY_REFUSE, refused
    for reason in refused.values():
        assert len(reason) > 40 and "Traceback" not in reason


def test_the_readme_table_is_this_suites_result():
    if set(RESULTS) != set(architectures.ARCHITECTURES):
        pytest.skip("runs after the whole conformance suite")
    table = conformance.markdown_table({name: RESULTS[name] for name in architectures.ARCHITECTURES})
    text = README.read_text()
    start, end = text.index(conformance.TABLE_START), text.index(conformance.TABLE_END)
    assert text[start + len(conformance.TABLE_START):end].strip() == table.strip(), \
        "the README's table is stale: run python -m bench.architectures --readme"
