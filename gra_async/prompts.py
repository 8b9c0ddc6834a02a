"""Load the prompt templates and render them into chat messages.

Template files
--------------
`generator.md`, `reviewer.md` and `adjudicator.md` in one folder: the package's own
(`gra_async/data/prompts/`; `gra-async prompts DIR` copies them out to edit) or the
config's `prompts_dir`. In each:

* an optional leading HTML comment (`<!-- ... -->`) is documentation and is dropped;
* a line that is exactly `---user---` splits the file: above it the system message,
  below it the user message. Without that line the whole file is the user message;
* `{{name}}` is a placeholder (spaces inside the braces allowed). Each template has a
  fixed set of names; an unknown one, or a required one left out, is a `ConfigError`
  when the templates are loaded, not halfway through a run.

Rendering is a single pass over the template: text put in for a placeholder is never
scanned again, so a sample that contains `{{domain}}`, braces, `$x` or "ignore previous
instructions" cannot change the template. Samples and reviews go inside delimited
blocks (`<sample>`, `<example>`, `<review>` ...); a delimiter tag inside the inserted
text is defused (`<` becomes `&lt;`) so a sample cannot close its own block.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from gra_async.errors import ConfigError
from gra_async.scoring import criteria_mean
from gra_async.seeds import Seed

__all__ = [
    "REFINE_ONLY",
    "USER_MARKER",
    "PromptSet",
    "ReviewView",
    "Template",
    "default_prompts_dir",
]

USER_MARKER = "---user---"
_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
_LEADING_COMMENT = re.compile(r"\A\s*<!--.*?-->[ \t]*\n?", re.DOTALL)
_DELIMITERS = ("sample", "instruction", "response", "example", "examples", "reviews", "review",
               "feedback", "scores")
_DELIMITER_TAG = re.compile(r"<(?=/?\s*(?:" + "|".join(_DELIMITERS) + r")\b)", re.IGNORECASE)

# name -> (allowed placeholders, placeholders the template must use)
_ROLES: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "generator": (frozenset({"domain", "keywords", "examples", "count"}), frozenset({"examples"})),
    "reviewer": (
        frozenset({"instruction", "response", "criteria", "score_format"}),
        frozenset({"instruction", "response"}),
    ),
    "adjudicator": (
        frozenset({"instruction", "response", "reviews", "criteria"}),
        frozenset({"instruction", "response", "reviews"}),
    ),
    "metadata": (
        frozenset({"instruction", "response", "keywords"}),
        frozenset({"instruction", "response"}),
    ),
    "rewrite": (
        frozenset({"instruction", "response", "reviews", "criteria"}),
        frozenset({"instruction", "response", "reviews"}),
    ),
}
# Added after prompts folders were first copied out: a folder without it uses the bundled one.
_OPTIONAL = frozenset({"metadata", "rewrite"})
# Templates only `refine` uses: a `run` digests its prompts folder without them, so its
# config (and the run directories made before they existed) stays the same.
REFINE_ONLY = frozenset({"rewrite.md"})


def default_prompts_dir() -> Path:
    """The templates shipped inside the package: `gra_async/data/prompts/`.

    Located with importlib.resources, as the bundled seeds are, so an installed wheel finds
    its own copy (package data), not a folder of the checkout it was built from.
    """
    from importlib import resources

    folder = resources.files("gra_async") / "data" / "prompts"
    # A normal install is a real folder; a zip import has none: PromptSet.load then reports
    # the folder as not found.
    return folder if isinstance(folder, Path) else Path(str(folder))


def _defuse(text: str) -> str:
    """Keep inserted text from opening or closing one of our delimiter blocks."""
    return _DELIMITER_TAG.sub("&lt;", text)


@dataclass(frozen=True, slots=True)
class ReviewView:
    """What the adjudicator sees of one review: a neutral label, never the reviewer's model."""

    label: str
    scores: Mapping[str, int]
    feedback: str


