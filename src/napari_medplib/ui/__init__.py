"""The napari side of napari-medplib (the only package that imports Qt and napari).

Modules, one job each:

* ``widget``      the dock widget (`MedplibWidget`): wiring of the parts below;
* ``pickers``     image / region layers / output Labels pickers, new prompt layers;
* ``chat``        transcript with streamed answers and region swatches, input, quick actions;
* ``model_panel`` collapsible model source / device / generation settings;
* ``segment``     direct segmentation (Segment, Live, Commit, key bindings);
* ``layers``      napari layers -> image plane and `Region`s (transforms, nD slice, holes);
* ``output``      masks -> Labels (fresh ids, current slice, one undo step, provenance);
* ``workers``     thread-worker jobs, progress and error notifications;
* ``sessions``    one loaded `Session` per (model, device), shared and serialised;
* ``settings``    settings remembered between napari sessions (JSON in the user config dir);
* ``grounding``   the magicgui function widget (layer data in, labels out) for chaining.

Nothing is imported here, so npe2 loads only what a contribution needs.
"""
