"""`Llama3MedFamily`: Llama3-Med through the family interface (text answers at several image scales)."""

from __future__ import annotations

from ..text import TextFamily


class Llama3MedFamily(TextFamily):
    """A loaded ``Llama3MedModel``; its ``generate`` returns ``(text, ids)`` and sees the plane at every
    scale of its config (``families.llama3med.multiscale``). No experts, regions or masks."""