@dataclass(frozen=True, slots=True)
class Template:
    """One parsed template file: system and user parts and the placeholders they use."""

    source: str
    system: str
    user: str
    names: frozenset[str] = field(default_factory=frozenset)

    @classmethod
    def parse(cls, text: str, source: str, allowed: frozenset[str],
              required: frozenset[str]) -> Template:
        text = _LEADING_COMMENT.sub("", text, count=1)
        lines = text.splitlines()
        markers = [i for i, line in enumerate(lines) if line.strip() == USER_MARKER]
        if len(markers) > 1:
            raise ConfigError(f"{source}: {USER_MARKER} appears {len(markers)} times "
                              "(keep one line splitting the system and user parts)")
        if markers:
            system = "\n".join(lines[: markers[0]]).strip()
            user = "\n".join(lines[markers[0] + 1 :]).strip()
        else:
            system, user = "", text.strip()
        if not user:
            raise ConfigError(f"{source}: the user part is empty (write the prompt below {USER_MARKER})")
        names = frozenset(_PLACEHOLDER.findall(system) + _PLACEHOLDER.findall(user))
        unknown = sorted(names - allowed)
        if unknown:
            raise ConfigError(f"{source}: unknown placeholder {{{{{unknown[0]}}}}} "
                              f"(use one of: {', '.join(sorted(allowed))})")
        absent = sorted(required - names)
        if absent:
            raise ConfigError(f"{source}: placeholder {{{{{absent[0]}}}}} is missing "
                              "(the template must show it to the model)")
        return cls(source=source, system=system, user=user, names=names)

    def render(self, values: Mapping[str, str]) -> list[dict[str, str]]:
        """Chat messages; every value is inserted verbatim, in one pass."""
        messages = []
        if self.system:
            messages.append({"role": "system", "content": self._fill(self.system, values)})
        messages.append({"role": "user", "content": self._fill(self.user, values)})
        return messages

    def _fill(self, text: str, values: Mapping[str, str]) -> str:
        pieces = list(_pieces(text))
        for i in range(1, len(pieces), 2):
            name = pieces[i]
            if name not in values:
                raise ConfigError(f"{self.source}: no value for placeholder {{{{{name}}}}}")
            pieces[i] = values[name]
        return "".join(pieces)


@functools.lru_cache(maxsize=256)
def _pieces(text: str) -> tuple[str, ...]:
    """`text` cut at its placeholders: literal, name, literal, ..., literal. Made once per
    template text (re.sub with a function per reply was ~2% of the event loop's CPU)."""
    return tuple(_PLACEHOLDER.split(text))


def _criteria_line(criteria: Sequence[str]) -> str:
    return ", ".join(criteria)


def _score_format(criteria: Sequence[str]) -> str:
    # The keys alone, no value to fill in: SmolLM2-135M handed back 11 of 12 times a shape
    # with "<1-10>" and "<one or two sentences>" in it verbatim. The schema makes the
    # structure; the words say what goes in it.
    return (f'a JSON object with "scores" (an object giving each of {", ".join(criteria)} '
            'a whole number from 1 to 10) and "feedback" (one or two sentences of your own '
            "on what is right or wrong in the response)")


def _examples_block(examples: Sequence[Seed]) -> str:
    if not examples:
        return "(no examples for this domain)"
    blocks = []
    for number, seed in enumerate(examples, start=1):
        blocks.append(
            f'<example n="{number}">\n<instruction>\n{_defuse(seed.instruction)}\n</instruction>\n'
            f"<response>\n{_defuse(seed.response)}\n</response>\n</example>"
        )
    return "\n\n".join(blocks)


def _reviews_block(reviews: Sequence[ReviewView], criteria: Sequence[str]) -> str:
    if not reviews:
        return "(no reviews)"
    blocks = []
    for view in reviews:
        ordered = [name for name in criteria if name in view.scores]
        ordered += sorted(name for name in view.scores if name not in criteria)
        scores = ", ".join(f"{_defuse(name)} {view.scores[name]}" for name in ordered)
        mean = criteria_mean(view.scores) if view.scores else 0.0
        blocks.append(
            f"<review>\n{_defuse(view.label)}: mean {mean:.1f}; {scores}\n"
            f"Feedback: {_defuse(view.feedback.strip()) or '(none)'}\n</review>"
        )
    return "\n".join(blocks)


