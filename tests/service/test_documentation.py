"""The README's configuration table names every setting the backend and its start script read."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def settings_read() -> set[str]:
    """Variable names ``backend/settings.py`` reads and ``scripts/start.sh`` expands."""
    source = (ROOT / "backend" / "settings.py").read_text()
    names = set(re.findall(r'_(?:text|number|flag)\(\s*env,\s*"([A-Z_]+)"', source))
    script = (ROOT / "scripts" / "start.sh").read_text()
    names |= set(re.findall(r"\$\{([A-Z_]+):-", script))
    return names


def test_every_setting_read_is_in_the_readme_configuration_table():
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## Configuration") :]
    table = table[: table.index("\n\n", table.index("| variable"))]

    names = settings_read()
    missing = sorted(name for name in names if f"`{name}`" not in table)

    assert len(names) > 20  # the patterns still find what the code reads
    assert missing == []
