"""The one settings object. Read once per process (``get_settings``), passed down; nothing happens at import."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Every setting is an environment variable with the ``DISTILLERY_`` prefix (e.g. ``DISTILLERY_DATABASE_URL``)."""

    model_config = SettingsConfigDict(env_prefix="DISTILLERY_", env_file=None, extra="ignore")

    environment: Literal["development", "production", "test"] = Field(
        "development", description="`production` refuses the embedded defaults (SQLite, filesystem broker)."
    )
    data_dir: Path = Field(Path("./data"), description="Artifacts, embedded database and embedded broker live here.")
    database_url: str | None = Field(
        None,
        description="SQLAlchemy URL. Postgres: postgresql+psycopg://user:pass@host/db. "
        "Default: SQLite file under data_dir (the embedded mode).",
    )
    broker_url: str | None = Field(
        None,
        description="Celery broker URL (redis://host:6379/0). Default: a filesystem transport under data_dir.",
    )
    queue_name: str = Field(
        "distillery",
        description="Celery queue the api publishes to and workers consume. Jobs with training.device cuda go to "
        "<queue_name>.gpu instead, which only workers that take GPU jobs consume.",
    )
    api_url: str = Field("http://127.0.0.1:8000", description="Where the CLI finds the API.")

    # api
    host: str = Field("127.0.0.1", description="Address `distillery api`/`up` listen on.")
    port: int = Field(8000, description="Port `distillery api`/`up` listen on.")
    enable_jobs_api: bool = Field(
        True, description="Serve /v1/jobs and /v1/datasets (turn off on inference-only replicas)."
    )
    enable_inference_api: bool = Field(True, description="Serve predict endpoints (turn off on jobs-only replicas).")
    max_request_bytes: int = Field(1_048_576, description="Largest JSON request body accepted (413 above).")
    api_threads: int = Field(16, ge=1, description="Threads that run blocking request work (DB reads, torch).")
    db_pool_size: int = Field(16, ge=1, description="Database connections kept per process (match api_threads).")

    # tenants, keys, quotas
    auth_required: bool | None = Field(
        None, description="Require API keys. Default: on in production, off otherwise (the embedded single tenant)."
    )
    api_key_cache_s: float = Field(10.0, ge=0, description="How long a verified key is trusted without a query.")
    default_tenant: str = Field("default", description="The tenant of requests when keys are not required.")
    metrics_token: str | None = Field(
        None,
        description="Where API keys are required, /metrics answers only `Authorization: Bearer <this token>` (its "
        "series name every tenant's models; give it to the Prometheus scrape config); unset there, /metrics is a 401. "
        "Without keys (the embedded single tenant) /metrics is open.",
    )
    bootstrap_api_key: str | None = Field(
        None, description="A key (dk_<8 hex>_<secret>) the api registers at start for bootstrap_tenant (compose)."
    )
    bootstrap_tenant: str = Field("default", description="Tenant of the bootstrap key.")
    max_active_jobs_per_tenant: int = Field(100, ge=1, description="Queued + running jobs per tenant (429 above).")
    max_storage_bytes_per_tenant: int = Field(
        200 * 1024**3,
        ge=1,
        description="Model and dataset bytes per tenant (429 for an upload past it, and for a job submitted while it "
        "is reached: a job's model is stored at its end, whatever its size).",
    )
    idempotency_retention_s: int = Field(24 * 3600, ge=3600, description="How long Idempotency-Keys are kept.")

    # worker
    worker_concurrency: int = Field(1, description="Tasks run at once per worker (one per GPU).")
    worker_gpu_jobs: bool | None = Field(
        None,
        description="Whether this worker also consumes <queue_name>.gpu (jobs with training.device cuda). Default: "
        "when torch sees a GPU. `distillery up` sets it for its one worker, so that a cuda job on a machine without "
        "a GPU fails with code no_gpu instead of waiting for a GPU worker.",
    )
    torch_threads: int = Field(
        0,
        description="torch intra-op threads in worker/api; 0 = torch's default, except that small tabular jobs "
        "train on one thread (two were no faster idle, 3-10x slower on a busy CPU).",
    )
    progress_interval_s: float = Field(0.5, description="Least time between two progress writes of a running job.")
    visibility_timeout_s: int = Field(6 * 3600, description="Redis: redelivery of unacked tasks after this long.")
    heartbeat_interval_s: float = Field(5.0, description="How often a running job's worker proves it is alive.")
    heartbeat_stale_s: float = Field(
        60.0,
        description="A running job whose heartbeat is older than this is taken over by the next delivery (its "
        "worker died); a cancel or pause of such a job takes effect at once.",
    )
    max_attempts: int = Field(3, ge=1, description="Attempts lost to dead workers before a job fails.")
    checkpoint_interval_s: float = Field(30.0, gt=0, description="Checkpoint a running job at least this often.")
    db_retry_s: float = Field(
        300.0, ge=0, description="How long a worker keeps retrying its writes while the database is unreachable."
    )
    reconcile_interval_s: float = Field(5.0, gt=0, description="How often a worker's reconciler pass runs.")
    republish_after_s: float = Field(
        15.0, gt=0, description="A queued job missing from the broker this long is published again."
    )
    job_time_limit_s: int = Field(
        24 * 3600,
        description="Hard time limit of one job attempt; the attempt stops itself (failed, code time_limit) two "
        "tenths of it (at most 2 min) sooner, Celery's soft limit one tenth (at most 1 min) sooner.",
    )

    # artifact store
    artifact_store: Literal["local", "s3"] = Field(
        "local",
        description="local: data_dir/artifacts is the store (one host or a shared filesystem); s3: an "
        "S3-compatible bucket, with data_dir/artifacts as each machine's cache. Credentials: the usual AWS_* "
        "variables.",
    )
    s3_bucket: str | None = Field(None, description="Bucket of the s3 artifact store.")
    s3_prefix: str = Field("distillery", description="Key prefix of the artifacts in the bucket.")
    s3_endpoint_url: str | None = Field(
        None, description="S3 endpoint for S3-compatible servers (MinIO, Ceph, R2); default: AWS."
    )
    s3_region: str | None = Field(None, description="S3 region (default: from the AWS configuration).")

    model_roots: list[Path] = Field(
        default_factory=list,
        description="Local folders transformers teachers may be read from (JSON list); paths outside are refused.",
    )
    allow_hub_downloads: bool = Field(
        False, description="Let workers download hub models not found offline (off: no network at run time)."
    )
    allow_url_sources: bool = Field(False, description="Accept datasets by URL (POST /v1/datasets/import).")
    url_sources_allow_private: bool = Field(
        False, description="Let URL sources reach private addresses (air-gapped networks only; SSRF risk)."
    )
    max_upload_bytes: int = Field(2 * 1024**3, description="Largest dataset or model upload (413 above).")

    # serving
    model_cache_size: int = Field(16, description="Loaded models kept in memory per api process (LRU).")
    model_cache_bytes: int = Field(
        8 * 1024**3, ge=0, description="Bytes of weights kept loaded per api process (LRU beyond; 0 = no bound)."
    )
    max_batch_size: int = Field(
        64, ge=1, description="Most rows (inputs) in one batched forward; a request with more is refused (4xx)."
    )
    max_queue_delay_us: int = Field(
        0,
        ge=0,
        description="How long a batch may wait for more requests (µs) after its first; 0 = batch whatever is "
        "waiting when the model becomes free.",
    )
    max_queue_size: int = Field(
        512, ge=1, description="Requests waiting or running per model; more are refused with 429 and Retry-After."
    )
    inference_timeout_s: float = Field(
        30.0,
        gt=0,
        description="Longest a request waits for its result (504 after), queueing included; for a completion batched "
        "step by step (continuous batching), longest it waits to start generating: once it has, it runs until it is "
        "done or its client goes away.",
    )
    model_load_wait_s: float = Field(
        60.0, ge=0, description="Longest a request waits for its model to load (503 model_loading after)."
    )
    inference_inline_max_us: int = Field(
        3000,
        ge=0,
        description="Requests whose forward is estimated (from measurements at load) at most this many µs run on the "
        "event loop when nothing is queued for their model: at low load that saves two thread hand-offs and the "
        "inference thread's cold start; under load requests go to the batcher. The loop is held for that long, so "
        "other models' requests wait as much. 0 = always the inference thread; on a GPU always the thread.",
    )
    inference_device: Literal["cpu", "cuda", "auto"] = Field(
        "cpu",
        description="Where the api runs its models: cpu (the serving variant the job chose), cuda (the model on the "
        "GPU in inference_gpu_dtype; the api refuses to start without one) or auto (cuda when torch sees one).",
    )
    inference_gpu_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description="The weights' dtype when transformers models (LMs, embedders, text classifiers) are served on a "
        "GPU: bfloat16 (half the memory, the tensor cores' rate; outputs still float32), float32 (as trained), or auto "
        "= bfloat16 where the GPU computes in it (Ampere and later), else float32 (bfloat16 asked for on an older GPU "
        "is emulated: half the memory, slower). Tabular MLPs stay float32. Ignored on the CPU, where the job's "
        "measured variant decides.",
    )
    inference_torch_threads: int = Field(
        1, ge=0, description="torch intra-op threads for inference in the api; 0 = leave torch_threads."
    )
    verify_artifacts: bool = Field(
        True,
        description="Check every file of a stored model against its recorded size and sha256 before it is loaded "
        "(for serving, or as a teacher): a corrupt artifact is refused, not used. Costs one read of the files per "
        "load (about 1 s per 2 GB here).",
    )
    alias_refresh_s: float = Field(
        2.0, gt=0, description="How often a `latest:<job name>` alias looks for a newer model."
    )
    max_completion_tokens: int = Field(
        1024, ge=1, description="Largest max_tokens a completion request may ask for (400 above)."
    )
    prefill_chunk_tokens: int = Field(
        512,
        ge=0,
        description="Continuous batching: most prompt tokens (rows × columns, padding included) per prefill forward. "
        "Longer prompts are prefilled over several decode steps, so running completions keep getting tokens "
        "meanwhile (chunked prefill). 0 = each prompt in one forward.",
    )
    max_batch_total_tokens: int = Field(
        0,
        ge=0,
        description="Continuous batching: most tokens (rows × columns, padding included) a causal LM's KV cache may "
        "come to hold: each running prompt counted as wide as the widest prompt + max_tokens, as TGI's "
        "max_batch_total_tokens. A completion request that does not fit beside the running ones waits in the queue "
        "until enough of them finish; one that does not fit alone is refused (400). Bounds the KV cache's memory "
        "(bytes per token: 2 × layers × KV heads × head size × the dtype's bytes). 0 = no bound (max_batch_size "
        "prompts).",
    )
    prefix_cache_mb: int = Field(
        256,
        ge=0,
        description="Continuous batching: memory per loaded causal LM (on its device, besides the weights that "
        "model_cache_bytes counts) for prompts' keys and values, kept so "
        "that a later prompt beginning with the same tokens (a system prompt, few-shot examples, a conversation's "
        "earlier turns; matched in blocks of 16 tokens) prefills only the rest (least recently used dropped first; "
        "reported as usage.prompt_tokens_details.cached_tokens). 0 = off. Measured on 2-core CPUs (first token "
        "1,789 -> 244 ms); on an H200 it cost more than the prefill it saved (10.9 M LM, 400 shared tokens: 1,595 "
        "against 4,132 tokens/s, 2026-12-04): 0 for GPU serving until that is looked at.",
    )

    # limits that make a spec impossible to run (422 at submission)
    max_student_params: int = Field(2_000_000_000, description="Largest student accepted, in parameters.")
    max_steps: int = Field(10_000_000, description="Most optimizer steps a job may ask for.")
    max_dataset_rows: int = Field(10_000_000, description="Most rows a synthetic/builtin dataset may have.")

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'distillery.db').resolve()}"

    @property
    def resolved_broker_url(self) -> str:
        return self.broker_url or "filesystem://"

    @property
    def artifacts_dir(self) -> Path:
        return self.data_dir / "artifacts"

    @property
    def checkpoints_dir(self) -> Path:
        return self.data_dir / "checkpoints"

    @property
    def run_dir(self) -> Path:
        return self.data_dir / "run"

    @property
    def broker_dir(self) -> Path:
        return self.data_dir / "broker"

    @property
    def is_sqlite(self) -> bool:
        return self.resolved_database_url.startswith("sqlite")

    @property
    def keys_required(self) -> bool:
        return self.auth_required if self.auth_required is not None else self.environment == "production"

    def check_production(self) -> None:
        """Refuse to start a production process on the embedded defaults or without API keys."""
        if self.environment != "production":
            return
        if self.auth_required is False:
            raise ValueError("API keys cannot be turned off when DISTILLERY_ENVIRONMENT=production")
        if self.database_url is None or self.is_sqlite:
            raise ValueError("DISTILLERY_DATABASE_URL must point at Postgres when DISTILLERY_ENVIRONMENT=production")
        if self.broker_url is None:
            raise ValueError("DISTILLERY_BROKER_URL must be set when DISTILLERY_ENVIRONMENT=production")
        if self.artifact_store == "s3" and not self.s3_bucket:
            raise ValueError("DISTILLERY_S3_BUCKET must be set when DISTILLERY_ARTIFACT_STORE=s3")


