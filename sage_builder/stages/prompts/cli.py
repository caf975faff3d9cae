"""Stage 2 commands: ``sage prompts clip-tokenizer``."""

from __future__ import annotations

from pathlib import Path

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

    app.add_typer(prompts_app, name="prompts")
