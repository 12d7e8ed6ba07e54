"""Model catalogues and request traces for the LALB experiment.

A *profile* is what one example model costs on some machine: its bytes on the device, the time to
load it onto a device that does not hold it, and the time of one inference. Profiles come from
real measurements (``python bench/lalb.py measure``, stored in ``bench/sim/profiles.json``).

A *catalogue* is a set of functions, each a copy of one example model (so it has that model's
profile) under its own name, as a platform serving many tenants' copies of the same networks
would have. A *trace* is a list of requests: Poisson arrivals, each for a model drawn from a Zipf
popularity over the working set.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

PROFILES_FILE = Path(__file__).with_name("profiles.json")


@dataclass(frozen=True)
class ModelProfile:
    kind: str  # the example model it is a copy of
    size_bytes: int
    load_ms: float  # onto a device, from the node's host tier
    infer_ms: float


@dataclass(frozen=True)
class Model:
    name: str
    profile: ModelProfile
    slo_ms: float


def load_profiles(path: Path = PROFILES_FILE) -> dict[str, dict[str, ModelProfile]]:
    """``{profile set: {example model: profile}}`` from the measurements file."""
    try:
        document = json.loads(path.read_text())
    except OSError as e:
        raise SystemExit(f"cannot read model profiles from {path}: {e.strerror}") from None
    except ValueError as e:
        raise SystemExit(f"{path} is not valid JSON: {e}") from None
    sets: dict[str, dict[str, ModelProfile]] = {}
    for set_name, entry in document.get("sets", {}).items():
        sets[set_name] = {
            kind: ModelProfile(
                kind=kind,
                size_bytes=int(m["size_bytes"]),
                load_ms=float(m["load_ms"]),
                infer_ms=float(m["infer_ms"]),
            )
            for kind, m in entry["models"].items()
        }
    return sets


def make_catalogue(
    profiles: dict[str, ModelProfile],
    *,
    n_models: int,
    kinds: dict[str, float] | None = None,
    slo_factor: float = 2.0,
    seed: int = 0,
) -> list[Model]:
    """``n_models`` functions, each a copy of an example model, most popular first.

    Kinds are interleaved by smooth weighted round-robin over ``kinds`` weights (from a seeded
    random starting order), so every prefix of the catalogue (a working set, and any band of
    popularity ranks) mixes the kinds in proportion. Each function's SLO is ``slo_factor``
    times its cold latency (load + inference).
    """
    weights = kinds or dict.fromkeys(profiles, 1.0)
    unknown = sorted(set(weights) - set(profiles))
    if unknown:
        raise SystemExit(f"unknown model kind(s) {unknown}; the profiles have {sorted(profiles)}")
    if any(not w > 0 for w in weights.values()):
        raise SystemExit("model kind weights must be > 0")
    names = list(weights)
    np.random.default_rng(seed).shuffle(names)
    total = sum(weights.values())
    credit = dict.fromkeys(names, 0.0)
    catalogue = []
    for i in range(n_models):
        for name in names:
            credit[name] += weights[name]
        kind = max(names, key=lambda k: credit[k])  # first of the best: seeded tie order
        credit[kind] -= total
        profile = profiles[kind]
        catalogue.append(
            Model(
                name=f"{kind}-{i:05d}",
                profile=profile,
                slo_ms=slo_factor * (profile.load_ms + profile.infer_ms),
            )
        )
    return catalogue


@dataclass(frozen=True)
class Trace:
    arrival_ms: npt.NDArray[np.float64]
    model: npt.NDArray[np.int64]  # index into the catalogue

    def __len__(self) -> int:
        return len(self.model)


def zipf_weights(n: int, s: float) -> npt.NDArray[np.float64]:
    ranks = np.arange(1, n + 1, dtype=float)
    w = ranks**-s
    return np.asarray(w / w.sum(), dtype=np.float64)


def make_trace(
    *, wss: int, n_requests: int, rate_per_s: float, zipf_s: float, seed: int = 0
) -> Trace:
    """Poisson arrivals at ``rate_per_s``, each for one of the first ``wss`` catalogue models,
    model ``i`` with Zipf weight ``(i + 1) ** -zipf_s``."""
    if wss < 1 or n_requests < 1 or not rate_per_s > 0 or not math.isfinite(rate_per_s):
        raise SystemExit("need wss >= 1, requests >= 1 and a finite rate > 0")
    # Separate streams, so that the picks do not change with the rate.
    gaps_rng, picks_rng = (np.random.default_rng([seed, i]) for i in range(2))
    arrival = np.cumsum(gaps_rng.exponential(1000.0 / rate_per_s, size=n_requests))
    picks = picks_rng.choice(wss, size=n_requests, p=zipf_weights(wss, zipf_s))
    return Trace(arrival_ms=arrival, model=picks.astype(np.int64))
