"""Run configuration: pydantic models loaded from TOML, then environment, then flags.

Precedence, lowest first: the model defaults, the TOML file, `GRA_*` environment
variables (`GRA_RUN__CONCURRENCY=64` sets `run.concurrency`), command-line flags.
A validation error becomes one `ConfigError` line naming the key and its source.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from gra_async import defaults
from gra_async.errors import ConfigError

__all__ = [
    "EMBEDDER",
    "ENDPOINT_ROLES",
    "ROLES",
    "BatchConfig",
    "EndpointConfig",
    "GateConfig",
    "GenerationConfig",
    "MetadataConfig",
    "PlannerConfig",
    "RefineConfig",
    "RunConfig",
    "RunSettings",
    "load_config",
    "parse_endpoint_flag",
]

Role = Literal["generator", "reviewer", "adjudicator", "embedder"]
# The chat roles, which `--roles rotate` draws from; the embedder (`/v1/embeddings`, the
# semantic dedup) is configured the same way but never writes or reviews.
ROLES: tuple[Role, ...] = ("generator", "reviewer", "adjudicator")
EMBEDDER: Final = "embedder"
ENDPOINT_ROLES: tuple[Role, ...] = (*ROLES, EMBEDDER)
JsonMode = Literal["json_schema", "json_object", "none"]
ENV_PREFIX = "GRA_"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EndpointConfig(_Strict):
    """One OpenAI-compatible server (or replica) serving one model."""

    base_url: str
    model: str | None = None  # None: the first model the server lists
    api_key_env: str | None = None  # the *name* of the variable; keys never live in config
    # Calls in flight to this endpoint at most; None: no cap of its own, only the run's
    # `concurrency` (what `--concurrency N` says is what a flag-given endpoint gets).
    max_concurrency: int | None = Field(None, ge=1)
    # The window under that cap follows latency (client/_window.py); false: it stays at the
    # cap, and only 429s and 503s lower it for a while.
    adaptive: bool = True
    rpm: int = Field(0, ge=0)  # 0: unlimited
    tpm: int = Field(0, ge=0)
    weight: float = Field(1.0, gt=0)
    connect_timeout: float = Field(defaults.CONNECT_TIMEOUT, gt=0)  # opening a connection
    read_timeout: float = Field(defaults.READ_TIMEOUT, gt=0)  # a whole call, sent to last byte
    # The circuit breaker: open after this many consecutive transient failures, or the same
    # 4xx error this many times in a row; then one probe call every `cooldown` seconds.
    cooldown_after: int = Field(defaults.COOLDOWN_AFTER_FAILURES, ge=1)
    cooldown: float = Field(defaults.COOLDOWN_SECONDS, gt=0)
    json_mode: JsonMode = "json_schema"  # how this server takes structured output (README: the embedded default)
    price_in: float = Field(0.0, ge=0)  # per million prompt tokens, for the cost line
    price_out: float = Field(0.0, ge=0)
    # The share of the online price the provider's Batch API bills (OpenAI: half).
    batch_discount: float = Field(defaults.BATCH_DISCOUNT, gt=0, le=1)

    @field_validator("base_url")
    @classmethod
    def _url(cls, value: str) -> str:
        parts = urlsplit(value)
        if "@" in parts.netloc:
            # Not echoed: the part before the @ is a user name and maybe a key.
            raise ValueError(
                "must not carry credentials (user:key@host); put the key in an environment "
                "variable and name it with api_key_env"
            )
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{value!r} is not an http(s) URL like http://127.0.0.1:8000/v1")
        try:
            parts.port  # noqa: B018 - raises on a non-numeric port
        except ValueError:
            raise ValueError(f"{value!r} has an invalid port") from None
        return value.rstrip("/")

    @field_validator("api_key_env")
    @classmethod
    def _env_name(cls, value: str | None) -> str | None:
        if value is not None and (not value or not value.replace("_", "").isalnum()):
            raise ValueError(
                "must be the NAME of an environment variable holding the key, not the key itself"
            )
        return value

    @property
    def label(self) -> str:
        """How messages name this endpoint: its model and URL, never its key."""
        return f"{self.model or '?'}@{self.base_url}"

    def api_key(self) -> str | None:
        if self.api_key_env is None:
            return None
        key = os.environ.get(self.api_key_env)
        if not key:
            raise ConfigError(
                f"endpoint {self.label}: environment variable {self.api_key_env} is not set "
                "(export it with the API key, or drop api_key_env)"
            )
        return key


class GateConfig(_Strict):
    """The decision rule over the review panel (README: How a sample is made)."""

    criteria: tuple[str, ...] = defaults.CRITERIA
    accept_mean: float = Field(defaults.ACCEPT_MEAN, ge=defaults.SCORE_MIN, le=defaults.SCORE_MAX)
    disagreement_std: float = Field(defaults.DISAGREEMENT_STD, ge=0)
    adjudicator: bool = True  # False: the ablation without an adjudicator (disagreement -> mean decides)
    invalid_reply_retries: int = Field(defaults.INVALID_REPLY_RETRIES, ge=0)
    # Valid reviews a sample needs to be decided; None: the whole panel. A review lost to
    # the endpoint parks the task (it runs again); below the quorum on invalid replies fails it.
    min_reviews: int | None = Field(None, ge=1)


class GenerationConfig(_Strict):
    """Few-shot count, temperatures and token budgets of the three roles."""

    few_shot: int = Field(defaults.FEW_SHOT, ge=0)
    temperature: float = Field(defaults.GENERATION_TEMPERATURE, ge=0, le=2)
    max_tokens: int = Field(defaults.GENERATION_MAX_TOKENS, ge=16)
    review_temperature: float = Field(defaults.REVIEW_TEMPERATURE, ge=0, le=2)
    review_max_tokens: int = Field(defaults.REVIEW_MAX_TOKENS, ge=16)
    verdict_max_tokens: int = Field(defaults.VERDICT_MAX_TOKENS, ge=16)


class MetadataConfig(_Strict):
    """Keywords and a one-line summary per accepted sample, asked of the sample's generator."""

    enabled: bool = True  # False (or `run --no-metadata`): no metadata call
    keywords: int = Field(defaults.METADATA_KEYWORDS, ge=1, le=20)
    max_tokens: int = Field(defaults.METADATA_MAX_TOKENS, ge=16)
    temperature: float = Field(0.0, ge=0, le=2)


