"""Own-code fixes among a revise step's checked revisions: per error, whether some passing revision
is closer (normalised Levenshtein, as seedflow's `similarity`) to its error code than to the reference."""
import json, sys
from difflib import SequenceMatcher

def lev(a, b):
    if len(a) < len(b): a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]

def tidy(code):
    return "\n".join(l.rstrip() for l in code.replace("\r\n", "\n").split("\n")).rstrip()

def sim(a, b):
    a, b = tidy(a), tidy(b)
    n = max(len(a), len(b))
    return 1.0 if n == 0 else 1 - lev(a, b) / n

checked = [json.loads(l) for l in open(sys.argv[1])]
errors = {v["parent"]["sample_id"] for v in checked}
fixed, own, issue_def = set(), set(), set()
passing = own_pass = 0
for v in checked:
    if v["status"] != "passed":
        continue
    passing += 1
    p, r, c = v["parent"]["code"], v["task"]["reference"], v["code"]
    sp, sr = sim(c, p), sim(c, r)
    fixed.add(v["parent"]["sample_id"])
    if sp > sr:
        own.add(v["parent"]["sample_id"]); own_pass += 1
    if SequenceMatcher(None, p, c).ratio() > 0.7 and SequenceMatcher(None, r, c).ratio() <= 0.9:
        issue_def.add(v["parent"]["sample_id"])
print(f"{len(errors)} errors, {len(checked)} revisions, {passing} passing; errors fixed {len(fixed)}; "
      f"own-code fixes (closer to the error code than the reference) {len(own)} errors / {own_pass} revisions; "
      f"issue 24's definition (>0.7 to the error code, <=0.9 to the reference, difflib) {len(issue_def)} errors")
