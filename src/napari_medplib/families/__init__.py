"""Model families besides the bundled MedPLIB: each sub-package loads one released layout."""
