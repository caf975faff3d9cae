"""Stage 5 (publish): not built yet."""

from __future__ import annotations

from sage_builder.errors import SageError
from sage_builder.stages.base import Stage, StageContext


class PublishStage(Stage):
    name = "publish"
    number = 5
    inputs = ("label",)

    def run(self, ctx: StageContext) -> None:
        raise SageError("stage 'publish' is not implemented yet")


STAGE = PublishStage()
