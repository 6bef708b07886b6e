"""Mutation score per module from a finished `mutmut run` (the `mutants/` folder), with the mutants listed in
`benchmarks/mutation_equivalent.txt` taken out.

    python benchmarks/mutation_score.py [--survivors] [--json out.json]

The list has one mutant per line: its name, then `equivalent: <why no test can tell it apart>`, `import-time: <why>`
(code that runs when the module is imported, before mutmut switches a mutant on, so no test run can see the mutant),
`cuda-only: <why>` (a line that runs only with a CUDA device; tests/test_cuda.py covers it on a GPU machine) or
`multi-process: <why>` (a line that matters only when another process of a group fails; tests/test_distributed.py
covers it, but spawns processes and is too slow to run per mutant). score = (killed + timeout) / (all − those four
− not checked − skipped); "no tests"
mutants (in functions no selected test calls) count against it. `--survivors` lists the survivors not in the list.

A full run takes many core-hours on a 2-core machine (a surviving mutant runs every test that calls its function;
mutmut runs the cheapest mutants first, so the tail is the slow part). When a run cannot finish, a uniform random
sample of the mutants still unchecked estimates the rest:

    python benchmarks/mutation_score.py --draw-sample 300 --seed 0      # writes benchmarks/mutation_sample.txt
    mutmut run $(grep -v '^#' benchmarks/mutation_sample.txt)           # checks just those
    python benchmarks/mutation_score.py                                  # exact part + estimated rest, with a 95% CI

The estimate is stratified: the mutants checked before the draw count exactly; the drawn ones stand for all the
mutants that were unchecked at the draw (listed in benchmarks/mutation_population.txt). Once every mutant is checked
the files are ignored and the score is exact.
"""

from __future__ import annotations

import argparse
import json
import math
import random
from collections import Counter
from pathlib import Path

# mutmut's exit codes (mutmut/stats.py, 3.8): anything else is "suspicious"
STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests", 34: "skipped", 35: "suspicious",
          36: "timeout", 37: "caught by type check", -24: "timeout", 24: "timeout", 152: "timeout", 255: "timeout",
          -11: "segfault", -9: "segfault", None: "not checked"}
ROOT = Path(__file__).resolve().parent.parent
# why a mutant is left out of the score: no test can tell it apart; it changes code that runs at import, before
# mutmut switches it on; it changes a line that only runs with a CUDA device (tests/test_cuda.py, not on this machine);
# it changes what happens only when another process of a group fails (tests/test_distributed.py spawns processes, too
# slow to run once per mutant, so it is not in the mutation selection)
CATEGORIES = ("equivalent", "import-time", "cuda-only", "multi-process")


def equivalent_mutants(path: Path) -> dict[str, str]:
    """{mutant name: category} from `name  category: reason` lines ('#' starts a comment line)."""
    out = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                name, _, reason = line.strip().partition(" ")
                category = reason.strip().partition(":")[0]
                if category not in CATEGORIES:
                    raise SystemExit(f"{path}: {name}: the reason must start with one of "
                                     + ", ".join(f"'{c}:'" for c in CATEGORIES))
                out[name] = category
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mutants", default=str(ROOT / "mutants"))
    p.add_argument("--equivalent", default=str(ROOT / "benchmarks" / "mutation_equivalent.txt"))
    p.add_argument("--survivors", action="store_true", help="list the survivors not marked equivalent")
    p.add_argument("--json", help="also write the figures to this file")
    p.add_argument("--sample", default=str(ROOT / "benchmarks" / "mutation_sample.txt"))
    p.add_argument("--draw-sample", type=int, metavar="N", help="draw N of the unchecked mutants into --sample")
    p.add_argument("--seed", type=int, default=0)
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
    if args.draw_sample:
        return draw_sample(metas, args.mutants, Path(args.sample), args.draw_sample, args.seed)

    def score(c: Counter) -> float:
        tested = c["all"] - sum(c[k] for k in CATEGORIES) - c["not checked"] - c["skipped"]
        return 100.0 * (c["killed"] + c["timeout"]) / tested if tested else float("nan")

    cols = ("all", "killed", "timeout", "survived", "no tests", "suspicious", *CATEGORIES, "not checked")
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
    estimate = sampled_estimate(metas, Path(args.sample), equivalent) if total["not checked"] else None
    if estimate:
        e = estimate
        print(f"\nNot every mutant is checked: {e['exact_killed']}/{e['exact_tested']} killed outside the sample's "
              f"population, {e['sample_killed']}/{e['sample_tested']} in a uniform sample of {e['sample_size']} of "
              f"the {e['population']} unchecked at the draw ({e['sample_unchecked']} of the sample not yet checked). "
              f"Estimated score of all mutants: **{e['score']:.1f}%** (95% CI {e['low']:.1f}–{e['high']:.1f}%).")
    if args.json:
        figures = {m: dict(c, score=score(c)) for m, c in rows.items()}
        figures["all"] = dict(total, score=score(total))
        if estimate:
            figures["estimate"] = estimate
        Path(args.json).write_text(json.dumps(figures, indent=1))
    return 0


