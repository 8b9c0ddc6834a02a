"""gra-async: instruction-tuning data from a team of small LLMs (generator, reviewers, adjudicator)."""

from __future__ import annotations

__version__ = "0.1.0"
