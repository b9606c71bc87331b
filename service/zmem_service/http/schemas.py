"""The JSON bodies' schemas: what a request may carry, as pydantic models.

The codecs (`codecs.py`) validate with them; the OpenAPI schema shows them (through the
routes' declarations, `edge.declare(schema=...)`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    ValidatorFunctionWrapHandler,
    field_validator,
)
from pydantic_core import PydanticCustomError

from zmem_core.limits import MAX_ID_CHARS, MAX_K, MAX_SIGMA, MAX_WORKER_CHARS, MIN_SIGMA

from ..settings import NoBool

# strict: a JSON string or boolean is not a number (ints are).
Finite = Annotated[float, Field(allow_inf_nan=False, strict=True)]


class EpisodeIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    z: list[Finite]
    soft_bind: Finite
    cone_vol: Finite
    lambda_bind: Finite
    E_T: Finite = 0.0
    lambda_T: Finite = 0.0
    Hr: Finite = 0.0
    id: str | None = Field(None, min_length=1, max_length=MAX_ID_CHARS)
    worker: str | None = Field(None, max_length=MAX_WORKER_CHARS)


class EpisodesIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    episodes: list[EpisodeIn]


class QueryOptions(BaseModel):
    """The options of a neighbours/risk query (body fields or query parameters)."""

    model_config = ConfigDict(extra="forbid")

    k: Annotated[int | None, NoBool] = Field(None, ge=1, le=MAX_K)
    sigma: Annotated[float, Field(ge=MIN_SIGMA, le=MAX_SIGMA, strict=True)] | Literal["auto"] | None = None
    record: bool = False
    worker: str | None = Field(None, max_length=MAX_WORKER_CHARS)  # a recorded query's worker

    @field_validator("sigma", mode="wrap")
    @classmethod
    def _sigma_says_both_forms(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        # The union reports one error per member, and "(and 1 more)" hid the "auto" one.
        try:
            return handler(value)
        except ValidationError:
            raise PydanticCustomError(
                "sigma",
                'must be a positive number or "auto" (numbers in [{lo}, {hi}]), got {value}',
                {"lo": f"{MIN_SIGMA:g}", "hi": f"{MAX_SIGMA:g}", "value": repr(value)},
            ) from None


class QueryIn(QueryOptions):
    z: list[Finite] | list[list[Finite]]


class QueriesIn(BaseModel):
    """The JSON body of `POST …/queries` (the schema; `codecs.decode_queries` does the checking)."""

    risk: list[float]
    wsum: list[float]
    n_eff: list[float]
    worker: str | None = Field(None, max_length=MAX_WORKER_CHARS)


EPISODE_LIST = TypeAdapter(list[EpisodeIn])
ROWS = TypeAdapter(list[list[Finite]])
ROW = TypeAdapter(list[Finite])
