"""Stage 3 (render): not built yet."""

from __future__ import annotations

from sage_builder.errors import SageError
from sage_builder.stages.base import Stage, StageContext


class RenderStage(Stage):
    name = "render"
    number = 3
    inputs = ("prompts",)

    def run(self, ctx: StageContext) -> None:
        raise SageError("stage 'render' is not implemented yet")


STAGE = RenderStage()
