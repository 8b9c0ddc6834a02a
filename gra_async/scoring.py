"""Model replies to validated objects, the review panel to one number pair, the pair to a decision.

Parsing is lenient about form and strict about content: a JSON object wrapped in
chat or code fences is found, capitalised keys and numeric strings are accepted,
but a missing or out-of-range score is an `InvalidReply`, never a made-up score
(an invalid reply is retried, then recorded as a failed review).

Score coercion (documented choice): integers pass; floats and numeric strings
("8", "8.0", "8/10") are rounded to the nearest integer, halves up (7.5 -> 8);
the rounded score must be in 1..10 - 0 or 11 is invalid, not clamped; booleans,
NaN and other types are invalid.

Panel statistics: each reviewer's mean over the criteria, then the mean and the
POPULATION standard deviation (divide by n) across reviewers. With three reviewers
at 9, 9 and 3.7 that is a std of about 2.5, the paper's case study; one reviewer
gives std 0.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any, Literal, Protocol

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, model_validator

from gra_async import defaults
from gra_async.config import GateConfig
from gra_async.errors import InvalidReply

__all__ = [
    "Decision",
    "GeneratedSample",
    "InvalidReply",
    "Panel",
    "PanelScore",
    "ReviewReply",
    "SampleMetadata",
    "ScoredReview",
    "Verdict",
    "aggregate",
    "criteria_mean",
    "decide",
    "extract_json",
    "generation_schema",
    "is_placeholder",
    "metadata_schema",
    "parse_generation",
    "parse_metadata",
    "parse_review",
    "parse_verdict",
    "response_format",
    "review_schema",
    "verdict_schema",
]

_MEAN_TOLERANCE = 1e-9  # 7.0 computed as 6.999999999 must still pass a 7.0 bar
_SCHEMA_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_NUMBER = re.compile(r"^\s*([+-]?\d+(?:\.\d+)?)\s*(?:/\s*10(?:\.0+)?)?\s*$")


# --------------------------------------------------------------------------- reply models


def criteria_mean(scores: Mapping[str, int]) -> float:
    """One reviewer's mean over the criteria: the one place this number is computed."""
    return math.fsum(scores.values()) / len(scores)


def _keys_casefolded(data: Mapping[Any, Any]) -> dict[str, Any]:
    return {str(key).strip().casefold(): value for key, value in data.items()}


def _text(data: Mapping[str, Any], key: str, *, required: bool) -> str:
    value = data.get(key)
    if value is None:
        if required:
            raise ValueError(f"missing {key}")
        return ""
    if not isinstance(value, str):
        raise ValueError(f"{key} is not a string")
    return value.strip()


# What the bundled prompts show as the shape of a reply: a model that hands these back
# has not answered (seen with SmolLM2-135M: 11 of 12 reviews returned the shape verbatim).
_PROMPT_EXAMPLES = frozenset({"one or two sentences", "one sentence saying why",
                              "one line", "a few keywords", "keyword", "summary"})
_ANGLE_PLACEHOLDER = re.compile(r"\s*<[^<>\n]{1,80}>\s*")


def is_placeholder(text: str) -> bool:
    """True for a prompt's placeholder handed back as if it were an answer: `<...>`, `...`,
    or one of the bundled prompts' example phrases."""
    folded = " ".join(text.casefold().split()).strip(" .\"'")
    return (not any(ch.isalnum() for ch in text) or bool(_ANGLE_PLACEHOLDER.fullmatch(text))
            or folded in _PROMPT_EXAMPLES)


def _answer(data: Mapping[str, Any], key: str, *, required: bool) -> str:
    """A free-text field that must be the model's own words, not the prompt's placeholder."""
    value = _text(data, key, required=required)
    if value and is_placeholder(value):
        raise ValueError(f"{key} {value[:40]!r} is the prompt's placeholder, not an answer")
    return value


