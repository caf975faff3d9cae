"""Stage 2 (prompts): not built yet."""

from __future__ import annotations

from sage_builder.errors import SageError
from sage_builder.stages.base import Stage, StageContext


class PromptsStage(Stage):
    name = "prompts"
    number = 2
    inputs = ("profiles",)

    def run(self, ctx: StageContext) -> None:
        raise SageError("stage 'prompts' is not implemented yet")


STAGE = PromptsStage()