class RefineConfig(_Strict):
    """The `[refine]` table (`refine`, GRA-Refined): how an existing dataset is improved."""

    # Rewrites of a rejected seed, each reviewed again; 0: review only (keep or drop).
    max_rewrites: int = Field(1, ge=0, le=10)


class PlannerConfig(_Strict):
    """Where seeds come from and how their fields map onto ours."""

    seeds: Path | None = None  # None: the bundled seed set
    instruction_field: str | None = None  # None: detect (instruction / prompt / question)
    input_field: str | None = None  # Alpaca's optional context, appended to the instruction
    response_field: str | None = None  # None: detect (response / output / answer)
    domain_field: str | None = None  # None: "domain" / "category" when present, else clustered
    domains: int = Field(defaults.DOMAINS, ge=1)  # clusters when domains are derived
    near_dup_threshold: float = Field(defaults.NEAR_DUP_THRESHOLD, gt=0, le=1)
    # Embedding cosine at or above which a sample duplicates an accepted one or one of its
    # few-shot seeds (the GRA paper's 0.9); checked when an embedder is configured.
    semantic_threshold: float = Field(defaults.SEMANTIC_THRESHOLD, gt=0, le=1)
    semantic: bool = True  # False: no embedding even with an embedder (MinHash only)
    # Put before every text sent to the embedder: e5 models want "query: " for symmetric
    # similarity. Empty for the embedded default, whose server adds it itself.
    embed_prefix: str = ""
    embed_batch: int = Field(defaults.EMBED_BATCH, ge=1, le=2048)  # texts per /v1/embeddings call


