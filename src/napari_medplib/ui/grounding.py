"""Grounding as a magicgui function widget typed with napari's layer-data types, for chaining.

``ground(image, shapes, points, question) -> LabelsData`` composes with other napari tools and
scripts: it takes layer *data* (image pixels = data coordinates, no transforms) and returns a label
image. In the viewer the work runs in a thread worker (the widget returns a ``FunctionWorker``), so
napari stays responsive. nD images are answered plane by plane over the leading axes.

The session is the one the dock loaded for the saved (model source, device) settings, or loaded
here and then shared with the dock (`sessions`); `use_session` plugs in another (scripts, tests).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Optional

import numpy as np

from ..regions import Region, RegionError

if TYPE_CHECKING:
    import napari.types

_OVERRIDE: list[Any] = []
#: The widget's display name in napari.yaml (napari titles its dock with it).
GROUND_WIDGET_NAME = "Ground with MedPLIB"
#: Width of a dock title bar's buttons, rule and margins beside its title text (napari 0.9), with room.
TITLE_BAR_EXTRA = 140


def use_session(session: Any | None) -> None:
    """Make the function widget use ``session`` (None: back to the saved model settings)."""
    _OVERRIDE[:] = [] if session is None else [session]


def _session() -> Any:
    if _OVERRIDE:
        return _OVERRIDE[0]
    from .sessions import remember, shared
    from .settings import is_server_url, load_server_token, load_settings, session_key

    settings = load_settings()
    source = settings.model_source
    weights = "full" if is_server_url(source) else settings.llm_weights
    key = session_key(source, settings.device, weights)
    session = shared(key)
    if session is None:
        from ..engine import Session

        if is_server_url(source):  # "Server" in the model settings: the model runs on `medplib serve`
            session = Session.connect(source, token=load_server_token())
        else:
            extra = {} if weights == "full" else {"llm_weights": weights}
            session = Session.load(source, device=settings.device, **extra)
        remember(key, session)
    return session


def regions_from_data(
    shapes: Sequence[np.ndarray] | None, points: np.ndarray | None, plane: tuple[int, int]
) -> list[Region]:
    """ShapesData / PointsData in image pixels -> regions (last two axes; shape types are lost in
    layer data, so 2 vertices make a box, more a polygon)."""
    regions: list[Region] = []
    for i, verts in enumerate(shapes or []):
        v = np.asarray(verts, dtype=float)[:, -2:]
        if v.shape[0] == 2:
            regions.append(Region.box(*v.min(axis=0), *v.max(axis=0), index=i, image_shape=plane))
        elif v.shape[0] >= 3:
            regions.append(Region.polygon(v, index=i, image_shape=plane))
    pts = np.asarray(points if points is not None else np.zeros((0, 2)), dtype=float)
    if pts.size:
        for i, p in enumerate(pts.reshape(-1, pts.shape[-1])):
            regions.append(Region.point(p[-2], p[-1], index=i, image_shape=plane))
    return regions


def ground_data(
    image: np.ndarray,
    question: str,
    shapes: Sequence[np.ndarray] | None = None,
    points: np.ndarray | None = None,
    *,
    session: Any | None = None,
    rgb: bool | None = None,
) -> np.ndarray:
    """Ask ``question`` on every 2-D plane of ``image``; return int32 labels, one id per grounded object.

    ``<region>`` tags in the question refer to ``shapes`` then ``points``, which apply to every
    plane. Without a tag they are not used. A stack is asked with one contrast for all its planes
    (`engine.stack.stack_contrast_limits`), and a 3-D stack's objects keep their id from plane to plane
    (`engine.stack.link_planes`).
    """
    session = session if session is not None else _session()
    image = np.asarray(image)
    if rgb is None:
        rgb = image.ndim >= 3 and image.shape[-1] in (3, 4) and image.dtype == np.uint8
    spatial = image.shape[:-1] if rgb else image.shape
    if len(spatial) < 2:
        raise RegionError(f"image must have at least 2 spatial axes, got shape {image.shape}")
    plane = (int(spatial[-2]), int(spatial[-1]))
    regions = regions_from_data(shapes, points, plane) if "<region" in question else []
    if "<region" in question and not regions:
        raise RegionError("the question names <region> but no shape or point was given")
    from ..engine.stack import link_planes, reply_instances, stack_contrast_limits
    from .sessions import lock_for

    lead = spatial[:-2]
    planes = [image[index] for index in np.ndindex(*lead)]
    limits = stack_contrast_limits(planes, rgb) if len(planes) > 1 else None
    out = np.zeros(spatial, dtype=np.int32)
    for index, plane_image in zip(np.ndindex(*lead), planes, strict=True):
        with lock_for(session):
            reply = session.ask(plane_image, question, regions, rgb=rgb, contrast_limits=limits)
        view = out[index]
        for objects in reply_instances(reply):  # one label image per <SEG>, ids after the previous ones
            new = (objects > 0) & (view == 0)
            view[new] = objects[new] + view.max()
    if len(lead) == 1 and len(planes) > 1:
        out = link_planes(list(out))
    return out


def ground(
    image: napari.types.ImageData,
    question: str = "Please segment the nucleus.",
    shapes: napari.types.ShapesData | None = None,
    points: napari.types.PointsData | None = None,
) -> napari.types.LabelsData:
    """Ground ``question`` in ``image`` (synchronous; for scripts and chaining)."""
    return ground_data(image, question, shapes, points)


def make_ground_widget() -> Any:
    """The npe2 widget: a magicgui form whose run button answers in a thread worker."""
    from magicgui import magicgui
    from napari.qt.threading import FunctionWorker, create_worker
    from napari.types import ImageData, LayerDataTuple, PointsData, ShapesData
    from qtpy.QtCore import QTimer

    from .workers import _guarded, _unwrap, report_error

    def medplib_ground(image, question="Please segment the nucleus.", shapes=None, points=None):
        name = str(gui.image.current_choice).removesuffix(" (data)") or "image"

        def work():
            labels = ground_data(image, question, shapes, points)
            return (
                labels,
                {"name": f"{name} grounded", "metadata": {"question": question}},
                "labels",
            )

        worker = create_worker(
            _guarded(work),
            _ignore_errors=True,
            _start_thread=False,
        )
        worker.errored.connect(_unwrap(report_error))
        # start after napari has connected its result handler to `returned`
        QTimer.singleShot(0, worker.start)
        return worker

    # real type objects (this module uses postponed annotations, which magicgui cannot resolve)
    medplib_ground.__annotations__ = {
        "image": ImageData,
        "question": str,
        "shapes": Optional[ShapesData],  # noqa: UP045 - napari registers Optional[...]
        "points": Optional[PointsData],  # noqa: UP045
        # a LayerDataTuple, not LabelsData: napari's LabelsData handler looks up every input
        # layer by name and fails on an empty optional choice (napari 0.9.2)
        "return": FunctionWorker[LayerDataTuple],
    }
    gui = magicgui(
        medplib_ground,
        call_button="Ground",
        question={"tooltip": "Use <region> to refer to the shapes, then the points"},
    )
    # the form alone is narrower than napari's dock title ("<name> (napari-medplib)"), which would be cut
    title = f"{GROUND_WIDGET_NAME} (napari-medplib)"
    gui.native.setMinimumWidth(gui.native.fontMetrics().horizontalAdvance(title) + TITLE_BAR_EXTRA)
    return gui
