"""Stage 6 (train): not built yet."""

from __future__ import annotations

from sage_builder.errors import SageError
from sage_builder.stages.base import Stage, StageContext


class TrainStage(Stage):
    name = "train"
    number = 6
    inputs = ("label",)

    def run(self, ctx: StageContext) -> None:
        raise SageError("stage 'train' is not implemented yet")


STAGE = TrainStage()
