"""One virtualenv per peer library, built from the pinned sections of ``requirements-peers.txt``.

The peers cannot share one environment (arq requires redis<6, the others use redis 8), so every section
``# == name ==`` of the requirements file becomes ``benchmarks/.venv-peers/<name>``. A venv is rebuilt only
when its section changed (a stamp file holds the section's text).
"""

from __future__ import annotations

import subprocess
import sys
import venv
from pathlib import Path

__all__ = ["VENV_ROOT", "REQUIREMENTS", "ensure_venv", "python_for", "read_sections"]

HERE = Path(__file__).resolve().parent
VENV_ROOT = HERE / ".venv-peers"
REQUIREMENTS = HERE / "requirements-peers.txt"
_STAMP = "requirements.stamp"


def read_sections(path: Path = REQUIREMENTS) -> dict[str, list[str]]:
    """The requirement lines of each ``# == name ==`` section, by name (comments and blanks dropped)."""
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line.startswith("# ==") and line.endswith("=="):
            current = sections.setdefault(line.strip("#= ").strip(), [])
        elif line and not line.startswith("#"):
            if current is None:
                raise ValueError(f"{path}: requirement {line!r} is outside any '# == name ==' section")
            current.append(line)
    return sections


def python_for(name: str) -> Path:
    """The interpreter of the virtualenv for ``name`` (it may not exist yet)."""
    return VENV_ROOT / name / "bin" / "python"


def ensure_venv(name: str, *, log: bool = True) -> Path:
    """Create or update the virtualenv for section ``name`` and return its interpreter.

    Raises ``KeyError`` for an unknown section and ``RuntimeError`` when pip fails (its output is included).
    """
    sections = read_sections()
    if name not in sections:
        raise KeyError(f"no '# == {name} ==' section in {REQUIREMENTS}; known: {', '.join(sorted(sections))}")
    requirements = sections[name]
    home = VENV_ROOT / name
    stamp = home / _STAMP
    wanted = "\n".join(requirements) + "\n"
    python = python_for(name)
    if python.exists() and stamp.exists() and stamp.read_text() == wanted:
        return python
    if log:
        print(f"[setup] installing {name} into {home}: {' '.join(requirements)}", file=sys.stderr, flush=True)
    venv.EnvBuilder(with_pip=True, clear=True).create(home)
    result = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *requirements],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"pip could not install {name} into {home}:\n{result.stdout}\n{result.stderr}")
    stamp.write_text(wanted)
    return python


if __name__ == "__main__":
    for section in sys.argv[1:] or list(read_sections()):
        print(ensure_venv(section))
