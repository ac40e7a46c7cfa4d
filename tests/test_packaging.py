"""The dependency floors that setup.cfg declares are the versions the suite has been run at: tests/minimum_versions.txt
pins each of them, for `pip install -e ".[test]" -c tests/minimum_versions.txt` (README, "Requirements")."""

import configparser
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def _declared() -> dict[str, Requirement]:
    """install_requires and the test extra of setup.cfg, by canonical name."""
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    lines = setup["options"]["install_requires"].splitlines() + setup["options.extras_require"]["test"].splitlines()
    requirements = [Requirement(line) for line in lines if line.strip()]
    return {canonicalize_name(r.name): r for r in requirements}


def _pinned() -> dict[str, Version]:
    pins = {}
    for line in (ROOT / "tests" / "minimum_versions.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = Version(version)
    return pins


def test_minimum_versions_pin_each_declared_floor():
    declared, pinned = _declared(), _pinned()
    assert set(pinned) == set(declared)
    for name, requirement in declared.items():
        (floor,) = [Version(spec.version) for spec in requirement.specifier if spec.operator == ">="]
        assert pinned[name] == floor, (name, str(requirement), str(pinned[name]))
        assert pinned[name] in requirement.specifier, name  # and the pin is allowed (e.g. below transformers' <6)