@functools.cache
def get_settings() -> Settings:
    return Settings()


ALL = "all"
API = "api, serve"  # `distillery serve` is the api with the jobs API off
WORKER = "worker"
#: which processes read each setting (docs/configuration.md; a test keeps it complete)
READ_BY: dict[str, str] = {
    "environment": ALL,
    "data_dir": ALL,
    "database_url": ALL,
    "broker_url": f"{API}, {WORKER} (a serve replica too: production refuses to start without it, /readyz pings it)",
    "queue_name": "api, worker",
    "api_url": "CLI",
    "host": f"{API}, up",
    "port": f"{API}, up",
    "enable_jobs_api": API,
    "enable_inference_api": API,
    "max_request_bytes": API,
    "api_threads": API,
    "db_pool_size": API,
    "auth_required": API,
    "api_key_cache_s": API,
    "metrics_token": API,
    "default_tenant": API,
    "bootstrap_api_key": API,
    "bootstrap_tenant": API,
    "max_active_jobs_per_tenant": "api",
    "max_storage_bytes_per_tenant": f"{API} (uploads; job submissions while storage is full)",
    "idempotency_retention_s": "worker (reconciler purges older keys)",
    "worker_concurrency": WORKER,
    "worker_gpu_jobs": WORKER,
    "torch_threads": f"{WORKER}, {API}",
    "progress_interval_s": WORKER,
    "visibility_timeout_s": f"{API}, {WORKER}",
    "heartbeat_interval_s": WORKER,
    "heartbeat_stale_s": "api, worker",
    "max_attempts": WORKER,
    "checkpoint_interval_s": WORKER,
    "db_retry_s": WORKER,
    "reconcile_interval_s": WORKER,
    "republish_after_s": WORKER,
    "job_time_limit_s": WORKER,
    "artifact_store": ALL,
    "s3_bucket": ALL,
    "s3_prefix": ALL,
    "s3_endpoint_url": ALL,
    "s3_region": ALL,
    "model_roots": "api (checks specs), worker",
    "allow_hub_downloads": "api (checks specs), worker",
    "allow_url_sources": "api",
    "url_sources_allow_private": "api",
    "max_upload_bytes": f"{API} (model uploads)",
    "model_cache_size": API,
    "model_cache_bytes": API,
    "max_batch_size": API,
    "max_queue_delay_us": API,
    "max_queue_size": API,
    "inference_timeout_s": API,
    "model_load_wait_s": API,
    "inference_inline_max_us": API,
    "inference_device": API,
    "inference_gpu_dtype": API,
    "inference_torch_threads": f"{API}, {WORKER} (times serving variants at it)",
    "verify_artifacts": f"{API}, {WORKER}",
    "alias_refresh_s": API,
    "max_completion_tokens": API,
    "prefill_chunk_tokens": API,
    "prefix_cache_mb": API,
    "max_batch_total_tokens": API,
    "max_student_params": "api (checks specs)",
    "max_steps": "api (checks specs)",
    "max_dataset_rows": "api (checks specs)",
}


def configuration_reference() -> str:
    """docs/configuration.md, generated from the fields above (a test keeps the two equal)."""
    defaults = {
        "database_url": "SQLite file `<data_dir>/distillery.db`",
        "broker_url": "filesystem transport under `<data_dir>/broker`",
    }
    lines = [
        "# Configuration",
        "",
        "Every setting is an environment variable with the `DISTILLERY_` prefix, read once per process by",
        '`app/settings.py` (pydantic-settings). Generated by `python -m app.settings`. "read by": the processes',
        "that use it (`api`: `distillery api`, `serve`: `distillery serve`, `worker`: `distillery worker`, `up`: the",
        "embedded `distillery up`, which runs an api and a worker and so reads both sets).",
        "",
        "| variable | default | read by | description |",
        "|---|---|---|---|",
    ]
    for name, field in Settings.model_fields.items():
        value = field.get_default(call_default_factory=True)  # a default_factory's value, not PydanticUndefined
        default = defaults.get(name, f"`{value}`")
        lines.append(f"| `DISTILLERY_{name.upper()}` | {default} | {READ_BY[name]} | {field.description or ''} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(configuration_reference(), end="")