def _reviewed(instruction: str, response: str, reviews: Sequence[ReviewView],
              criteria: Sequence[str]) -> dict[str, str]:
    """The values of a template that shows a sample with its reviews."""
    return {"instruction": _defuse(instruction), "response": _defuse(response),
            "reviews": _reviews_block(reviews, criteria), "criteria": _criteria_line(criteria)}


class PromptSet:
    """The three templates of a run, checked once at load time."""

    def __init__(self, generator: Template, reviewer: Template, adjudicator: Template,
                 metadata: Template | None = None, rewrite: Template | None = None) -> None:
        self.generator_template = generator
        self.reviewer_template = reviewer
        self.adjudicator_template = adjudicator
        self.metadata_template = metadata
        self.rewrite_template = rewrite

    @classmethod
    def load(cls, directory: Path | None = None) -> PromptSet:
        """Read `generator.md`, `reviewer.md`, `adjudicator.md`; None: the bundled ones."""
        folder = default_prompts_dir() if directory is None else directory
        if not folder.is_dir():
            hint = ("the installation is damaged: reinstall gra-async"
                    if directory is None else "check prompts_dir in the config")
            raise ConfigError(f"{folder}: prompts folder not found ({hint})")
        templates: dict[str, Template] = {}
        for role, (allowed, required) in _ROLES.items():
            path = folder / f"{role}.md"
            if role in _OPTIONAL and not path.exists():
                path = default_prompts_dir() / path.name
            try:
                text = path.read_text(encoding="utf-8")
            except FileNotFoundError:
                raise ConfigError(f"{path}: prompt template not found "
                                  "(`gra-async prompts DIR` writes all three to start from)") from None
            except (OSError, UnicodeDecodeError) as exc:
                raise ConfigError(f"{path}: cannot read prompt template ({exc})") from None
            templates[role] = Template.parse(text, str(path), allowed, required)
        return cls(templates["generator"], templates["reviewer"], templates["adjudicator"],
                   templates["metadata"], templates["rewrite"])

    def generator(self, domain: str, keywords: list[str], examples: list[Seed]) -> list[dict[str, str]]:
        return self.generator_template.render({
            "domain": _defuse(domain),
            "keywords": _defuse(", ".join(keywords)) if keywords else "(any)",
            "examples": _examples_block(examples),
            "count": str(len(examples)),
        })

    def reviewer(self, instruction: str, response: str,
                 criteria: tuple[str, ...]) -> list[dict[str, str]]:
        return self.reviewer_template.render({
            "instruction": _defuse(instruction),
            "response": _defuse(response),
            "criteria": _criteria_line(criteria),
            "score_format": _score_format(criteria),
        })

    def metadata(self, instruction: str, response: str, keywords: int) -> list[dict[str, str]]:
        assert self.metadata_template is not None, "PromptSet made without a metadata template"
        return self.metadata_template.render({
            "instruction": _defuse(instruction),
            "response": _defuse(response),
            "keywords": str(keywords),
        })

    def rewrite(self, instruction: str, response: str, reviews: list[ReviewView],
                criteria: tuple[str, ...]) -> list[dict[str, str]]:
        """A rejected sample and its reviews, for the generator to rewrite (`refine`)."""
        assert self.rewrite_template is not None, "PromptSet made without a rewrite template"
        return self.rewrite_template.render(_reviewed(instruction, response, reviews, criteria))

    def adjudicator(self, instruction: str, response: str, reviews: list[ReviewView],
                    criteria: tuple[str, ...]) -> list[dict[str, str]]:
        return self.adjudicator_template.render(_reviewed(instruction, response, reviews,
                                                          criteria))
