"""The declarative feature spec: names, kinds, parameters and order.

A spec is data. It round-trips through JSON, so a model manifest records
exactly the features (and their parameters) a model was trained on, and the
serving side rebuilds the same engine from it. Feature *values* are
ratios and oscillators, never raw price levels, so one model can serve
symbols of any price.

Kinds (parameters in brackets):

=================  ==========================================  =========================
kind               value                                       ready from bar (0-based)
=================  ==========================================  =========================
return             close / close[t-n] - 1          [window]    n
close_sma_ratio    close / SMA(n) - 1              [window]    n - 1
close_ema_ratio    close / EMA(n) - 1              [span]      n - 1 (SMA seed, as TA-Lib)
rsi                Wilder RSI, 0..100              [window]    n
macd_line          (EMA(f) - EMA(s)) / close       [f, s, g]   s - 1
macd_signal        EMA(g) of the line / close      [f, s, g]   s + g - 2
macd_hist          (line - signal) / close         [f, s, g]   s + g - 2
bollinger_pctb     (close - lower) / (upper-lower) [window, k] n - 1 (population std)
atr_ratio          Wilder ATR / close              [window]    n
realised_vol       sample std of log returns       [window]    n
vwap_dev           close / rolling VWAP - 1        [window]    n - 1 (and volume > 0)
volume_z           (v - mean) / population std     [window]    n - 1
time_in_session    share of the day's trading done [session]   0
spread             (ask - bid) / mid                           when a quote exists
quote_imbalance    (bid_size - ask_size) / sum                 when sizes exist
=================  ==========================================  =========================
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from setsuna.errors import ConfigError
from setsuna.market import get_session
from setsuna.schema import FeatureSchema

SPEC_FORMAT = "setsuna.features/1"

ParamValue = int | float | str


@dataclass(frozen=True)
class _Kind:
    """How a kind maps onto a compute block, and its parameters with their checks."""

    block: int
    output: int
    params: tuple[tuple[str, type, ParamValue | None, float], ...]  # name, type, default, minimum


# Block codes shared with the kernel (setsuna.features._kernel).
RET, SMA, EMA, RSI, MACD, BB, ATR, RVOL, VWAP, VOLZ, SESSION, SPREAD, IMBALANCE = range(13)

_W = ("window_bars", int, None, 1)
_MACD = (("fast_bars", int, 12, 1), ("slow_bars", int, 26, 2), ("signal_bars", int, 9, 1))
KINDS: dict[str, _Kind] = {
    "return": _Kind(RET, 0, (_W,)),
    "close_sma_ratio": _Kind(SMA, 0, (_W,)),
    "close_ema_ratio": _Kind(EMA, 0, (("span_bars", int, None, 1),)),
    "rsi": _Kind(RSI, 0, (("window_bars", int, 14, 1),)),
    "macd_line": _Kind(MACD, 0, _MACD),
    "macd_signal": _Kind(MACD, 1, _MACD),
    "macd_hist": _Kind(MACD, 2, _MACD),
    "bollinger_pctb": _Kind(BB, 0, (("window_bars", int, 20, 2), ("width_std", float, 2.0, 1e-9))),
    "atr_ratio": _Kind(ATR, 0, (("window_bars", int, 14, 1),)),
    "realised_vol": _Kind(RVOL, 0, (("window_bars", int, 20, 2),)),
    "vwap_dev": _Kind(VWAP, 0, (("window_bars", int, 20, 1),)),
    "volume_z": _Kind(VOLZ, 0, (("window_bars", int, 20, 2),)),
    "time_in_session": _Kind(SESSION, 0, (("session", str, "FX24", 0),)),
    "spread": _Kind(SPREAD, 0, ()),
    "quote_imbalance": _Kind(IMBALANCE, 0, ()),
}


@dataclass(frozen=True)
class FeatureDef:
    """One output column: its name, kind and (validated, complete) parameters."""

    name: str
    kind: str
    params: tuple[tuple[str, ParamValue], ...] = ()

    @classmethod
    def make(cls, name: str, kind: str, **params: ParamValue) -> FeatureDef:
        """Validate ``params`` against ``kind``, fill defaults, fix their order."""
        if not name or not isinstance(name, str):
            raise ConfigError(f"feature name must be a non-empty string, got {name!r}")
        try:
            info = KINDS[kind]
        except KeyError:
            raise ConfigError(
                f"feature {name!r}: unknown kind {kind!r}; choose one of {sorted(KINDS)}"
            ) from None
        known = {p[0] for p in info.params}
        extra = sorted(set(params) - known)
        if extra:
            raise ConfigError(f"feature {name!r} ({kind}): unknown parameter(s) {extra}")
        resolved: list[tuple[str, ParamValue]] = []
        for pname, ptype, default, minimum in info.params:
            value = params.get(pname, default)
            if value is None:
                raise ConfigError(f"feature {name!r} ({kind}) needs parameter {pname!r}")
            if ptype is int and (isinstance(value, bool) or not isinstance(value, int)):
                raise ConfigError(f"feature {name!r}: {pname} must be an integer, got {value!r}")
            if ptype is float:
                if isinstance(value, bool) or not isinstance(value, int | float):
                    raise ConfigError(f"feature {name!r}: {pname} must be a number, got {value!r}")
                value = float(value)
            if ptype is str:
                value = get_session(str(value)).name
            elif float(value) < minimum:
                raise ConfigError(f"feature {name!r}: {pname} must be >= {minimum}, got {value}")
            resolved.append((pname, value))
        params_map = dict(resolved)
        if info.block == MACD and params_map["fast_bars"] >= params_map["slow_bars"]:  # type: ignore[operator]
            raise ConfigError(f"feature {name!r}: fast_bars must be below slow_bars")
        return cls(name, kind, tuple(resolved))

    @property
    def param_map(self) -> dict[str, ParamValue]:
        return dict(self.params)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "params": dict(self.params)}


@dataclass(frozen=True)
class FeatureSpec:
    """An ordered tuple of features: the schema a model is trained on and served with."""

    features: tuple[FeatureDef, ...]

    def __post_init__(self) -> None:
        if not self.features:
            raise ConfigError("a feature spec needs at least one feature")
        names = [f.name for f in self.features]
        if len(set(names)) != len(names):
            dupes = sorted({n for n in names if names.count(n) > 1})
            raise ConfigError(f"duplicate feature names {dupes}: give every feature its own name")

    @classmethod
    def of(cls, *features: tuple[str, str, Mapping[str, ParamValue]]) -> FeatureSpec:
        """``FeatureSpec.of(("ret_5", "return", {"window_bars": 5}), ...)``."""
        return cls(tuple(FeatureDef.make(n, k, **dict(p)) for n, k, p in features))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.features)

    def __len__(self) -> int:
        return len(self.features)

    def to_schema(self) -> FeatureSchema:
        """The model-input schema this spec produces (float32, no NaN once ready)."""
        return FeatureSchema(self.names, (len(self.features),))

    def to_json(self) -> dict[str, Any]:
        return {"format": SPEC_FORMAT, "features": [f.to_json() for f in self.features]}

    def dumps(self) -> str:
        """Canonical JSON text (sorted keys): equal specs give equal text."""
        return json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> FeatureSpec:
        if data.get("format") != SPEC_FORMAT:
            raise ConfigError(
                f"feature spec format {data.get('format')!r} is not {SPEC_FORMAT!r}; "
                "rebuild the manifest with this setsuna version"
            )
        try:
            items: Sequence[Mapping[str, Any]] = data["features"]
            return cls(
                tuple(
                    FeatureDef.make(str(f["name"]), str(f["kind"]), **dict(f.get("params", {})))
                    for f in items
                )
            )
        except (KeyError, TypeError) as exc:
            raise ConfigError(f"malformed feature spec: {exc!r}") from exc

    @classmethod
    def loads(cls, text: str) -> FeatureSpec:
        try:
            return cls.from_json(json.loads(text))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"feature spec is not JSON: {exc}") from exc


def default_spec(*, session: str = "FX24", quotes: bool = False) -> FeatureSpec:
    """The default set: 15 bar features, plus spread and imbalance when ``quotes``."""
    rows: list[tuple[str, str, dict[str, ParamValue]]] = [
        ("ret_1", "return", {"window_bars": 1}),
        ("ret_5", "return", {"window_bars": 5}),
        ("ret_20", "return", {"window_bars": 20}),
        ("close_sma_20", "close_sma_ratio", {"window_bars": 20}),
        ("close_ema_20", "close_ema_ratio", {"span_bars": 20}),
        ("rsi_14", "rsi", {"window_bars": 14}),
        ("macd_line", "macd_line", {}),
        ("macd_signal", "macd_signal", {}),
        ("macd_hist", "macd_hist", {}),
        ("bb_pctb_20", "bollinger_pctb", {"window_bars": 20, "width_std": 2.0}),
        ("atr_14", "atr_ratio", {"window_bars": 14}),
        ("rvol_20", "realised_vol", {"window_bars": 20}),
        ("vwap_dev_20", "vwap_dev", {"window_bars": 20}),
        ("volume_z_20", "volume_z", {"window_bars": 20}),
        ("session_frac", "time_in_session", {"session": session}),
    ]
    if quotes:
        rows += [("spread", "spread", {}), ("quote_imbalance", "quote_imbalance", {})]
    return FeatureSpec.of(*rows)