class RunSettings(_Strict):
    """The `[run]` table: where the run lives, how far it goes, how hard it pushes."""

    run_dir: Path = Path("runs/demo")
    target: int = Field(20, ge=1)  # accepted samples to reach
    rounds: int = Field(1, ge=1)
    seed: int = defaults.RUN_SEED
    roles: Literal["fixed", "rotate"] = "fixed"
    reviewers: int | None = Field(None, ge=0)  # panel size; None: every reviewer model
    concurrency: int = Field(defaults.RUN_CONCURRENCY, ge=1)
    max_in_flight: int | None = Field(None, ge=1)  # tasks; None: min(concurrency, endpoint capacity)
    max_tasks: int | None = Field(None, ge=1)  # plan size per round; None: 10x the round's target
    grace: float = Field(defaults.GRACE_SECONDS, ge=0)
    # No call completed for this long while tasks wait: stop (exit 75, resumable).
    # None: twice the longest read_timeout, at least 10 minutes.
    stall_timeout: float | None = Field(None, gt=0)
    # Prometheus `/metrics` on this port while the run goes (0: any free port); None: off.
    metrics_port: int | None = Field(None, ge=0, le=65535)
    metrics_host: str = defaults.METRICS_HOST  # another address exposes the metrics beyond this machine
    # Dollars the run may spend at the endpoints' prices; None: no budget. Reaching it
    # stops the run (exit 3, resumable with a higher budget).
    max_cost: float | None = Field(None, gt=0)
    # "batch": each wave of calls goes to the provider's Batch API (files + batches).
    mode: Literal["online", "batch"] = "online"
    # "I/N": this process plans only tasks I, I+N, I+2N, ... of each round, so N orchestrators
    # share one plan without overlap; `merge` joins their run directories. None: the whole plan.
    shard: str | None = None

    @field_validator("shard")
    @classmethod
    def _shard(cls, value: str | None) -> str | None:
        if value is not None:
            shard_parts(value)
        return value

    @property
    def shard_parts(self) -> tuple[int, int]:
        """(I, N) of `shard`; (0, 1) for the whole plan."""
        return shard_parts(self.shard) if self.shard is not None else (0, 1)