class GeneratedSample(BaseModel):
    """The generator's new instruction and response, both with real content."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    instruction: str
    response: str

    @model_validator(mode="before")
    @classmethod
    def _clean(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            raise ValueError("reply is not a JSON object")
        data = _keys_casefolded(data)
        out = {}
        for key in ("instruction", "response"):
            value = _text(data, key, required=True)
            # "..." copied from the prompt's JSON shape is not an instruction.
            if not any(ch.isalnum() for ch in value):
                raise ValueError(f"{key} is empty")
            out[key] = value
        return out


def _score(value: Any, criterion: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"score for {criterion} is not a number")
    if isinstance(value, int):
        number = float(value)
    elif isinstance(value, float):
        number = value
    elif isinstance(value, str) and (match := _NUMBER.match(value)):
        number = float(match.group(1))
    else:
        raise ValueError(f"score for {criterion} is not a number")
    if not math.isfinite(number):
        raise ValueError(f"score for {criterion} is not a number")
    score = math.floor(number + 0.5)
    if not defaults.SCORE_MIN <= score <= defaults.SCORE_MAX:
        raise ValueError(
            f"score for {criterion} is {value!r}, outside {defaults.SCORE_MIN}-{defaults.SCORE_MAX}"
        )
    return score


class ReviewReply(BaseModel):
    """One reviewer's integer scores (1..10) per criterion and its feedback.

    Validate with `ReviewReply.model_validate(data, context={"criteria": criteria})` to
    require every criterion; extra criteria the model invents are dropped. A reply
    that forgot the `scores` wrapper (criteria at the top level) is accepted too.
    Missing feedback is "" - the scores are what the gate needs.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    scores: dict[str, Annotated[int, Field(ge=defaults.SCORE_MIN, le=defaults.SCORE_MAX)]] = Field(
        min_length=1
    )
    feedback: str = ""

    @model_validator(mode="before")
    @classmethod
    def _clean(cls, data: Any, info: ValidationInfo) -> Any:
        if not isinstance(data, Mapping):
            raise ValueError("reply is not a JSON object")
        criteria: Sequence[str] | None = (info.context or {}).get("criteria")
        top = _keys_casefolded(data)
        raw = top.get("scores")
        if raw is None and criteria and any(c.casefold() in top for c in criteria):
            raw = {c: top[c.casefold()] for c in criteria if c.casefold() in top}
        if raw is None:
            raise ValueError("missing scores")
        if not isinstance(raw, Mapping):
            raise ValueError("scores is not an object")
        given = _keys_casefolded(raw)
        if criteria is None:
            scores = {str(key): _score(value, str(key)) for key, value in raw.items()}
        else:
            scores = {}
            for criterion in criteria:
                if criterion.casefold() not in given:
                    raise ValueError(f"missing score for {criterion}")
                scores[criterion] = _score(given[criterion.casefold()], criterion)
        return {"scores": scores, "feedback": _answer(top, "feedback", required=False)}

    @property
    def mean(self) -> float:
        return criteria_mean(self.scores)


class Verdict(BaseModel):
    """The adjudicator's decision. "Accepted"/"REJECT" are normalised; anything else is invalid."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    decision: Literal["accept", "reject"]
    reason: str = ""

    @model_validator(mode="before")
    @classmethod
    def _clean(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            raise ValueError("reply is not a JSON object")
        top = _keys_casefolded(data)
        decision = _text(top, "decision", required=True).casefold().strip(" .!\"'")
        decision = {"accepted": "accept", "rejected": "reject"}.get(decision, decision)
        if decision not in ("accept", "reject"):
            raise ValueError(f"decision {decision[:40]!r} is not accept or reject")
        return {"decision": decision, "reason": _answer(top, "reason", required=False)}


def _normalized(text: str) -> str:
    return " ".join(text.casefold().split())


class SampleMetadata(BaseModel):
    """A few keywords and a one-line summary of an accepted sample, as the paper keeps.

    Validate with `context={"sample": (instruction, response)}`: a summary that is the
    instruction or the response itself is an echo, not a summary. Keywords are
    deduplicated (case-insensitively) and capped at `context["keywords"]` (default 5).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    keywords: tuple[str, ...] = Field(min_length=1)
    summary: str

    @model_validator(mode="before")
    @classmethod
    def _clean(cls, data: Any, info: ValidationInfo) -> Any:
        if not isinstance(data, Mapping):
            raise ValueError("reply is not a JSON object")
        context = info.context or {}
        top = _keys_casefolded(data)
        summary = " ".join(_answer(top, "summary", required=True).split())
        if len(summary) < 8:
            raise ValueError("summary is empty or too short to say anything")
        if len(summary) > defaults.SUMMARY_MAX_CHARS:
            raise ValueError(f"summary is longer than one line ({len(summary)} characters)")
        if _normalized(summary) in {_normalized(t) for t in context.get("sample", ())}:
            raise ValueError("summary repeats the sample instead of summarising it")
        raw = top.get("keywords")
        if isinstance(raw, str):  # "a, b, c": the same answer in another shape
            raw = raw.split(",")
        if not isinstance(raw, list):
            raise ValueError("keywords is not a list")
        keywords: list[str] = []
        for item in raw:
            if not isinstance(item, str):
                raise ValueError("a keyword is not a string")
            word = " ".join(item.split()).strip(" .,;")
            if not word or is_placeholder(word) or len(word) > 40 or len(word.split()) > 4:
                raise ValueError(f"keyword {item[:40]!r} is not a keyword (1-4 words)")
            if word.casefold() not in {k.casefold() for k in keywords}:
                keywords.append(word)
        if not keywords:
            raise ValueError("no keywords")
        return {"keywords": tuple(keywords[: int(context.get("keywords", 5))]),
                "summary": summary}


