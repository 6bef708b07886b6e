"""Mutation score per module from a finished `mutmut run` (the `mutants/` folder), with the mutants listed in
`benchmarks/mutation_equivalent.txt` taken out.

    python benchmarks/mutation_score.py [--survivors] [--json out.json]

The list has one mutant per line: its name, then `equivalent: <why no test can tell it apart>` or
`import-time: <why>` (code that runs when the module is imported, before mutmut switches a mutant on, so no test run
can see the mutant). score = (killed + timeout) / (all − equivalent − import-time − not checked − skipped); "no tests"
mutants (in functions no selected test calls) count against it. `--survivors` lists the survivors not in the list.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

# mutmut's exit codes (mutmut/stats.py, 3.8): anything else is "suspicious"
STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests", 34: "skipped", 35: "suspicious",
          36: "timeout", 37: "caught by type check", -24: "timeout", 24: "timeout", 152: "timeout", 255: "timeout",
          -11: "segfault", -9: "segfault", None: "not checked"}
ROOT = Path(__file__).resolve().parent.parent


def equivalent_mutants(path: Path) -> dict[str, str]:
    """{mutant name: category} from `name  category: reason` lines ('#' starts a comment line)."""
    out = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                name, _, reason = line.strip().partition(" ")
                category = reason.strip().partition(":")[0]
                if category not in ("equivalent", "import-time"):
                    raise SystemExit(f"{path}: {name}: the reason must start with 'equivalent:' or 'import-time:'")
                out[name] = category
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mutants", default=str(ROOT / "mutants"))
    p.add_argument("--equivalent", default=str(ROOT / "benchmarks" / "mutation_equivalent.txt"))
    p.add_argument("--survivors", action="store_true", help="list the survivors not marked equivalent")
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args(argv)
    equivalent = equivalent_mutants(Path(args.equivalent))
    metas = sorted(Path(args.mutants).rglob("*.py.meta"))
    if not metas:
        raise SystemExit(f"no mutmut results under {args.mutants}; run `make mutation` first")
    rows, total, survivors = {}, Counter(), []
    seen = set()
    for meta in metas:
        module = str(meta.relative_to(args.mutants))[: -len(".meta")]
        codes = json.loads(meta.read_text()).get("exit_code_by_key", {})
        if not codes:
            continue
        c = Counter()
        for name, code in codes.items():
            status = STATUS.get(code, "suspicious")
            if name in equivalent:
                seen.add(name)
                status = equivalent[name] if status in ("survived", "no tests") else status
            c[status] += 1
            if status in ("survived", "no tests", "suspicious"):
                survivors.append((name, status))
        c["all"] = len(codes)
        rows[module] = c
        total.update(c)
    stale = sorted(set(equivalent) - seen)

    def score(c: Counter) -> float:
        tested = c["all"] - c["equivalent"] - c["import-time"] - c["not checked"] - c["skipped"]
        return 100.0 * (c["killed"] + c["timeout"]) / tested if tested else float("nan")

    cols = ("all", "killed", "timeout", "survived", "no tests", "suspicious", "equivalent", "import-time",
            "not checked")
    print(f"| module | {' | '.join(cols)} | score |")
    print("|" + " --- |" * (len(cols) + 2))
    for module, c in rows.items():
        print(f"| {module} | {' | '.join(str(c[k]) for k in cols)} | {score(c):.1f}% |")
    print(f"| **all** | {' | '.join(str(total[k]) for k in cols)} | **{score(total):.1f}%** |")
    if stale:
        print(f"\nnote: {len(stale)} names in {args.equivalent} are not mutants of this run (source changed?): "
              + ", ".join(stale[:5]) + (" ..." if len(stale) > 5 else ""))
    if args.survivors:
        print(f"\n{len(survivors)} survivors not marked equivalent (`mutmut show <name>` prints the change):")
        for name, status in survivors:
            print(f"  {name}  ({status})")
    if args.json:
        figures = {m: dict(c, score=score(c)) for m, c in rows.items()}
        figures["all"] = dict(total, score=score(total))
        Path(args.json).write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
