"""LLM instructions as versioned text files under ``prompts/``.

A template file holds chat messages as sections headed ``### system`` / ``### user`` /
``### assistant``; ``{{name}}`` placeholders are filled at render time. The file's sha256 is part
of the key of everything produced from it, so editing a template re-runs exactly what it affects.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from sage_builder.errors import ConfigError
from sage_builder.store import file_sha256

_SECTION = re.compile(r"^###\s*(system|user|assistant)\s*$", re.MULTILINE)
_PLACEHOLDER = re.compile(r"\{\{\s*(\w+)\s*\}\}")


@dataclass(frozen=True)
class PromptTemplate:
    path: Path
    sha256: str
    messages: tuple[tuple[str, str], ...]

    @property
    def variables(self) -> set[str]:
        return {m for _, text in self.messages for m in _PLACEHOLDER.findall(text)}

    def render(self, **values: Any) -> list[dict[str, str]]:
        missing = self.variables - values.keys()
        if missing:
            raise ValueError(f"template {self.path.name} needs {sorted(missing)}")

        def fill(text: str) -> str:
            return _PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), text)

        return [{"role": role, "content": fill(text)} for role, text in self.messages]


@cache
def _load(path: Path, mtime_ns: int) -> PromptTemplate:
    text = path.read_text(encoding="utf-8")
    parts = _SECTION.split(text)
    if len(parts) < 3:
        raise ConfigError(f"{path}: a template needs at least one '### user' section")
    messages = tuple((parts[i], parts[i + 1].strip()) for i in range(1, len(parts) - 1, 2))
    return PromptTemplate(path=path, sha256=file_sha256(path), messages=messages)


def load_template(path: Path | str) -> PromptTemplate:
    path = Path(path).resolve()
    if not path.exists():
        raise ConfigError(f"{path}: template file not found (templates live in prompts/)")
    return _load(path, path.stat().st_mtime_ns)
