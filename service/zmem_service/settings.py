"""Settings: the service's start-up configuration and each memory's own settings.

`ServiceSettings` is read from `ZMEM_*` environment variables (and the `zmem serve`
flags that override them). `MemorySettings` travel with a memory: they are stored
with it and are authoritative from then on; the service's memory flags are only
defaults for memories created later.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ByteSize,
    ConfigDict,
    Field,
    SecretStr,
    TypeAdapter,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError
from pydantic_settings import BaseSettings, SettingsConfigDict

from zmem_core.limits import MAX_BATCH, MAX_CAPACITY, MAX_K, MAX_SIGMA, MAX_Z_DIM, MIN_SIGMA


def _no_bool(value: Any) -> Any:
    # JSON's true and false are not numbers, though pydantic's lax mode takes them as 1 and 0.
    if isinstance(value, bool):
        raise PydanticCustomError("bool_for_number", "must be a number, not a boolean")
    return value


NoBool = BeforeValidator(_no_bool)
"""On a number field (`Annotated[int | None, NoBool]`): a boolean is refused, not taken as 1 or 0."""


def _sigma_either(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    # The union reports one error per member, and "(and 1 more)" hid the "auto" one.
    try:
        _no_bool(value)
        return handler(value)
    except (ValidationError, PydanticCustomError):
        raise PydanticCustomError(
            "sigma", 'must be a positive number or "auto", got {value}', {"value": repr(value)[:40]}
        ) from None


Sigma = Annotated[float | Literal["auto"], WrapValidator(_sigma_either)]


_BYTE_SIZE = TypeAdapter(ByteSize)


def _byte_size(value: Any) -> Any:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    try:
        return int(_BYTE_SIZE.validate_python(value))
    except ValidationError:
        raise PydanticCustomError(
            "byte_size",
            "must be a size in bytes: an integer or a number with a unit (4GiB, 512MiB, 64KB), got {value}",
            {"value": repr(value)[:40]},
        ) from None


BYTE_SIZE = BeforeValidator(_byte_size)
Bytes = Annotated[int, BYTE_SIZE]
"""A size in bytes, from an integer or a string with a unit ("32MiB", "4 GiB", "2GB"), held as an int."""


def is_byte_size(field: FieldInfo) -> bool:
    """Whether a settings field is a size in bytes (`Bytes`)."""
    return any(meta is BYTE_SIZE for meta in field.metadata)


LogLevel = Annotated[
    Literal["critical", "error", "warning", "info", "debug"],
    BeforeValidator(lambda value: value.lower() if isinstance(value, str) else value),
]
LogFormat = Annotated[
    Literal["text", "json"],
    BeforeValidator(lambda value: value.lower() if isinstance(value, str) else value),
]


class RiskWeights(BaseModel):
    """Weights of the risk target r = a·(1 − soft_bind) + b·log(cone_vol + eps) + c·lambda_bind."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    a: Annotated[float, NoBool] = Field(1.0, allow_inf_nan=False)
    b: Annotated[float, NoBool] = Field(0.2, allow_inf_nan=False)
    c: Annotated[float, NoBool] = Field(0.05, allow_inf_nan=False)
    eps: Annotated[float, NoBool] = Field(1e-8, gt=0, allow_inf_nan=False)


