"""One exception root for everything setsuna raises.

Callers catch :class:`SetsunaError` to handle any setsuna failure, or a leaf
to handle one kind. Foreign exceptions (onnxruntime, tritonclient, protobuf,
OS errors) are translated at the boundary where they happen, with the cause
chained, so trading code never has to import a third-party exception type.

::

    SetsunaError
    ├── ConfigError            a setting, model config or CLI flag is invalid
    ├── InputError             a request does not match the model's schema
    │   ├── ShapeError         wrong number of features / wrong dims
    │   ├── DTypeError         a dtype that cannot be cast without loss
    │   └── NaNError           NaN or ±inf where the model does not allow it
    ├── SourceError            a source model cannot be read or converted
    │   ├── UnknownModelTypeError
    │   └── PickleRefusedError
    ├── ArtifactError          a built artifact is missing or does not verify
    │   └── TamperedArtifactError
    ├── GateError              no candidate passed the accuracy gate
    ├── EngineError            a runtime failed to load or run an engine
    ├── ServerError            the local Triton server failed to start or stop
    ├── MarketDataError        ticks, bars or a market-data file are unusable
    │   ├── BadValueError      NaN, inf or a negative price/size
    │   ├── OutOfOrderError    a symbol's timestamp went backwards or repeated
    │   ├── UnknownSymbolError a symbol the engine/builder was not set up with
    │   └── DataFormatError    a file's columns or types are not the expected ones
    ├── SnapshotError          feature-engine state bytes cannot be restored
    ├── ServingError           a call to a Triton server failed (setsuna.client)
    │   ├── UnavailableError   the server cannot be reached or went away (retried)
    │   ├── OverloadedError    the server refused the request: queue full (retried)
    │   ├── DeadlineError      no answer within the call's deadline_ms (not retried)
    │   ├── ModelNotReadyError the model is not loaded or not ready (not retried)
    │   └── RejectedInputError the server refused the request's tensors; also an InputError
    ├── SchemaMismatchError    a model's feature schema differs from the computed features
    └── AuditError             the audit database cannot be written or read
        ├── AuditLockedError   another process holds the database lock
        └── AuditFullError     the disk or the database is full

Every message says what to do next, not only what went wrong.
"""

from __future__ import annotations


class SetsunaError(Exception):
    """Root of every error setsuna raises."""


class ConfigError(SetsunaError):
    """A setting, model configuration or command-line flag is invalid."""


class InputError(SetsunaError, ValueError):
    """A request does not match the model's feature schema."""


class ShapeError(InputError):
    """The request has the wrong number of features or wrong dimensions."""


class DTypeError(InputError):
    """The request's dtype cannot be converted to the model's without loss."""


class NaNError(InputError):
    """NaN or ±inf reached a model whose manifest does not allow it."""


class SourceError(SetsunaError):
    """A source model cannot be read or converted."""


class UnknownModelTypeError(SourceError):
    """The source is not a model type setsuna knows how to convert."""


class PickleRefusedError(SourceError):
    """A pickle/joblib file was given without ``--allow-pickle``."""


class ArtifactError(SetsunaError):
    """A built artifact or manifest is missing or unreadable."""


class TamperedArtifactError(ArtifactError):
    """An artifact's sha256 does not match its manifest."""


class GateError(SetsunaError):
    """No candidate for a model passed the accuracy gate."""


class EngineError(SetsunaError):
    """A runtime failed to load or run an engine."""


class ServerError(SetsunaError):
    """The local Triton server failed to start, become ready, or stop."""


class MarketDataError(SetsunaError, ValueError):
    """Ticks, bars or a market-data file cannot be used as given."""


class BadValueError(MarketDataError):
    """A price or size is NaN, infinite or negative."""


class OutOfOrderError(MarketDataError):
    """A symbol's timestamp went backwards or repeated; setsuna never reorders."""


class UnknownSymbolError(MarketDataError, KeyError):
    """A symbol the feature engine or bar builder was not configured with."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0]) if self.args else ""


class DataFormatError(MarketDataError):
    """A market-data file or frame lacks the expected columns or types."""


class SnapshotError(SetsunaError):
    """Feature-engine state bytes are corrupt, of another version or another spec."""


class ServingError(SetsunaError):
    """A call to a Triton server failed; the leaf says whether trying again can help."""

    #: True for the errors a retry can fix without risk (the request did not run).
    retryable: bool = False


class UnavailableError(ServingError):
    """The server cannot be reached, or the connection dropped (server gone)."""

    retryable = True


class OverloadedError(ServingError):
    """The server refused the request before running it (its queue is full)."""

    retryable = True


class DeadlineError(ServingError, TimeoutError):
    """No answer arrived within the call's ``deadline_ms``; the budget is spent."""


class ModelNotReadyError(ServingError):
    """The model (or that version) is not loaded, or not ready to serve."""


class RejectedInputError(ServingError, InputError):
    """The server refused the request's tensors (shape, dtype, NaN, missing input)."""


class SchemaMismatchError(ConfigError):
    """A model's feature schema (names and order) differs from the features computed."""


class AuditError(SetsunaError):
    """The audit database cannot be written or read."""


class AuditLockedError(AuditError):
    """Another connection holds the audit database's lock past the busy timeout."""


class AuditFullError(AuditError):
    """The disk holding the audit database, or the database itself, is full."""


class DeploymentError(SetsunaError):
    """A lifecycle step (publish, shadow, canary, promote, rollback) was refused or failed;
    what was serving before it still serves."""


class DeploymentConflictError(DeploymentError):
    """Another operator is changing the same deployment right now, or already changed it."""


class ModelLoadingError(ModelNotReadyError):
    """The model was evicted and is being loaded again; retry within the deadline."""

    retryable = True


class PoolFullError(ModelNotReadyError):
    """The model does not fit the pool's memory budget even after evicting every idle model;
    the message names the budget, the model's size and what is pinned or in flight."""
