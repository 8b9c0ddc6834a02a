"""Every default in one place, so `--help`, the README and the code agree."""

from __future__ import annotations

CRITERIA: tuple[str, ...] = (
    "correctness",
    "clarity",
    "completeness",
    "relevance",
    "coherence",
    "ethicality",
)
SCORE_MIN = 1
SCORE_MAX = 10

# Gate (README: How a sample is made). The paper publishes neither thresholds nor prompts; these are ours.
ACCEPT_MEAN = 7.0  # panel mean at or above this, with agreement -> accept
DISAGREEMENT_STD = 1.5  # panel std above this -> adjudicator (the paper's case had std ~2.5)
NEAR_DUP_THRESHOLD = 0.9  # Jaccard (MinHash) or cosine similarity counted as a duplicate
MINHASH_PERMUTATIONS = 128
SEMANTIC_THRESHOLD = 0.9  # embedding cosine counted as a duplicate (the GRA paper's)
EMBED_BATCH = 32  # texts per /v1/embeddings call at most

# Client (README: Configuration, retries).
CONNECT_TIMEOUT = 10.0  # seconds
READ_TIMEOUT = 300.0  # seconds for a whole reply; local CPU models are slow
MAX_RETRIES = 6
BACKOFF_BASE = 0.5  # seconds; full jitter over base * 2**attempt
BACKOFF_MAX = 30.0
RETRY_AFTER_CAP = 120.0  # a server may not park a call for longer than this
COOLDOWN_AFTER_FAILURES = 5  # consecutive failures (or the same 4xx) that open the breaker
# Seconds between probe calls while the breaker is open. Fixed, not doubling: behind one
# gateway every endpoint fails at once, and a doubled cooldown kept a recovered gateway
# idle for ~30 s; a probe every 2 s finds it back within one interval.
COOLDOWN_SECONDS = 2.0
STALL_MIN = 600.0  # seconds: the least stall_timeout chosen for the user
INVALID_REPLY_RETRIES = 2  # schema-breaking review/verdict replies re-asked before failing

# Pipeline.
RUN_CONCURRENCY = 256  # model calls in flight across the run
FEW_SHOT = 3
DOMAINS = 8  # clusters when the seeds carry no domain
GENERATION_MAX_TOKENS = 768
REVIEW_MAX_TOKENS = 512
VERDICT_MAX_TOKENS = 256
GENERATION_TEMPERATURE = 0.8
REVIEW_TEMPERATURE = 0.0
RUN_SEED = 0
GRACE_SECONDS = 10.0

# Prometheus metrics (`run --metrics-port`): loopback only unless `--metrics-host` says otherwise.
METRICS_HOST = "127.0.0.1"
# Per-sample metadata (README: Metadata): keywords asked for, and what "one line" allows.
METADATA_KEYWORDS = 5
METADATA_MAX_TOKENS = 160
SUMMARY_MAX_CHARS = 300

# Cost control (README: Hosted APIs).
BATCH_DISCOUNT = 0.5  # the Batch API's price as a share of the online one (OpenAI: half)
BATCH_SLICE = 1000  # tasks per slice: their generations are one wave, then their reviews, ...
BATCH_MIN_SIZE = 1
BATCH_MAX_LINES = 50_000  # OpenAI's limit of requests per batch
BATCH_MAX_BYTES = 200_000_000  # OpenAI's limit on a batch input file
BATCH_WINDOW = "24h"
BATCH_POLL_INTERVAL = 5.0  # seconds before the first poll; doubles up to BATCH_POLL_MAX
BATCH_POLL_MAX = 300.0
ESTIMATE_TASKS = 20  # pilot tasks of `estimate`
ESTIMATE_PRECISION = 0.25  # the pilot grows until the cost's 95% interval is within +-this
ESTIMATE_MAX_SHARE = 0.5  # ... or until it has spent this share of the projected cost
