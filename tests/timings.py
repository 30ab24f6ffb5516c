# SPDX-License-Identifier: Apache-2.0
"""Print the per-tier time summary written by tests/conftest.py (one JSON file per session)."""

import json
import sys
from collections import defaultdict
from pathlib import Path

totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
for path in sorted(Path(sys.argv[1]).glob("*.json")):
    for tier, (seconds, count) in json.loads(path.read_text()).items():
        totals[tier][0] += seconds
        totals[tier][1] += count
print(f"\n{'tier':<14} {'tests':>6} {'seconds':>9}")
for tier, (seconds, count) in sorted(totals.items()):
    print(f"{tier:<14} {count:>6} {seconds:>9.1f}")
print(f"{'total':<14} {sum(c for _, c in totals.values()):>6} {sum(s for s, _ in totals.values()):>9.1f}")