# --------------------------------------------------------------------------- schemas


def _string(max_tokens: int | None, share: float) -> dict[str, Any]:
    """A string capped at `share` characters per token of the reply's budget.

    At ~4 characters a token, caps this far below the budget leave room for the JSON
    around them, so a constrained reply closes its braces instead of being cut off by
    max_tokens (vLLM with SmolLM2: 24-26 of 32 replies valid without caps, 32 with).
    """
    if max_tokens is None:
        return {"type": "string"}
    return {"type": "string", "maxLength": max(16, int(max_tokens * share))}


def generation_schema(max_tokens: int | None = None) -> dict[str, Any]:
    """JSON Schema of the generator's reply (no minLength: not every server's grammar takes it)."""
    return {
        "type": "object",
        "properties": {"instruction": _string(max_tokens, 1.0),
                       "response": _string(max_tokens, 2.5)},
        "required": ["instruction", "response"],
        "additionalProperties": False,
    }


def review_schema(criteria: Sequence[str], max_tokens: int | None = None) -> dict[str, Any]:
    """JSON Schema of a review: scores first, so a reply cut short by max_tokens fails loudly."""
    # The enum repeats the bounds because some grammar engines (llama.cpp) drop
    # minimum/maximum, and a 135M model then copies a 0 from anywhere in its prompt.
    score = {
        "type": "integer",
        "minimum": defaults.SCORE_MIN,
        "maximum": defaults.SCORE_MAX,
        "enum": list(range(defaults.SCORE_MIN, defaults.SCORE_MAX + 1)),
    }
    return {
        "type": "object",
        "properties": {
            "scores": {
                "type": "object",
                "properties": {name: dict(score) for name in criteria},
                "required": list(criteria),
                "additionalProperties": False,
            },
            "feedback": _string(max_tokens, 2.0),
        },
        "required": ["scores", "feedback"],
        "additionalProperties": False,
    }


def verdict_schema(max_tokens: int | None = None) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {
            "decision": {"type": "string", "enum": ["accept", "reject"]},
            "reason": _string(max_tokens, 2.0),
        },
        "required": ["decision", "reason"],
        "additionalProperties": False,
    }


def metadata_schema(keywords: int = 5) -> dict[str, Any]:
    """JSON Schema of the metadata reply: short keywords, then a summary of one line."""
    return {
        "type": "object",
        "properties": {
            "keywords": {"type": "array", "items": {"type": "string", "maxLength": 40},
                         "minItems": 1, "maxItems": keywords},
            "summary": {"type": "string", "maxLength": defaults.SUMMARY_MAX_CHARS},
        },
        "required": ["keywords", "summary"],
        "additionalProperties": False,
    }


def response_format(
    schema_name: str, schema: dict[str, Any], mode: Literal["json_schema", "json_object", "none"]
) -> dict[str, Any] | None:
    """The `response_format` request field in the form the endpoint takes (README: the embedded default).

    vLLM and OpenAI take `json_schema`; llama.cpp's server rejects it with HTTP 500 but
    constrains `{"type": "json_object", "schema": ...}`; "none" sends nothing.
    """
    if mode == "none":
        return None
    if mode == "json_object":
        return {"type": "json_object", "schema": schema}
    if mode == "json_schema":
        if not _SCHEMA_NAME.match(schema_name):
            raise ValueError(f"schema name {schema_name!r}: use 1-64 letters, digits, _ or -")
        return {"type": "json_schema",
                "json_schema": {"name": schema_name, "schema": schema, "strict": True}}
    raise ValueError(f"unknown json mode {mode!r}")


# --------------------------------------------------------------------------- parsing


