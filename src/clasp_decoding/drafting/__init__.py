"""Drafting strategies behind one interface (:mod:`.base`), and the table of methods (:mod:`.registry`)."""

from .base import Draft, Drafter, NoDraft, Outcome, Selection, Source
from .registry import METHODS, Method, make_drafter

__all__ = ["METHODS", "Draft", "Drafter", "Method", "NoDraft", "Outcome", "Selection", "Source", "make_drafter"]
