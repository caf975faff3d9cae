"""The building blocks of config sections: strict models, execution-only fields, path and model types.

Kept apart from :mod:`sage_builder.config` (which assembles the stage sections into one tree) so a
stage's section can be imported on its own, e.g. when a Ray worker unpickles a ``RenderConfig``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo

from sage_builder import PROJECT_ROOT


def _resolve_path(value: Path, info: ValidationInfo) -> Path:
    base = (info.context or {}).get("base_dir")
    value = Path(os.path.expanduser(str(value)))
    if base is not None and not value.is_absolute():
        value = (Path(base) / value).resolve()
    return value


def _resolve_model_ref(value: str | None, info: ValidationInfo) -> str | None:
    """A model is a hub id (``org/name``) or a local folder; local-looking values become absolute."""
    if value is None:
        return None
    if value.startswith(("./", "../", "/", "~")) or value in {".", ".."}:
        return str(_resolve_path(Path(value), info))
    return value


ConfigPath = Annotated[Path, AfterValidator(_resolve_path)]
ModelRef = Annotated[str, AfterValidator(_resolve_model_ref)]
OptionalModelRef = Annotated[str | None, AfterValidator(_resolve_model_ref)]


def execution(default: Any = ..., description: str = "", **kwargs: Any) -> Any:
    """A setting that changes how work is scheduled, never what it produces (not hashed)."""
    return Field(default, description=description, json_schema_extra={"execution": True}, **kwargs)


def project_file(*parts: str) -> Path:
    return PROJECT_ROOT.joinpath(*parts)


class StrictModel(BaseModel):
    """Unknown keys are errors: a typo must not silently fall back to a default."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


def _is_model_ref(field: Any) -> bool:
    return any(getattr(m, "func", None) is _resolve_model_ref for m in field.metadata)


@functools.lru_cache(maxsize=64)
def _local_model_identity(path: str, mtime_ns: int) -> str:
    root = Path(path)
    entries: list[Any] = []
    for file in sorted(root.rglob("*")):
        rel = file.relative_to(root)
        if not file.is_file() or any(part.startswith(".") for part in rel.parts):
            continue
        size = file.stat().st_size
        if file.suffix in {".json", ".txt", ".jinja"} and size < 8_000_000:
            entries.append([rel.as_posix(), hashlib.sha256(file.read_bytes()).hexdigest()])
        else:
            entries.append([rel.as_posix(), size])
    payload = json.dumps(entries, separators=(",", ":")).encode()
    return "local-model:" + hashlib.sha256(payload).hexdigest()[:32]


def model_identity(value: str) -> str:
    """A local model folder hashes by its content (configs, tokenizer files, weight sizes), not its
    path, so that the same model in another clone gives the same item keys and sampling seeds."""
    path = Path(value)
    if path.is_dir():
        return _local_model_identity(str(path.resolve()), path.stat().st_mtime_ns)
    return value


def public_model_ref(value: str) -> str:
    """How a model is named in anything that leaves the machine (cards, published manifests, shards,
    adapter configs): a hub id as it is; a local folder as its folder name and content identity,
    never its path (which would leak a home directory and differ between clones)."""
    path = Path(value)
    if path.is_dir():
        return f"{path.resolve().name} ({model_identity(value)})"
    return value


def hashable_dump(model: BaseModel) -> dict[str, Any]:
    """The model as plain data without execution-only fields, for hashing."""
    out: dict[str, Any] = {}
    for name, field in type(model).model_fields.items():
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        if extra.get("execution"):
            continue
        value = getattr(model, name)
        if isinstance(value, str) and _is_model_ref(field):
            out[name] = model_identity(value)
        elif isinstance(value, BaseModel):
            out[name] = hashable_dump(value)
        elif isinstance(value, (list, tuple)):
            out[name] = [hashable_dump(v) if isinstance(v, BaseModel) else _plain(v) for v in value]
        elif isinstance(value, dict):
            out[name] = {k: hashable_dump(v) if isinstance(v, BaseModel) else _plain(v) for k, v in value.items()}
        else:
            out[name] = _plain(value)
    return out


def _plain(value: Any) -> Any:
    return str(value) if isinstance(value, Path) else value


def unknown_key_hint(root: type[BaseModel], dotted: list[str]) -> str | None:
    """For a key path the schema lacks: which part is unknown and the closest known names (difflib),
    e.g. "no key 'n_user' in profiles; did you mean 'n_users'?". None when every part exists."""
    import difflib

    model: Any = root
    for depth, key in enumerate(dotted):
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return None  # below a free-form value (a dict, a list): not the schema's to judge
        if key not in model.model_fields:
            where = ".".join(dotted[:depth]) or "the top level"
            close = difflib.get_close_matches(key, list(model.model_fields), n=2, cutoff=0.6)
            hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else \
                f"; known keys: {', '.join(sorted(model.model_fields))}"
            return f"no key '{key}' in {where}{hint}"
        model = model.model_fields[key].annotation
    return None

