"""Stage 1 (profiles): not built yet."""

from __future__ import annotations

from sage_builder.errors import SageError
from sage_builder.stages.base import Stage, StageContext


class ProfilesStage(Stage):
    name = "profiles"
    number = 1
    inputs = ()

    def run(self, ctx: StageContext) -> None:
        raise SageError("stage 'profiles' is not implemented yet")


STAGE = ProfilesStage()
