"""Stage 2 commands: ``sage prompts clip-tokenizer``, ``sage prompts check-pairs``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from sage_builder.cli_util import handle_errors


def register(app: typer.Typer) -> None:
    prompts_app = typer.Typer(help="Stage 2 (prompts) tools.", no_args_is_help=True)

    @prompts_app.command("clip-tokenizer")
    @handle_errors
    def clip_tokenizer(out: Path = typer.Option(Path(".cache/models/clip-tokenizer"), help="folder to write"),
                       bpe: Path | None = typer.Option(None, help="local bpe_simple_vocab_16e6.txt.gz "
                                                                  "(default: from the open_clip wheel on PyPI)")
                       ) -> None:
        """Build the real CLIP tokenizer offline, for prompts.clip_tokenizer (token counts of stage 2)."""
        from sage_builder.models.clip_tokenizer import save_clip_tokenizer

        typer.echo(str(save_clip_tokenizer(out, bpe)))

    @prompts_app.command("check-pairs")
    @handle_errors
    def check_pairs(csv_file: Path = typer.Argument(..., help="CSV with category, concept, idx, prompt_unsafe, "
                                                                "prompt_safe (the published sample's columns)"),
                    config_path: Path = typer.Option(..., "--config", "-c", help="pipeline YAML whose prompts.* "
                                                                                  "checks and CLIP tokenizer apply"),
                    overrides: Optional[list[str]] = typer.Option(None, "--set", help="override a config key: "
                                                                                       "KEY=VALUE (repeatable)"),
                    report: Optional[Path] = typer.Option(None, help="also write the acceptance per category and "
                                                                     "per check as JSON here")) -> None:
        """Judge a CSV of pairs with a pipeline's pair checks: one line per rejected pair, then acceptance."""
        from sage_builder.config import load_config
        from sage_builder.stages.prompts.audit import audit_pairs, read_pairs_csv
        from sage_builder.stages.prompts.stage import STAGE
        from sage_builder.stages.prompts.validate import validator_for
        from sage_builder.store import atomic_write_text

        config = load_config(config_path, overrides)
        pairs = read_pairs_csv(csv_file)
        audit = audit_pairs(pairs, validator_for(config.prompts, STAGE.token_counter(config).load()))
        for line in audit.rejected:
            typer.echo(line)
        if report is not None:
            atomic_write_text(report, json.dumps(audit.report(), indent=2) + "\n")
        typer.echo(audit.summary_line())

    app.add_typer(prompts_app, name="prompts")