class MemorySettings(BaseModel):
    """A memory's settings; `z_dim` is None until the first write (or PUT) fixes it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    z_dim: int | None = Field(None, ge=1, le=MAX_Z_DIM)
    capacity: int = Field(50_000, ge=1, le=MAX_CAPACITY)
    min_size: int = Field(500, ge=0)
    k: int = Field(64, ge=1, le=MAX_K)
    sigma: Sigma = 1.0
    risk: RiskWeights = RiskWeights()

    @model_validator(mode="after")
    def _check(self) -> MemorySettings:
        if self.min_size > self.capacity:
            raise ValueError(f"min_size ({self.min_size}) must be <= capacity ({self.capacity})")
        if isinstance(self.sigma, float) and not MIN_SIGMA <= self.sigma <= MAX_SIGMA:
            raise ValueError(f"sigma must be in [{MIN_SIGMA}, {MAX_SIGMA}] or 'auto', got {self.sigma}")
        return self

    def differences(self, other: MemorySettings) -> list[dict[str, Any]]:
        """Fields whose values differ, as `{"field", "stored", "requested"}` (risk weights by name)."""
        mine, theirs = self.model_dump(), other.model_dump()
        out = []
        for field in mine:
            if field == "risk":
                for key in mine["risk"]:
                    if mine["risk"][key] != theirs["risk"][key]:
                        out.append(
                            {
                                "field": f"risk.{key}",
                                "stored": mine["risk"][key],
                                "requested": theirs["risk"][key],
                            }
                        )
            elif mine[field] != theirs[field]:
                out.append({"field": field, "stored": mine[field], "requested": theirs[field]})
        return out


class MemorySettingsIn(BaseModel):
    """Body of `PUT /memories/{name}`: every field optional; missing ones take the defaults."""

    model_config = ConfigDict(extra="forbid")

    z_dim: Annotated[int | None, NoBool] = Field(None, ge=1, le=MAX_Z_DIM)
    capacity: Annotated[int | None, NoBool] = Field(None, ge=1, le=MAX_CAPACITY)
    min_size: Annotated[int | None, NoBool] = Field(None, ge=0)
    k: Annotated[int | None, NoBool] = Field(None, ge=1, le=MAX_K)
    sigma: Sigma | None = None
    risk: RiskWeights | None = None


class ServiceSettings(BaseSettings):
    """Start-up configuration of `zmem serve`; each field has a `ZMEM_<FIELD>` variable, and each
    field with a description a `--<field>` flag (`cli.py` derives them; secrets have none)."""

    model_config = SettingsConfigDict(env_prefix="ZMEM_", extra="ignore")

    host: str = Field("127.0.0.1", description="address to bind")
    port: int = Field(8000, ge=0, le=65535, description="port to listen on")
    data_dir: Path = Field(Path("zmem-data"), description="where the SQLite store lives")
    durability: Literal["full", "normal", "none"] = Field(
        "full",
        description="full (fsync every commit), normal (survives a crash of the process, "
        "not of the machine) or none (no disk: a restart starts empty)",
    )
    device: str = Field(
        "auto",
        pattern=r"^(auto|cpu|cuda(:[0-9]+)?)$",
        description="kNN device: auto (a usable GPU, else the CPU), cpu, cuda or cuda:N",
    )
    cuda_graphs: Literal["on", "off"] = Field(
        "on",
        description="on a GPU: replay the fixed-shape search from CUDA graphs (eager where capture "
        "fails, said once in the log)",
    )
    knn_threads: int = Field(0, ge=0, description="OpenMP threads for batched searches; 0 = all cores")

    # Defaults for memories created later (a stored memory keeps its own settings).
    capacity: int = Field(50_000, ge=1, le=MAX_CAPACITY, description="default capacity of new memories")
    min_size: int | None = Field(
        None, ge=0, description="default min_size of new memories; unset: min(500, capacity)"
    )
    k: int = Field(64, ge=1, le=MAX_K, description="default k of new memories")
    sigma: Sigma = Field(1.0, description='default sigma of new memories: a number or "auto"')
    risk_a: float = Field(1.0, description="default risk weight a of new memories (on 1 - soft_bind)")
    risk_b: float = Field(0.2, description="default risk weight b of new memories (on log(cone_vol + eps))")
    risk_c: float = Field(0.05, description="default risk weight c of new memories (on lambda_bind)")
    risk_eps: float = Field(1e-8, gt=0, description="default eps of new memories' log(cone_vol + eps)")

    # Limits (SPEC §5).
    max_body_bytes: Bytes = Field(32 * 2**20, ge=1024, description="largest request body; past it a 413")
    max_import_bytes: Bytes = Field(
        16 * 2**30, ge=1024, description="largest import file (streamed to a temporary file, not memory)"
    )
    max_concurrent_exports: int = Field(
        2, ge=1, description="exports built at once; a few more wait, the rest get 503"
    )
    max_batch: int = Field(MAX_BATCH, ge=1, description="episodes or query rows per request")
    max_response_floats: int = Field(
        2**24, ge=1, description="floats in one answer (rows x k x z_dim); past it a 422"
    )
    max_memory_bytes: Bytes = Field(
        4 * 2**30, ge=1, description="budget for all memories: rings, ids, recorded queries; past it a 507"
    )
    max_pending_writes: int = Field(10_000, ge=1, description="queued write requests before 503")
    recorded_queries: int = Field(
        100_000, ge=0, description="recorded queries kept per memory for the diagnostics"
    )
    max_response_bytes: Bytes = Field(64 * 2**20, ge=1024, description="largest answer body; past it a 422")
    # The HTTP server (server.py).
    max_header_bytes: Bytes = Field(
        16 * 1024, ge=1024, description="largest request line + headers; past it a 431"
    )
    header_timeout: float = Field(10.0, gt=0, description="seconds for a request's headers to arrive")
    body_timeout: float = Field(
        30.0, gt=0, description="seconds a request body may send nothing before the connection closes"
    )
    keep_alive_timeout: int = Field(5, ge=1, description="seconds an idle keep-alive connection stays open")
    max_connections: int = Field(
        1000,
        ge=1,
        description="open connections at once (fewer if the open-file limit is lower); more get 503",
    )
    max_long_polls: int = Field(
        256, ge=0, description="changes-feed long polls waiting at once; past it they answer at once (wait=0)"
    )
    min_transfer_rate: Bytes = Field(
        1 << 20,
        gt=0,
        description="bytes/s a large body or answer must keep up while it holds one of the slots they "
        "share (after 2 s of grace); slower ones are dropped",
    )
    busy_poll: float = Field(
        0.001,
        ge=0,
        le=1,
        description="seconds the event loop polls for the next request after answering a query, "
        "rather than sleeping, while its core is free; 0: never",
    )

    # The log.
    log_level: LogLevel = Field("info", description="how much the service logs")
    log_format: LogFormat = Field(
        "text",
        description="the log's lines: text, or json (one object a line: time, level, logger, message "
        "and the record's extra fields)",
    )
    access_log: bool = Field(False, description="a line per request (always on at --log-level debug)")
    log_summary_seconds: float = Field(
        60.0,
        ge=0,
        description="seconds between the log's summary lines (requests, errors, writes, queries); 0: none",
    )

    token: SecretStr | None = None  # secrets have no flag: they would show in `ps`
    read_token: SecretStr | None = None
    token_file: Path | None = Field(None, description="file holding the read+write bearer token")
    read_token_file: Path | None = Field(None, description="file holding the read-only bearer token")

    def memory_defaults(self, z_dim: int | None = None) -> MemorySettings:
        """The settings a memory created now gets (raises ValueError when they are invalid)."""
        min_size = min(500, self.capacity) if self.min_size is None else self.min_size
        return MemorySettings(
            z_dim=z_dim,
            capacity=self.capacity,
            min_size=min_size,
            k=self.k,
            sigma=self.sigma,
            risk=RiskWeights(a=self.risk_a, b=self.risk_b, c=self.risk_c, eps=self.risk_eps),
        )

    def resolve(self, requested: MemorySettingsIn) -> MemorySettings:
        """Fill the missing fields of a PUT body from the defaults."""
        given = requested.model_dump(exclude_none=True)
        base = self.memory_defaults().model_dump()
        if "capacity" in given and "min_size" not in given:
            base["min_size"] = min(base["min_size"], given["capacity"])
        base.update(given)
        return MemorySettings.model_validate(base)

    @model_validator(mode="after")
    def _check(self) -> ServiceSettings:
        self.memory_defaults()  # fail at start, not on the first write
        return self
