"""Memory of one host's Celery units; prints {unit: MiB} as JSON.

    python3 worker_memory.py UNIT_PREFIX ...

Sums the proportional set size (Pss) of every process of each systemd unit whose name starts
with one of the prefixes: pages that prefork children share with their parent count once in
all, not once per process as RSS would.
"""

import json
import os
import re
import sys

prefixes = tuple(sys.argv[1:])
units = {}
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        with open(f"/proc/{pid}/cgroup") as cgroup:
            unit = next((m[1] for m in re.finditer(r"/([^/\n]+\.service)$", cgroup.read(), re.M)), None)
        if not unit or not unit.startswith(prefixes):
            continue
        with open(f"/proc/{pid}/smaps_rollup") as rollup:
            pss_kib = int(re.search(r"^Pss:\s+(\d+) kB", rollup.read(), re.M)[1])
    except (FileNotFoundError, ProcessLookupError):
        continue  # the process ended meanwhile
    units[unit] = units.get(unit, 0) + pss_kib
print(json.dumps({unit: round(kib / 1024, 1) for unit, kib in sorted(units.items())}))
