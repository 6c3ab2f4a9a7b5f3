"""Fails when the GitLab template's Molecule matrix and the scenarios in molecule/ differ.

GitLab's `parallel: matrix` needs the scenarios written out (the GitHub workflow lists them
itself), so `make ci-templates` runs this: a scenario added or removed cannot be left out.
"""

import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = "ci-templates/gitlab-ci.yml"

scenarios = {path.parent.name for path in ROOT.glob("molecule/*/molecule.yml")}
matrix = yaml.safe_load((ROOT / TEMPLATE).read_text())["molecule"]["parallel"]["matrix"]
listed = {name for row in matrix for name in row["SCENARIO"]}
problems = [
    f"{TEMPLATE}: scenario {name} (molecule/{name}/molecule.yml) is missing from molecule.parallel.matrix"
    for name in sorted(scenarios - listed)
] + [
    f"{TEMPLATE}: scenario {name} is in molecule.parallel.matrix but molecule/{name}/molecule.yml does not exist"
    for name in sorted(listed - scenarios)
]
print("\n".join(problems) or f"{TEMPLATE}: its Molecule matrix lists the {len(scenarios)} scenarios of molecule/")
sys.exit(1 if problems else 0)
