"""Request bodies of the workbench's HTTP API (pydantic: a body that does not fit is refused with 422 before any
work). Coordinates are voxel indices: ``x`` column, ``y`` row, ``z`` slice (array axis 0)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field, FiniteFloat

Label = Annotated[int, Field(ge=1, le=255, description="the label value being edited (task's labels, not 0)")]
Slice = Annotated[int | None, Field(ge=0, description="slice index (array axis 0) of a volume; None for 2D")]
Point = tuple[FiniteFloat, FiniteFloat]


class SessionRequest(BaseModel):
    """Open a session on ``image_id``; it starts from the finished label map, else (``use_draft``) the draft."""

    image_id: str
    use_draft: bool = True


class BoxPrompt(BaseModel):
    """A box ``[x0, y0, x1, y1]`` (voxel columns and rows, edges) on a 2D image or on slice ``z`` of a volume."""

    type: Literal["box"]
    label: Label = 1
    box: tuple[FiniteFloat, FiniteFloat, FiniteFloat, FiniteFloat]
    z: Slice = None


class Box3dPrompt(BaseModel):
    """A 3D box ``[x0, y0, z0, x1, y1, z1]`` (z inclusive) on a volume, propagated through its slices."""

    type: Literal["box3d"]
    label: Label = 1
    box: tuple[FiniteFloat, FiniteFloat, FiniteFloat, FiniteFloat, FiniteFloat, FiniteFloat]


class ClickPrompt(BaseModel):
    """A click at column ``x``, row ``y``: ``positive`` (the object is here) or negative."""

    type: Literal["click"]
    label: Label = 1
    x: FiniteFloat
    y: FiniteFloat
    positive: bool = True
    z: Slice = None


class ScribblePrompt(BaseModel):
    """A polyline ``[[x, y], ...]``, taken as a few clicks spread along it."""

    type: Literal["scribble"]
    label: Label = 1
    points: list[Point] = Field(min_length=1, max_length=10000)
    positive: bool = True
    z: Slice = None


class UndoPrompt(BaseModel):
    """Back to the label map before the last prompt or edit."""

    type: Literal["undo"]


PromptBody = BoxPrompt | Box3dPrompt | ClickPrompt | ScribblePrompt | UndoPrompt
Prompt = Annotated[PromptBody, Field(discriminator="type")]


class ExportRequest(BaseModel):
    """Export the finished annotations as ``.medseg/exports/<target>`` (a name: letters, digits, ``._-``)."""

    target: str