def shard_parts(text: str) -> tuple[int, int]:
    """"I/N" as (I, N), with 0 <= I < N; ValueError saying what is expected otherwise."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match or not 0 <= int(match[1]) < int(match[2]):
        raise ValueError(f"{text!r} is not a shard I/N with 0 <= I < N, like 0/4")
    return int(match[1]), int(match[2])


class BatchConfig(_Strict):
    """The `[batch]` table: how `run.mode = "batch"` cuts waves and waits for them."""

    slice: int = Field(defaults.BATCH_SLICE, ge=1)  # tasks whose calls form one wave
    min_size: int = Field(defaults.BATCH_MIN_SIZE, ge=1)  # smaller waves may go online
    online_tail: bool = False  # True: a wave below min_size (stragglers) is sent online
    max_lines: int = Field(defaults.BATCH_MAX_LINES, ge=1)  # per batch (OpenAI: 50,000)
    max_bytes: int = Field(defaults.BATCH_MAX_BYTES, ge=1024)  # per input file (OpenAI: 200 MB)
    completion_window: str = defaults.BATCH_WINDOW
    poll_interval: float = Field(defaults.BATCH_POLL_INTERVAL, gt=0)  # first wait between polls
    poll_max: float = Field(defaults.BATCH_POLL_MAX, gt=0)  # the longest wait between polls


class RunConfig(_Strict):
    """A whole run's configuration; `RunConfig.model_validate({...})` takes the TOML file's keys."""

    run: RunSettings = Field(default_factory=RunSettings)
    gate: GateConfig = Field(default_factory=GateConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    planner: PlannerConfig = Field(default_factory=PlannerConfig)
    metadata: MetadataConfig = Field(default_factory=MetadataConfig)
    refine: RefineConfig = Field(default_factory=RefineConfig)
    batch: BatchConfig = Field(default_factory=BatchConfig)
    endpoints: dict[Role, tuple[EndpointConfig, ...]] = Field(default_factory=dict)
    prompts_dir: Path | None = None  # None: the templates shipped in the package

    @model_validator(mode="after")
    def _roles_complete(self) -> RunConfig:
        if self.has_endpoints and not self.endpoints.get("generator") and self.run.roles == "fixed":
            raise ValueError("endpoints: no generator endpoint (add [[endpoints.generator]])")
        return self

    @property
    def has_endpoints(self) -> bool:
        """Chat endpoints configured (an embedder alone still runs the embedded default)."""
        return any(self.endpoints.get(role) for role in ROLES)

    @property
    def semantic_dedup(self) -> bool:
        """Embedding dedup runs: an embedder is configured and `planner.semantic` is on."""
        return self.planner.semantic and bool(self.endpoints.get(EMBEDDER))


def _set_path(tree: dict[str, Any], path: list[str], value: Any) -> None:
    node = tree
    for key in path[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{'.'.join(path)}: cannot set inside a non-table value")
    node[path[-1]] = value


def _env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """`GRA_RUN__TARGET=50` -> {"run": {"target": "50"}}; pydantic coerces the string."""
    tree: dict[str, Any] = {}
    for name, value in environ.items():
        if name.startswith(ENV_PREFIX) and "__" in name:
            path = name[len(ENV_PREFIX) :].lower().split("__")
            _set_path(tree, path, value)
    return tree


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _describe(error: ValidationError, source: str) -> str:
    first = error.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "(top level)"
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown key (check its spelling and section)"
    more = f" (and {error.error_count() - 1} more)" if error.error_count() > 1 else ""
    return f"{source}: {key}: {msg}{more}"


def load_config(
    path: str | Path | None = None,
    /,
    *,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    overrides_source: str = "overrides",
    **sections: Any,
) -> RunConfig:
    """The run config from a TOML file, then `GRA_*` environment variables, then overrides.

    Overrides are nested like the file: `load_config("gra.toml", run={"target": 50})`
    (or `overrides={"run": {...}}`); later layers win key by key. `environ` replaces
    `os.environ` (tests); `overrides_source` is how messages name the overrides (the CLI:
"flags"). Raises `ConfigError` with one line naming the key and its source.
    """
    if sections:
        overrides = _merge(dict(overrides or {}), sections)
    path = Path(path) if path is not None else None
    data: dict[str, Any] = {}
    sources: list[str] = []
    if path is not None:
        sources.append(str(path))
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read config file ({exc})") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    env = _env_overrides(os.environ if environ is None else environ)
    if env:
        data = _merge(data, env)
        sources.append("GRA_* environment")
    if overrides:
        data = _merge(data, overrides)
        sources.append(overrides_source)
    source = " + ".join(sources) or "defaults"
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, source)) from None


def parse_endpoint_flag(text: str) -> tuple[Role, dict[str, Any]]:
    """`reviewer=llama-3.1-8b@http://host:8002/v1` -> ("reviewer", {...})."""
    role, sep, rest = text.partition("=")
    role = role.strip()
    if not sep or not rest:
        raise ConfigError(f"--endpoint {text!r}: expected ROLE=[MODEL@]URL")
    if role not in ENDPOINT_ROLES:
        raise ConfigError(
            f"--endpoint {text!r}: unknown role {role!r} "
            "(use generator, reviewer, adjudicator or embedder)"
        )
    model: str | None = None
    url = rest
    scheme_at = rest.find("://")
    at = rest.rfind("@", 0, scheme_at if scheme_at >= 0 else len(rest))
    if at > 0:
        model, url = rest[:at], rest[at + 1 :]
    return role, {"base_url": url, "model": model}
