"""Model families: which family a folder holds (``registry``), the interface `Session` drives
(``base.ModelFamily``), and one adapter per family: ``medplib`` (released checkpoints and the bundled
model), ``medmoe`` and ``llama3med`` (each sub-package also loads its released layout; text answers
through ``text.TextFamily``)."""
