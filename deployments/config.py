"""The one configuration of a specserve application: a pydantic model, one docstring per field.

`deployments/serve_config.yaml` carries it as the application's `args`, `specserve serve` reads
the same file (and lets flags override models and Redis), and the Kubernetes RayService embeds it.
"""

from __future__ import annotations

import os
import re
import urllib.parse
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

from specserve.engine.defaults import DRAFT_MAX_LEN, DRAFT_SLOTS, MAX_PREFILL_TOKENS, STOP_PROB
from specserve.serving.api import Limits

__all__ = ["Replicas", "TargetConfig", "DraftConfig", "LimitsConfig", "RetryConfig", "AppConfig"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


class Replicas(_Strict):
    """How many replicas of a deployment run, what each reserves, and when Serve scales."""

    min_replicas: int = Field(1, ge=0)
    """Replicas kept running when idle (0 lets the deployment scale to zero)."""
    max_replicas: int = Field(1, ge=1)
    """Upper bound of autoscaling."""
    target_ongoing_requests: float = Field(2.0, gt=0)
    """Serve adds replicas when the ongoing requests per replica exceed this."""
    max_ongoing_requests: int = Field(8, ge=1)
    """Requests one replica takes at once; more wait in the router's queue."""
    max_queued_requests: int = Field(-1, ge=-1)
    """Requests that may wait in a caller's queue for this deployment (-1: no limit); beyond it a request
    is refused at once: RESOURCE_EXHAUSTED over gRPC, 429 over HTTP (retry later)."""
    upscale_delay_s: float = Field(2.0, ge=0)
    """How long the load must stay high before Serve adds a replica."""
    downscale_delay_s: float = Field(30.0, ge=0)
    """How long the load must stay low before Serve removes a replica."""
    num_cpus: float = Field(0.5, ge=0)
    """CPUs Ray reserves per replica (fractional on small CPU hosts; it does not cap torch threads)."""
    num_gpus: float = Field(0.0, ge=0)
    """GPUs per replica (1 on a GPU cluster)."""
    resources: dict[str, float] = Field(default_factory=dict)
    """Custom Ray resources per replica, e.g. {specserve_target: 1}: the replica only lands on Ray nodes
    that declare them (the RayService's target/draft worker groups do, see k8s/)."""

    @model_validator(mode="after")
    def _bounds(self):
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) is above max_replicas ({self.max_replicas})")
        for name, amount in self.resources.items():
            if name in ("CPU", "GPU", "memory", "object_store_memory"):
                raise ValueError(f"resources.{name}: use num_cpus / num_gpus for built-in resources, "
                                 f"resources is for custom ones like specserve_target")
            if not amount >= 0:
                raise ValueError(f"resources.{name} must be >= 0, got {amount}")
        return self

    def options(self) -> dict:
        """Keyword arguments of `Deployment.options`."""
        return {
            "autoscaling_config": {
                "min_replicas": self.min_replicas, "max_replicas": self.max_replicas,
                "initial_replicas": max(self.min_replicas, 1),
                "target_ongoing_requests": self.target_ongoing_requests,
                "upscale_delay_s": self.upscale_delay_s, "downscale_delay_s": self.downscale_delay_s,
            },
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
            "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus,
                                  **({"resources": dict(self.resources)} if self.resources else {})},
        }


