"""The dense method: compute everything (the baseline every other method is measured against)."""

from dataclasses import dataclass

from ..settings import Settings
from .base import Method


@dataclass(frozen=True)
class DenseSettings(Settings):
    method = "dense"


class Dense(Method):
    name = "dense"
    Settings = DenseSettings
    summary = "every block computed (the reference)"
    sparse = False

    def plan(self, q, k, ctx, settings, v=None):
        return None, {}
