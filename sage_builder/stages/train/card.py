"""The adapter folder's model card (``README.md``) and its portable references.

Nothing in the folder names a path of the machine it was trained on: the base model is a hub id or a
local folder's name plus its content identity, and the run's own dataset is recorded relative to the
run directory (``label/dataset`` from ``RUN``, the adapter's ``../..``). ``resolve_*`` turn those
references back into something loadable, from any working directory, before any model is loaded.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from sage_builder.config_base import model_identity
from sage_builder.errors import SageError
from sage_builder.runtime import is_local_path

log = logging.getLogger("sage.train")
RUN_DATASET = "label/dataset"


def base_model_refs(model: str, revision: str | None) -> dict[str, Any]:
    """``base_model`` (hub id, or the folder's name), ``base_model_identity`` and revision."""
    if Path(model).is_dir():
        return {"base_model": Path(model).resolve().name, "base_model_identity": model_identity(model),
                "base_model_revision": None}
    return {"base_model": model, "base_model_identity": model, "base_model_revision": revision}


def dataset_refs(configured: str | None, identity: str) -> dict[str, Any]:
    """The run's own dataset relative to the run dir; a hub id as it is; a local folder by its name only."""
    if configured is None:
        return {"dataset": RUN_DATASET, "dataset_base": "run", "dataset_identity": identity}
    if is_local_path(configured):
        return {"dataset": Path(configured).resolve().name, "dataset_base": "local", "dataset_identity": identity}
    return {"dataset": configured, "dataset_base": "hub", "dataset_identity": identity}


def run_dir_of(adapter_dir: Path) -> Path:
    return Path(adapter_dir).resolve().parent.parent


def resolve_dataset(adapter_dir: Path, config: Any, given: str | None) -> str:
    """Where ``--user/--level/--grid`` read users from: ``--dataset``, else what the adapter records."""
    if given:
        if is_local_path(given) and not Path(given).expanduser().is_dir():
            raise SageError(f"--dataset {given}: no such dataset folder")
        return str(Path(given).expanduser()) if is_local_path(given) else given
    recorded, base = config.dataset, config.dataset_base
    if recorded and base == "hub":
        return recorded
    if recorded and base == "run":
        candidate = run_dir_of(adapter_dir) / recorded
        if candidate.is_dir():
            return str(candidate)
        raise SageError(f"{adapter_dir}: trained on its run's {recorded}, which is not at {candidate} (the adapter "
                        f"folder was copied out of its run); pass --dataset DIR or a hub id")
    if recorded and base is None and Path(recorded).is_dir():  # an adapter from before issue 16
        return recorded
    what = f"the local dataset folder '{recorded}'" if recorded else "a dataset it does not record"
    raise SageError(f"{adapter_dir}: trained on {what}; pass --dataset DIR or a hub id")


def resolve_base_model(adapter_dir: Path, config: Any, given: str | None) -> str:
    """The base pipeline: ``--model``, a recorded hub id, or the adapter's run's ``train.model`` when
    its content identity matches; a copied adapter of a local model needs ``--model``."""
    identity = config.base_model_identity
    if given:
        if is_local_path(given):
            if not (Path(given).expanduser() / "model_index.json").exists():
                raise SageError(f"--model {given}: not a diffusers pipeline folder (no model_index.json)")
            if identity and identity.startswith("local-model:") and model_identity(given) != identity:
                log.warning("--model %s: its content identity %s differs from the one the adapter was trained "
                            "with (%s)", given, model_identity(given), identity)
        return given
    recorded = config.base_model
    if not recorded:
        raise SageError(f"{adapter_dir}: the adapter config records no base model; pass --model")
    if identity is None and Path(recorded).is_dir():  # an adapter from before issue 16
        return recorded
    if identity and not identity.startswith("local-model:"):
        return recorded
    for model in _run_base_models(run_dir_of(adapter_dir)):
        if Path(model).is_dir() and model_identity(model) == identity:
            return model
    raise SageError(f"{adapter_dir}: trained on the local model folder '{recorded}' ({identity}); pass "
                    f"--model DIR (a copy of that folder)")


def _run_base_models(run: Path) -> list[str]:
    """The base models the adapter's run names: its train manifest's, then its config.yaml's ``train.model``."""
    found = []
    manifest = run / "train" / "manifest.json"
    if manifest.exists():
        try:
            found.append(json.loads(manifest.read_text())["models"]["base"]["id"])
        except (ValueError, KeyError, TypeError):
            pass
    saved = run / "config.yaml"
    if saved.exists():
        from sage_builder.config import load_config

        try:
            found.append(load_config(saved).train.model)
        except SageError:
            pass
    return [m for m in found if isinstance(m, str)]


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def adapter_card(adapter: dict[str, Any], *, lineage: dict[str, Any], records: dict[str, int],
                 evaluation: dict[str, Any], embedding_model: str, categories: list[str]) -> str:
    """The model card: what the adapter is, what it was trained on, how to load it, and the warning."""
    base = adapter["base_model"]
    identity = adapter.get("base_model_identity")
    base_line = f"`{base}`" + (f" (local folder, content identity `{identity}`)" if identity and
                               identity.startswith("local-model:") else "")
    training = adapter.get("training", {})
    accuracy = evaluation.get("implicit_accuracy")
    eval_lines = "not evaluated (no held-out records)"
    if accuracy is not None:
        eval_lines = (f"implicit accuracy {accuracy:.3f} on {evaluation['records']} held-out record(s) of "
                      f"`{evaluation.get('split')}` (chance {evaluation.get('chance_level', 0.5)}; ties count half)")
        by_reason = evaluation.get("by_reason") or {}
        if by_reason:
            eval_lines += "; " + ", ".join(f"{name} {v['implicit_accuracy']:.3f} ({v['records']})"
                                           for name, v in by_reason.items())
    lineage_rows = [[stage, f"`{v.get('content_hash')}`", f"`{v.get('fingerprint')}`"] for stage, v in lineage.items()]
    record_rows = [[split, n] for split, n in records.items()]
    dataset = adapter.get("dataset")
    dataset_line = {"run": f"the run's own `{dataset}` (relative to the run directory)",
                    "hub": f"the Hub dataset `{dataset}`"}.get(adapter.get("dataset_base") or "",
                                                             f"the local dataset folder `{dataset}`")
    return f"""---
library_name: diffusers
base_model: {base if identity == base else "null"}
tags:
- not-for-all-audiences
- personalized-safety
- text-to-image
- user-adapter
---

# Sage user adapter ({adapter.get("backbone")})

> **Content warning.** This adapter was trained on Sage, a dataset of harmful prompts and images (hate,
> harassment, violence, self-harm, sexuality, shocking content, propaganda) by design. It steers a
> text-to-image model per simulated user; it is not a safety filter, and the base model can still produce
> harmful images. Use it for research on personalized safety alignment only.

A user-conditioned cross-attention adapter (PSA, arXiv 2508.01151): the user embedding is projected to
{adapter["n_tokens"]} user token(s) of width {adapter["cross_attention_dim"]}, attended to in each of the
{len(adapter["layers"])} cross-attention layers through the adapter's own key/value projections (scale
{adapter.get("scale")}), trained with Diffusion-DPO against the frozen base model.

- Base model: {base_line}{f", revision `{adapter['base_model_revision']}`" if adapter.get("base_model_revision") else ""}
- User tokens: {adapter["n_tokens"]}; user embedding dimension {adapter["embedding_dim"]}, made by `{embedding_model}`
  (stage 1: the profile statement through the LLM, last hidden layer, mean-pooled)
- Trained on: {dataset_line}; categories {", ".join(categories) or "unknown"}
- Training: {training.get("steps")} steps, {training.get("optimizer")} lr {training.get("learning_rate")},
  beta {training.get("beta")}, {training.get("resolution")} px
- Held-out: {eval_lines}

## Data lineage

Manifest hashes of the run this adapter was trained from (dataset fingerprint
`{training.get("dataset_fingerprint")}`):

{_table(["stage", "manifest hash", "fingerprint"], lineage_rows) if lineage_rows else "not recorded"}

Records read:

{_table(["split", "records"], record_rows) if record_rows else "not recorded"}

## Loading

With sage-builder installed (its repository: `pip install -e .`), from any directory:

```bash
sage generate --adapter path/to/adapter --level 5 --prompt "a crowded city street at night" --out level5.png
# a copied adapter folder: name the base model and the dataset holding the user embeddings
sage generate --adapter path/to/adapter --model BASE_MODEL --dataset DATASET --user 0000001 --prompt "..."
```

Without it (torch, diffusers and safetensors only; `sage_user_adapter.py` is in this folder):

```python
import sys
import numpy as np
import torch
from datasets import load_dataset  # only to read the user embeddings
from diffusers import {"StableDiffusionXLPipeline" if adapter.get("backbone") == "sdxl" else "StableDiffusionPipeline"} as Pipeline

sys.path.insert(0, "path/to/adapter")
from sage_user_adapter import load_user_adapter

pipe = Pipeline.from_pretrained("BASE_MODEL")  # the base model above
adapter = load_user_adapter(pipe.unet, "path/to/adapter")
users = load_dataset("DATASET", "users", split="train")
embedding = np.asarray(users.filter(lambda u: u["level"] == 5)[0]["embedding"], dtype=np.float32)
image = pipe("a crowded city street at night", cross_attention_kwargs=adapter.kwargs(embedding)).images[0]
```

`adapter.kwargs(None)` renders with the adapter off (the base model). diffusers' `load_ip_adapter` does not
read this format: IP-Adapter expects an image encoder and image-projection weights; this adapter is
conditioned on a user embedding instead. The tensor names and shapes are in `docs/adapter.md` of sage-builder.
"""