class TargetConfig(_Strict):
    """The target model's replicas: they verify, keep chat sessions' KV caches and talk to a draft."""

    model: str = "qwen2.5-coder-1.5b"
    """Target model: a prepared name (`specserve models list`), a local directory or a hub id."""
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    """Weights' dtype: auto (bfloat16 where the replica's GPU or CPU multiplies it natively, else
    float32), float32 (exact batch to batch; the fastest on CPUs without bf16 instructions) or
    bfloat16 (on GPUs, and on CPUs with AMX / AVX512-BF16, where its linears are packed for oneDNN:
    ~1.5x ar@1 and ~2.4x ar@8 of float32, docs/benchmarks.md, "bfloat16 on CPUs with AMX")."""
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    """auto (the replica's GPU when Ray gave it one, else the CPU), cpu, or cuda[:N]."""
    threads: Optional[int] = Field(None, ge=1)
    """torch threads per replica (None: torch's default)."""
    local_draft: bool = True
    """Also load the draft model inside each target replica, for mode sd (off saves its memory)."""
    session_cache_size: int = Field(16, ge=1)
    """Chat sessions whose KV cache a replica keeps (least recently used ones are dropped)."""
    draft_timeout_s: float = Field(10.0, gt=0)
    """How long the target waits for a draft proposal before it finishes the sequence alone."""
    max_num_seqs: int = Field(8, ge=1)
    """Sequences the replica's batching engine decodes together (its KV slots): ar and sd requests
    without a chat session share every draft and target forward."""
    max_model_len: int = Field(2048, ge=16)
    """Tokens one batched sequence may hold (prompt + new tokens); each slot preallocates this much KV
    cache. A longer request runs on its own, unbatched."""
    max_queue_len: int = Field(16, ge=0)
    """Requests waiting for a free slot; one more gets RESOURCE_EXHAUSTED."""
    max_prefill_tokens: int = Field(MAX_PREFILL_TOKENS, ge=1)
    """Prompt tokens one engine round prefills beside the running rows' decoding; a longer prompt is
    prefilled in chunks over several rounds, so it never stalls the others for more than one chunk."""
    stop_prob: float = Field(STOP_PROB, ge=0, lt=1)
    """The early stop of sd rows on a CPU: a draft ends after a token the draft itself gives less than
    this probability (0 = always draft the policy's k). A GPU replica ignores it (every row drafts
    its k: the check would read the host every draft step)."""
    replicas: Replicas = Replicas()
    """Scaling and resources of the target deployment; `max_ongoing_requests` must let the engine
    fill its batch (at least max_num_seqs; max_num_seqs + max_queue_len lets requests queue in it)."""

    def served_model_name(self) -> str:
        """The model's name: the last component of `model` (a directory's name, a prepared name, a hub repo)."""
        return self.model.rstrip("/").rsplit("/", 1)[-1]

    @model_validator(mode="after")
    def _capacity(self):
        if self.replicas.max_ongoing_requests < self.max_num_seqs:
            raise ValueError(f"target.replicas.max_ongoing_requests ({self.replicas.max_ongoing_requests}) is "
                             f"below target.max_num_seqs ({self.max_num_seqs}): the engine could never fill its "
                             f"batch; raise max_ongoing_requests to at least {self.max_num_seqs} "
                             f"({self.max_num_seqs + self.max_queue_len} lets requests queue in the engine)")
        return self


class DraftConfig(_Strict):
    """The draft model's replicas: each serves the gRPC speculation stream (SSD)."""

    model: str = "qwen2.5-coder-0.5b"
    """Draft model, same vocabulary as the target: a prepared name, a local directory or a hub id."""
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    """Weights' dtype (auto: bfloat16 where the replica's GPU or CPU multiplies it natively, else
    float32; an int8 draft quantizes a float32 model whatever this says)."""
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    """auto (the replica's GPU when Ray gave it one and quantize is none, else the CPU), cpu, or cuda[:N]."""
    quantize: Literal["int8", "none"] = "int8"
    """Dynamic int8 linears (CPU) or none (GPU)."""
    threads: Optional[int] = Field(None, ge=1)
    """torch threads per replica (None: torch's default)."""
    host: str = "0.0.0.0"
    """Interface the speculation gRPC server binds to; targets connect to this node's IP."""
    port: int = Field(0, ge=0, le=65535)
    """Port of the speculation gRPC server (0: any free port, reported to the targets)."""
    max_seqs: int = Field(DRAFT_SLOTS, ge=1)
    """Sequences one speculation stream (one per target replica) holds at once: at least
    target.max_num_seqs, or the rows past it run without the draft. Slots left over keep ended chat
    turns' KV for their next turn (given up when a new sequence needs one)."""
    max_model_len: int = Field(DRAFT_MAX_LEN, ge=16)
    """Tokens one draft slot holds (prompt + output); a longer sequence finishes without the draft."""
    replicas: Replicas = Replicas()
    """Scaling and resources of the draft deployment."""


_LIMITS = Limits()  # the defaults' one owner: the limits the request validation applies


class LimitsConfig(_Strict):
    """What one request may ask for (larger requests get INVALID_ARGUMENT / RESOURCE_EXHAUSTED)."""

    max_tokens: int = Field(_LIMITS.max_tokens, ge=1)
    """The most new tokens a request may ask for."""
    default_max_tokens: int = Field(_LIMITS.default_max_tokens, ge=1)
    """New tokens when a request does not say."""
    max_prompt_chars: int = Field(_LIMITS.max_prompt_chars, ge=1)
    """Longer prompts (or chat messages) are refused before tokenizing."""
    k_max: int = Field(_LIMITS.k_max, ge=1, le=64)
    """The largest draft length (speculation.k) a request may ask for."""
    default_mode: Optional[Literal["ar", "sd", "ssd"]] = None
    """Mode of requests that do not say (None: ssd with a draft deployment, else ar)."""


class RetryConfig(_Strict):
    """How the router survives a target replica that fails (dies, restarts, breaks its stream): before
    the first chunk the request is sent again, after it the rest is resumed on another replica from
    the tokens the client already has. Consecutive failures wait backoff_s, 2 x backoff_s, ... (at most
    max_backoff_s) between attempts; after `attempts` of them the call ends UNAVAILABLE."""

    attempts: int = Field(6, ge=0)
    """Retries after consecutive failures of one request (a chunk from the new replica resets the count);
    0 turns retrying and resuming off."""
    backoff_s: float = Field(0.25, ge=0)
    """Wait before the first retry; each next one waits twice as long."""
    max_backoff_s: float = Field(4.0, ge=0)
    """The longest wait between two attempts (the defaults keep retrying for about 12 s; raise it when a
    single target replica must be restarted, model load included, before requests can go on)."""


