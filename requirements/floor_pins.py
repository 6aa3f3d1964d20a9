"""Print the lowest version each direct requirement allows (``name==floor``), for `make test-floor`.

Reads pyproject.toml's dependencies and the given extras; a requirement without a floor is
left out (pip then resolves it as usual).
"""

import re
import sys
import tomllib
from pathlib import Path

project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
requirements = list(project["dependencies"])
for extra in sys.argv[1:]:
    requirements += project["optional-dependencies"][extra]
pins = {}
for requirement in requirements:
    match = re.match(r"^([A-Za-z0-9_.\-]+)\s*[^;]*?>=\s*([^,;\s]+)", requirement)
    if match:
        pins[match.group(1).lower()] = match.group(2)
print("\n".join(f"{name}=={version}" for name, version in sorted(pins.items())))
