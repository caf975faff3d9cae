"""Stage 4 (label): not built yet."""

from __future__ import annotations

from sage_builder.errors import SageError
from sage_builder.stages.base import Stage, StageContext


class LabelStage(Stage):
    name = "label"
    number = 4
    inputs = ("profiles", "prompts", "render",)

    def run(self, ctx: StageContext) -> None:
        raise SageError("stage 'label' is not implemented yet")


STAGE = LabelStage()
