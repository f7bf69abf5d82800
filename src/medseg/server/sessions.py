"""Interactive sessions: one image, one label at a time, prompts in, a label map out.

A session starts from the image's draft (if any). For the label being edited, the user gives a box (2D), a 3D
box (volumes: propagated through its slices), clicks (positive or negative) or a scribble (its points, thinned);
each prompt refines the label's mask with the prompt engine, on the slice it was given on. Clicks on a label
that has a mask but no box (a draft) are prompted with the mask's bounding box on that slice, as if the user had
drawn it. Coordinates are voxel indices of the image: ``x`` column, ``y`` row, ``z`` slice (array axis 0).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from medseg.errors import MedsegError
from medseg.inference.engines import PromptEngine
from medseg.inference.prompt_input import ModelSlices
from medseg.inference.prompt_session import Prompts
from medseg.io import Image
from medseg.preprocessing.statistics import constant_value

BOX_MARGIN = 0.05  # a box widened to take a click outside it reaches this fraction of the image beyond the click
SCRIBBLE_POINTS = 6  # a scribble is thinned to this many clicks (SAM-family decoders take a few points)


class SessionLimit(MedsegError):
    """Too many open sessions (HTTP 503)."""


class UnknownSession(MedsegError):
    """No such session (HTTP 404)."""


@dataclass
class _Object:
    """The prompts of one label on one slice (``z`` None for 2D)."""

    box: tuple[float, float, float, float] | None = None
    points: list[tuple[float, float]] = field(default_factory=list)
    point_labels: list[int] = field(default_factory=list)


class Session:
    """Prompts on one image; ``labels`` is the label map so far (the draft's, or empty).

    Raises:
        MedsegError: a label value the task does not name.
    """

    def __init__(self, image_id: str, image: Image, engine: PromptEngine, labels: np.ndarray | None = None,
                 draft_engine: str | None = None) -> None:  # fmt: skip
        self.id = uuid.uuid4().hex
        self.image_id = image_id
        self.image = image
        self.engine = engine
        self.labels = np.zeros(image.shape, np.uint8) if labels is None else labels.astype(np.uint8).copy()
        self.draft_engine = draft_engine
        self.interactions = 0
        self.touched = time.monotonic()
        self._objects: dict[tuple[int, int | None], _Object] = {}
        self._undo: list[np.ndarray] = []
        self._normalised: ModelSlices | None = None

    # ---- prompts -------------------------------------------------------------------------------------------
    def box(self, label: int, box: tuple[float, float, float, float], z: int | None = None) -> np.ndarray:
        """A box ``(x0, y0, x1, y1)`` for ``label`` (on slice ``z`` of a volume: that slice only); it starts the
        label's prompts on that slice afresh. Returns the label map."""
        self._key(label, z)
        return self._run(label, z, _Object(box=tuple(float(v) for v in box)))  # type: ignore[arg-type]

    def box3d(self, label: int, box: tuple[float, float, float, float, float, float]) -> np.ndarray:
        """A 3D box ``(x0, y0, z0, x1, y1, z1)`` (z inclusive) for ``label``, propagated through its slices."""
        if self.image.ndim != 3:
            raise MedsegError("a 3D box is for volumes; this image is 2D")
        self._check_label(label)
        mask = self._predict(Prompts(boxes3d=[tuple(float(v) for v in box)]))  # type: ignore[list-item]
        self._apply(label, mask, None)
        return self.labels

    def click(self, label: int, x: float, y: float, positive: bool = True, z: int | None = None) -> np.ndarray:
        """A positive (the object is here) or negative (it is not) click for ``label``."""
        obj = self._prompts_of(label, z)
        obj.points.append((float(x), float(y)))
        obj.point_labels.append(1 if positive else 0)
        return self._run(label, z, obj)

    def scribble(self, label: int, points: list[tuple[float, float]], positive: bool = True,
                 z: int | None = None) -> np.ndarray:  # fmt: skip
        """A scribble (a polyline of ``(x, y)``), taken as `SCRIBBLE_POINTS` clicks spread along it."""
        if not points:
            raise MedsegError("a scribble needs at least one point")
        chosen = np.linspace(0, len(points) - 1, min(len(points), SCRIBBLE_POINTS)).round().astype(int)
        obj = self._prompts_of(label, z)
        for i in chosen:
            obj.points.append((float(points[i][0]), float(points[i][1])))
            obj.point_labels.append(1 if positive else 0)
        return self._run(label, z, obj)

    def set_labels(self, labels: np.ndarray) -> np.ndarray:
        """Replace the label map (an edited one, e.g. after the brush); prompts start afresh."""
        array = np.asarray(labels)
        if array.shape != self.image.shape:
            raise MedsegError(f"label map of shape {array.shape} for an image of shape {self.image.shape}")
        self._undo.append(self.labels.copy())
        self.labels = array.astype(np.uint8)
        self._objects.clear()
        return self.labels

    def undo(self) -> np.ndarray:
        """Back to the label map before the last prompt or edit."""
        if not self._undo:
            raise MedsegError("nothing to undo")
        self.labels = self._undo.pop()
        self._objects.clear()
        return self.labels

    # ---- internals -----------------------------------------------------------------------------------------
    def _key(self, label: int, z: int | None) -> tuple[int, int | None]:
        self._check_label(label)
        if self.image.ndim == 3:
            if z is None:
                raise MedsegError("a prompt on a volume needs its slice z")
            if not 0 <= z < self.image.shape[0]:
                raise MedsegError(f"slice {z} is outside the volume's {self.image.shape[0]} slices")
        elif z is not None:
            raise MedsegError("slice z is for volumes; this image is 2D")
        return label, z

    def _check_label(self, label: int) -> None:
        if not isinstance(label, int | np.integer) or isinstance(label, bool) or not 1 <= label <= 255:
            raise MedsegError(f"label must be a foreground label value from 1 to 255, not {label!r}")

    def _prompts_of(self, label: int, z: int | None) -> _Object:
        """A copy of the prompts so far of ``label`` on slice ``z`` (kept only once the engine accepts them)."""
        kept = self._objects.get(self._key(label, z), _Object())
        return _Object(kept.box, list(kept.points), list(kept.point_labels))

    def _run(self, label: int, z: int | None, obj: _Object) -> np.ndarray:
        """Segment ``label`` on slice ``z`` from the prompts ``obj``; they replace the old ones only on success."""
        plane = self.labels if z is None else self.labels[z]
        box = obj.box
        if box is None:  # clicks on a drafted object: its bounding box stands for the user's
            box = _bounding_box(plane == label)
            if box is not None:
                obj.box = box
        if box is not None and obj.points:  # a positive click outside the box widens it: the object is there too
            box = _widened(box, [p for p, k in zip(obj.points, obj.point_labels, strict=True) if k], plane.shape)
            obj.box = box
        if box is None and not obj.points:
            raise MedsegError("give a box or a click")
        if obj.points and obj.point_labels[0] == 0 and box is None:
            raise MedsegError("a negative click needs an object: give a box or a positive click first")
        prompts = Prompts(
            boxes=[box] if box is not None else [],
            points=list(obj.points),
            point_labels=list(obj.point_labels),
            slice_index=z,
        )
        if z is None:
            mask = self._predict(prompts)
        else:  # the one slice, normalised as its volume (its embedding cached under the slice)
            one_slice = Image(self._shown()[z], channels=self.image.channels)
            blank = constant_value(one_slice.array)
            if blank is not None:  # the model would draw the box's shape, seeing nothing
                raise MedsegError(
                    f"slice {z} is blank as the prompt model sees it (every pixel {blank:g} of 255): "
                    "there is nothing on it to segment"
                )
            flat = Prompts(prompts.boxes, [], prompts.points, prompts.point_labels)
            mask = self.engine.predict(one_slice, prompts=flat, preset="none", key=(self.image_id, z)).labels.array > 0
        self._objects[(label, z)] = obj
        self._apply(label, mask, z)
        return self.labels

    def _shown(self) -> ModelSlices:
        """The volume's slices as the prompt engine sees them (`intensity_preset`; statistics taken once)."""
        if self._normalised is None:
            self._normalised = ModelSlices(self.image)
        return self._normalised

    def _predict(self, prompts: Prompts) -> np.ndarray:
        return self.engine.predict(self.image, prompts=prompts, key=self.image_id).labels.array > 0

    def _apply(self, label: int, mask: np.ndarray, z: int | None) -> None:
        self._undo.append(self.labels.copy())
        del self._undo[:-20]
        self.interactions += 1
        self.touched = time.monotonic()
        target = self.labels if z is None else self.labels[z]
        target[target == label] = 0
        target[mask] = label


def _bounding_box(mask: np.ndarray) -> tuple[float, float, float, float] | None:
    """``(x0, y0, x1, y1)`` enclosing a 2D mask's pixels (pixel edges), None when empty."""
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        return None
    return float(cols.min()), float(rows.min()), float(cols.max() + 1), float(rows.max() + 1)


def _widened(
    box: tuple[float, float, float, float], points: list[tuple[float, float]], shape: tuple[int, ...]
) -> tuple[float, float, float, float]:
    """``box`` grown to hold ``points`` with a margin of `BOX_MARGIN` of the image's side, inside the image."""
    x0, y0, x1, y1 = box
    for x, y in points:
        if not (x0 <= x <= x1 and y0 <= y <= y1):
            mx, my = BOX_MARGIN * shape[1], BOX_MARGIN * shape[0]
            x0, y0 = max(0.0, min(x0, x - mx)), max(0.0, min(y0, y - my))
            x1, y1 = min(float(shape[1]), max(x1, x + mx)), min(float(shape[0]), max(y1, y + my))
    return x0, y0, x1, y1


class SessionStore:
    """Open sessions, at most ``limit``; sessions idle for ``idle_seconds`` are closed to make room."""

    def __init__(self, limit: int = 16, idle_seconds: float = 1800.0) -> None:
        self.limit = limit
        self.idle_seconds = idle_seconds
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, session: Session) -> Session:
        """Keep ``session``.

        Raises:
            SessionLimit: ``limit`` sessions are open and none is idle.
        """
        with self._lock:
            now = time.monotonic()
            for key in [k for k, s in self._sessions.items() if now - s.touched > self.idle_seconds]:
                del self._sessions[key]
            if len(self._sessions) >= self.limit:
                raise SessionLimit(f"{self.limit} sessions are open; close one (DELETE /api/sessions/ID) or retry")
            self._sessions[session.id] = session
        return session

    def get(self, session_id: str) -> Session:
        """The session ``session_id``.

        Raises:
            UnknownSession: none open by that id.
        """
        with self._lock:
            session = self._sessions.get(session_id)
        if session is None:
            raise UnknownSession(f"no open session {session_id!r}")
        session.touched = time.monotonic()
        return session

    def close(self, session_id: str) -> None:
        """Close a session (unknown ids: `UnknownSession`)."""
        with self._lock:
            if self._sessions.pop(session_id, None) is None:
                raise UnknownSession(f"no open session {session_id!r}")

    def __len__(self) -> int:
        return len(self._sessions)
