"""The new-user path: open the sample, open the plugin widget, draw a box, ask, get labels."""

import numpy as np
import pytest
from ui_fakes import FakeSession

from napari_medplib._sample_data import nuclei_sample
from napari_medplib.ui.layers import collect_regions, image_plane


def test_sample_layers_are_small_and_match():
    layers = nuclei_sample()
    kinds = [k for _, _, k in layers]
    assert kinds == ["image", "shapes"]
    image, shapes = layers[0][0], layers[1][0]
    assert image.shape == (256, 256) and image.dtype == np.uint16
    assert len(shapes) == 2
    # each region holds a bright nucleus: its mean is well above the image's
    for verts in shapes:
        (y0, x0), (y1, x1) = verts.min(axis=0).astype(int), verts.max(axis=0).astype(int)
        assert image[y0:y1, x0:x1].mean() > 1.5 * image.mean()


@pytest.mark.viewer
def test_new_user_flow_through_the_plugin(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    viewer.open_sample("napari-medplib", "nuclei")
    assert [type(ly).__name__ for ly in viewer.layers] == ["Image", "Shapes"]
    _, widget = viewer.window.add_plugin_dock_widget("napari-medplib", "MedPLIB")
    widget.set_session(FakeSession())
    assert widget.pickers.image_layer.name == "nuclei (synthetic)"
    # swatches use the shapes' edge colours
    plane = image_plane(widget.pickers.image_layer, viewer.dims)
    regions = collect_regions(widget.pickers.region_layers, plane, viewer.dims)
    assert regions.colours == ("#ffcc00", "#00e6ff")  # the edge colours stored in the GeoJSON
    # draw a box on a fresh Shapes layer and ask about it
    boxes = widget.pickers.add_shapes_layer()
    assert boxes.mode == "add_rectangle" and boxes.name == "nuclei (synthetic) regions"
    boxes.add_rectangles(np.array([[20, 120], [70, 165]]))
    widget.chat.ask("Please segment the nucleus in <region>.")
    qtbot.waitUntil(lambda: widget._worker is None, timeout=10_000)
    assert "using the last drawn one" in widget.chat.plain_text()
    out = viewer.layers["nuclei (synthetic) MedPLIB"]
    assert widget.pickers.output_layer == out  # the next answer goes to the same layer
    assert out.data.shape == (256, 256)
    ys, xs = np.nonzero(out.data)
    assert ys.min() >= 20 and ys.max() <= 70 and xs.min() >= 120 and xs.max() <= 165
