"""Compares a kosoku (Autobahn) report with the committed baseline.

usage: conformance_compare.py REPORT_INDEX_JSON BASELINE [--update]

Each case's result is "behavior behaviorClose" (OK, NON-STRICT,
INFORMATIONAL, UNIMPLEMENTED, FAILED, ERROR). A case that is missing, FAILED
or ERROR, or that ranks below its baseline, fails the comparison (exit 1).
"""

import json
import sys

RANK = {"OK": 0, "NON-STRICT": 1, "INFORMATIONAL": 1, "UNIMPLEMENTED": 2, "FAILED": 3, "ERROR": 3}


def case_key(case):
    return [int(part) for part in case.split(".")]


def load_report(path):
    agents = json.load(open(path))
    (cases,) = agents.values()
    return {case: (r.get("behavior"), r.get("behaviorClose")) for case, r in cases.items()}


def load_baseline(path):
    baseline = {}
    for line in open(path):
        if line.strip() and not line.startswith("#"):
            case, behavior, close = line.split()
            baseline[case] = (behavior, close)
    return baseline


def rank(result):
    return max(RANK.get(v, 3) for v in result)


def main():
    report_path, baseline_path = sys.argv[1], sys.argv[2]
    report = load_report(report_path)
    if "--update" in sys.argv[3:]:
        with open(baseline_path, "w") as out:
            out.write("# Autobahn|Testsuite server cases 1-7, 9, 10, 12, 13 via kosoku 0.1.0: case behavior behaviorClose\n")
            for case in sorted(report, key=case_key):
                out.write("%s %s %s\n" % (case, *report[case]))
        print("baseline updated: %d cases" % len(report))
        return 0
    baseline = load_baseline(baseline_path)
    problems = []
    for case in sorted(baseline, key=case_key):
        got = report.get(case)
        if got is None:
            problems.append("%s: missing (baseline %s %s)" % (case, *baseline[case]))
        elif rank(got) >= 3 or rank(got) > rank(baseline[case]):
            problems.append("%s: %s %s (baseline %s %s)" % (case, *got, *baseline[case]))
    counts = {}
    for result in report.values():
        counts[result] = counts.get(result, 0) + 1
    summary = ", ".join("%d %s/%s" % (n, *r) for r, n in sorted(counts.items(), key=lambda kv: -kv[1]))
    print("conformance: %d cases: %s" % (len(report), summary))
    for problem in problems:
        print("  worse than baseline: " + problem)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