class AppConfig(_Strict):
    """A specserve application: target and draft deployments, the router, sessions and limits."""

    target: TargetConfig = TargetConfig()
    """The target deployment."""
    draft: Optional[DraftConfig] = DraftConfig()
    """The draft deployment (null: no draft, only mode ar)."""
    router: Replicas = Replicas(num_cpus=0.1, max_ongoing_requests=64, target_ongoing_requests=32)
    """Scaling and resources of the router (the gRPC ingress)."""
    redis_url: Optional[str] = None
    """Session store: redis://host:port/db (None: $REDIS_URL, else in-memory, lost on restart).
    `${NAME}` in it is replaced by the router's environment variable NAME, URL-quoted, so a password
    can come from a Kubernetes Secret: redis://:${SPECSERVE_REDIS_PASSWORD}@specserve-redis:6379/0."""
    session_ttl_s: float = Field(86400.0, gt=0)
    """Sessions idle this long are forgotten."""
    auth_token: Optional[str] = None
    """Bearer token every call must carry (`authorization: Bearer <token>`); `env:NAME` reads it from
    the router's environment (a Kubernetes Secret). None: no token (fine on loopback; set one on a cluster)."""
    limits: LimitsConfig = LimitsConfig()
    """Per-request limits."""
    retry: RetryConfig = RetryConfig()
    """Retrying and resuming requests whose target replica failed."""

    @model_validator(mode="after")
    def _modes(self):
        mode = self.limits.default_mode
        if mode in ("sd", "ssd") and self.draft is None:
            raise ValueError(f"limits.default_mode is {mode} but there is no draft: set draft or use ar")
        if mode == "sd" and not self.target.local_draft:
            raise ValueError("limits.default_mode is sd but target.local_draft is false: turn it on or use ssd")
        if self.draft is not None and self.draft.max_seqs < self.target.max_num_seqs:
            raise ValueError(f"draft.max_seqs ({self.draft.max_seqs}) is below target.max_num_seqs "
                             f"({self.target.max_num_seqs}): a full batch of ssd rows would not fit the draft's "
                             f"slots; raise draft.max_seqs to at least {self.target.max_num_seqs}")
        return self

    @property
    def modes(self) -> tuple[str, ...]:
        """The speculation modes this application can run."""
        if self.draft is None:
            return ("ar",)
        return ("ar", "sd", "ssd") if self.target.local_draft else ("ar", "ssd")

    @property
    def default_mode(self) -> str:
        return self.limits.default_mode or ("ssd" if self.draft is not None else "ar")

    def resolved_redis_url(self) -> Optional[str]:
        """redis_url with each `${NAME}` read from the environment (ValueError when unset), else $REDIS_URL."""
        if not self.redis_url:
            return os.environ.get("REDIS_URL") or None

        def env(m: re.Match) -> str:
            value = os.environ.get(m.group(1))
            if not value:
                raise ValueError(f"redis_url names ${{{m.group(1)}}} but ${m.group(1)} is not set in the router's environment")
            return urllib.parse.quote(value, safe="")

        return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", env, self.redis_url)

    def resolved_auth_token(self) -> Optional[str]:
        """The bearer token, with `env:NAME` read from the environment (ValueError when unset)."""
        tok = self.auth_token
        if tok and tok.startswith("env:"):
            name = tok[4:]
            tok = os.environ.get(name)
            if not tok:
                raise ValueError(f"auth_token is env:{name} but ${name} is not set in the router's environment")
        return tok or None

    def served_model_name(self) -> str:
        """The `model` the OpenAI API serves (and metrics are labelled with): the target's name."""
        return self.target.served_model_name()


def load_serve_config(path: str) -> tuple[AppConfig, dict]:
    """Read a Serve config file (like deployments/serve_config.yaml) -> (its app's AppConfig, the file).

    Checks the whole file against Ray's own schema first, so `serve run` would accept it too.
    """
    import yaml
    from ray.serve.schema import ServeDeploySchema

    with open(path) as f:
        raw = yaml.safe_load(f)
    ServeDeploySchema.model_validate(raw)
    apps = [a for a in raw.get("applications", []) if a.get("import_path", "").startswith("deployments.app:")]
    if len(apps) != 1:
        raise ValueError(f"{path}: expected one application with import_path deployments.app:build_app, "
                         f"found {len(apps)}")
    return AppConfig.model_validate(apps[0].get("args") or {}), raw
