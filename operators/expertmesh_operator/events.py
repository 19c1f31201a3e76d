"""Kubernetes Events the pure decisions emit; the I/O layer posts them on the Model."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class Event(BaseModel):
    model_config = ConfigDict(frozen=True)

    model: str = Field("", description="the Model's metadata.name; filled in by reconcile")
    type: Literal["Normal", "Warning"] = "Normal"
    reason: str
    message: str