def extract_json(text: str) -> Any:
    """The reply as JSON, or the first JSON object inside chatty text / code fences.

    Each `{` is tried in turn with the C decoder's raw_decode, which stops at the end
    of the first complete value, so braces inside strings and text after the object
    do no harm.
    """
    stripped = text.strip().lstrip("\ufeff")
    if not stripped:
        raise InvalidReply("empty reply", text)
    try:
        return orjson.loads(stripped)
    except orjson.JSONDecodeError:
        pass
    decoder = json.JSONDecoder(strict=False)  # small models put raw newlines inside strings
    start = stripped.find("{")
    while start != -1:
        try:
            value, _ = decoder.raw_decode(stripped, start)
        except json.JSONDecodeError as exc:
            if exc.pos >= len(stripped) - 1 or exc.msg.startswith("Unterminated string"):
                # An object that runs to the end of the reply was cut off. Every later `{`
                # lies inside it: a complete inner object (the scores without their
                # feedback) must not pass for the whole reply.
                raise InvalidReply("JSON cut off before its end (raise max_tokens?)", text) from None
        else:
            if isinstance(value, dict):
                return value
        start = stripped.find("{", start + 1)
    raise InvalidReply("not JSON", text)


def _validated(model: type[BaseModel], text: str, context: dict[str, Any] | None = None) -> Any:
    data = extract_json(text)
    if not isinstance(data, dict):
        raise InvalidReply("reply is not a JSON object", text)
    try:
        return model.model_validate(data, context=context)
    except ValidationError as exc:
        first = exc.errors()[0]
        reason = str(first["msg"]).removeprefix("Value error, ")
        if first["loc"]:
            reason = f"{'.'.join(map(str, first['loc']))}: {reason}"
        raise InvalidReply(reason, text) from None


def parse_generation(text: str) -> GeneratedSample:
    sample: GeneratedSample = _validated(GeneratedSample, text)
    return sample


def parse_review(text: str, criteria: Sequence[str]) -> ReviewReply:
    review: ReviewReply = _validated(ReviewReply, text, {"criteria": tuple(criteria)})
    return review


def parse_metadata(text: str, instruction: str, response: str, keywords: int = 5) -> SampleMetadata:
    metadata: SampleMetadata = _validated(SampleMetadata, text, {
        "sample": (instruction, response), "keywords": keywords})
    return metadata


def parse_verdict(text: str) -> Verdict:
    verdict: Verdict = _validated(Verdict, text)
    return verdict


# --------------------------------------------------------------------------- panel and gate


@dataclass(frozen=True, slots=True)
class ScoredReview:
    """One reviewer model's valid review, as the gate, the adjudicator and the export see it."""

    model: str
    scores: Mapping[str, int]
    feedback: str

    @property
    def mean(self) -> float:
        return criteria_mean(self.scores)


class _Scored(Protocol):
    @property
    def mean(self) -> float: ...


@dataclass(frozen=True, slots=True)
class Panel:
    """The review panel of one sample: mean and population std of the reviewers' own means.

    `reviews` holds the reviews themselves when they came with their models (the pipeline's
    case, and what a custom gate sees).
    """

    mean: float
    std: float
    per_review_means: tuple[float, ...]
    reviews: tuple[ScoredReview, ...] = ()


PanelScore = Panel  # the name of the statistic before the panel carried its reviews


def aggregate(reviews: Sequence[_Scored]) -> Panel:
    """Each reviewer's mean over criteria, then mean and population std across reviewers."""
    if not reviews:
        raise ValueError("aggregate needs at least one review (no panel: pass None to decide)")
    means = tuple(review.mean for review in reviews)
    mean = math.fsum(means) / len(means)
    std = math.sqrt(math.fsum((m - mean) ** 2 for m in means) / len(means))
    scored = tuple(r for r in reviews if isinstance(r, ScoredReview))
    return Panel(mean=mean, std=std, per_review_means=means,
                 reviews=scored if len(scored) == len(reviews) else ())


class Decision(StrEnum):
    """What the gate does with a sample: keep it, drop it, or ask the adjudicator."""

    ACCEPT = "accept"
    REJECT = "reject"
    ADJUDICATE = "adjudicate"


def decide(panel: Panel | None, gate: GateConfig) -> Decision:
    """The GRA gate: disagreement goes to the adjudicator, otherwise the mean decides.

    `panel=None` (no reviewers: the paper's "no review" ablation) accepts, since
    nothing judged the sample. With `gate.adjudicator` off, disagreement falls back to
    the mean, with the same tolerance at the bar.
    """
    if panel is None:
        return Decision.ACCEPT
    if gate.adjudicator and panel.std > gate.disagreement_std:
        return Decision.ADJUDICATE
    if panel.mean + _MEAN_TOLERANCE >= gate.accept_mean:
        return Decision.ACCEPT
    return Decision.REJECT
