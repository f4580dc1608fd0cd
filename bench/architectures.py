"""Benchmark: first-call seconds of every capability on the architectures users bring.

Each architecture of audit.zoo.architectures is built (weights=None), saved to .keras and loaded back
through models.load, then audit.conformance.check runs every capability once and audit.surfaces the report
and the CLI's commands; the times are first
calls (graph building and tracing included), which is what a user waits for on opening a page.
Printed, never asserted. With --readme, the README's table of tested architectures is rewritten
from the same run (the tests check that it matches).

    python -m bench.architectures [--only ResNet50 ...] [--readme]
"""

import argparse
import re
import tempfile
import time
from pathlib import Path

import pandas as pd

from audit import conformance, models, surfaces
from audit.zoo import architectures

README = Path(__file__).resolve().parents[1] / "README.md"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", nargs="*", default=list(architectures.ARCHITECTURES))
    parser.add_argument("--readme", action="store_true", help="rewrite the README's table from this run")
    args = parser.parse_args()
    summaries, rows = {}, []
    with tempfile.TemporaryDirectory() as folder:
        for name in args.only:
            start = time.perf_counter()
            path = Path(folder) / (re.sub(r"[^A-Za-z0-9]+", "_", name) + ".keras")
            architectures.build(name).save(path)
            loaded = models.load(f"file:{path}")
            load_seconds = time.perf_counter() - start
            cells = conformance.check(loaded) + surfaces.check(loaded)
            summaries[name] = conformance.summarise(loaded, architectures.SOURCES[name], cells)
            row = {"model": name, "save+load": load_seconds, "all": sum(cell.seconds for cell in cells)}
            for group, capabilities in conformance.GROUPS.items():
                row[group] = sum(cell.seconds for cell in cells if cell.capability.split(",")[0] in capabilities
                                 or cell.capability in capabilities)
            rows.append(row)
            slowest = max(cells, key=lambda cell: cell.seconds)
            print(f"{name}: {row['all']:.1f} s in all; slowest {slowest.capability} {slowest.seconds:.1f} s; "
                  f"{sum(cell.status != 'ok' for cell in cells)} not ok", flush=True)
    pd.set_option("display.width", 200)
    print(pd.DataFrame(rows).round(1).to_string(index=False))
    if args.readme:
        text = README.read_text()
        start = text.index(conformance.TABLE_START) + len(conformance.TABLE_START)
        end = text.index(conformance.TABLE_END)
        table = conformance.markdown_table(summaries).splitlines()
        if set(summaries) != set(architectures.ARCHITECTURES):  # --only: those rows new or replaced, the rest kept
            rows = {line.split("|")[1].strip(): line for line in text[start:end].strip().splitlines()[2:]}
            rows.update({line.split("|")[1].strip(): line for line in table[2:]})
            table = table[:2] + [rows[name] for name in architectures.ARCHITECTURES if name in rows]
        README.write_text(text[:start] + "\n" + "\n".join(table) + "\n" + text[end:])
        print(f"README.md: {len(summaries)} row(s) of the table rewritten")


if __name__ == "__main__":
    main()