def _codes(metas) -> dict[str, int | None]:
    out = {}
    for meta in metas:
        out.update(json.loads(meta.read_text()).get("exit_code_by_key", {}))
    return out


def _names(path: Path) -> set[str]:
    return {ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")}


def _population_path(sample: Path) -> Path:
    return sample.with_name("mutation_population.txt")


def draw_sample(metas, mutants: str, path: Path, n: int, seed: int) -> int:
    """Write a uniform random sample of `n` unchecked mutants to `path`, and every unchecked mutant (the population
    it stands for) to mutation_population.txt beside it."""
    unchecked = sorted(name for name, code in _codes(metas).items() if code is None)
    if not unchecked:
        raise SystemExit("every mutant is checked: the score is exact, no sample is needed")
    drawn = sorted(random.Random(seed).sample(unchecked, min(n, len(unchecked))))
    path.write_text(f"# population: {len(unchecked)} unchecked mutants of {mutants} at the draw; seed {seed}\n"
                    + "\n".join(drawn) + "\n")
    _population_path(path).write_text(f"# the mutants unchecked when {path.name} was drawn (its population)\n"
                                      + "\n".join(unchecked) + "\n")
    print(f"drew {len(drawn)} of {len(unchecked)} unchecked mutants into {path}")
    return 0


def sampled_estimate(metas, path: Path, equivalent: dict[str, str]) -> dict | None:
    """Stratified estimate. Stratum A, the mutants outside the population (checked before the draw, or new since),
    counts exactly; stratum B, the population unchecked at the draw, is estimated from its uniform sample (the
    sample's killed share among its tested mutants). Population mutants checked outside the sample are not used
    (mutmut checks the cheap ones first, so they are no random sample). None without the two files."""
    population_path = _population_path(path)
    if not path.is_file() or not population_path.is_file():
        return None
    drawn, population = _names(path), _names(population_path)
    if not drawn:
        return None
    tally = {"exact": [0, 0], "sample": [0, 0]}  # [killed, tested]
    checked_in_sample = unchecked_in_sample = 0
    for name, code in _codes(metas).items():
        status = STATUS.get(code, "suspicious")
        if name in equivalent and status in ("survived", "no tests"):
            status = equivalent[name]
        if name in drawn:
            stratum = "sample"
        elif name in population:
            continue
        else:
            stratum = "exact"
        if status == "not checked":
            unchecked_in_sample += stratum == "sample"
            continue
        checked_in_sample += stratum == "sample"
        if status in (*CATEGORIES, "skipped"):
            continue
        tally[stratum][1] += 1
        tally[stratum][0] += status in ("killed", "timeout")
    (k_a, t_a), (k_s, t_s) = tally["exact"], tally["sample"]
    if not t_s:
        return None
    tested_b = len(population) * t_s / checked_in_sample  # the population's tested mutants, estimated

    def overall(p: float) -> float:
        return 100 * (k_a + tested_b * p) / (t_a + tested_b)

    # Wilson's 95% interval for the sample's killed share (it stays honest at 0 or 100%, where p ± 1.96·SE collapses)
    z, p = 1.96, k_s / t_s
    centre = (p + z * z / (2 * t_s)) / (1 + z * z / t_s)
    half = z / (1 + z * z / t_s) * math.sqrt(p * (1 - p) / t_s + z * z / (4 * t_s * t_s))
    return {"exact_killed": k_a, "exact_tested": t_a, "sample_killed": k_s, "sample_tested": t_s,
            "sample_size": len(drawn), "sample_unchecked": unchecked_in_sample, "population": len(population),
            "score": overall(p), "low": overall(centre - half), "high": overall(min(1.0, centre + half))}


if __name__ == "__main__":
    raise SystemExit(main())
