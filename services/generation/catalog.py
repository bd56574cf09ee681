"""The model catalog and the price of words.

Pricing (seed 003: "1 Ku ≈ 100 words"): a model's `multiplier` is given in
thousandths (`multiplier_milli`, 1000 = ×1). The price of `words` output words is

    cost_milli = ceil(words × multiplier_milli / 100)

milli-Ku, exactly: 100 words at ×1 cost 1000 milli-Ku = 1 Ku; one word at ×1.5 costs 15.
Only integers take part; the ceiling makes a price never round in the user's disfavour
by more than one milli-Ku.

Words are counted as runs of non-whitespace characters (`len(text.split())`): what a
word processor counts. A stream cut mid-word counts the piece delivered as a word.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from services.kit.errors import NotFound

OFFLINE = "offline"

# The seed's models (003), on DeepInfra. Multipliers and limits are configuration.
DEFAULT_MODELS: list[dict[str, Any]] = [
    {
        "id": "mistralai/Mistral-7B-Instruct-v0.3",
        "name": "Mistral 7B Instruct",
        "multiplier_milli": 1000,
        "fallback": ["meta-llama/Meta-Llama-3.1-8B-Instruct"],
    },
    {
        "id": "meta-llama/Meta-Llama-3.1-8B-Instruct",
        "name": "Llama 3.1 8B",
        "multiplier_milli": 1000,
        "fallback": ["mistralai/Mistral-7B-Instruct-v0.3"],
    },
    {
        "id": "mistralai/Mixtral-8x7B-Instruct-v0.1",
        "name": "Mixtral 8x7B",
        "multiplier_milli": 2000,
        "fallback": ["mistralai/Mistral-7B-Instruct-v0.3"],
    },
    {"id": "openchat/openchat_3.5", "name": "OpenChat 3.5", "multiplier_milli": 1000},
    {"id": "google/gemma-2-9b-it", "name": "Gemma 2", "multiplier_milli": 1500},
]


@dataclass(frozen=True)
class Model:
    id: str
    name: str
    provider: str
    # The model's name at the provider (defaults to `id`).
    upstream: str
    multiplier_milli: int
    max_words: int = 4000
    fallback: tuple[str, ...] = field(default_factory=tuple)

    def price_milli(self, words: int) -> int:
        return price_milli(words, self.multiplier_milli)


def price_milli(words: int, multiplier_milli: int) -> int:
    if words <= 0:
        return 0
    return -(-words * multiplier_milli // 100)


def count_words(text: str) -> int:
    return len(text.split())


def first_words(text: str, limit: int) -> str:
    """`text` cut after `limit` words (the rest is never delivered nor charged)."""
    if count_words(text) <= limit:
        return text
    out, seen, in_word = [], 0, False
    for ch in text:
        if ch.isspace():
            if in_word and seen == limit:
                break
            in_word = False
        elif not in_word:
            in_word = True
            seen += 1
        out.append(ch)
    return "".join(out)


class Catalog:
    def __init__(self, models: list[dict[str, Any]], *, default_provider: str, offline: bool):
        self.models: dict[str, Model] = {}
        for raw in models or DEFAULT_MODELS:
            multiplier = int(raw.get("multiplier_milli", 1000))
            max_words = int(raw.get("max_words", 4000))
            if multiplier <= 0 or max_words <= 0:
                raise ValueError(f"model {raw.get('id')}: multiplier and max_words must be > 0")
            model = Model(
                id=str(raw["id"]),
                name=str(raw.get("name") or raw["id"]),
                provider=OFFLINE if offline else str(raw.get("provider") or default_provider),
                upstream=str(raw.get("upstream") or raw["id"]),
                multiplier_milli=multiplier,
                max_words=max_words,
                fallback=tuple(str(f) for f in raw.get("fallback") or ()),
            )
            self.models[model.id] = model
        for model in self.models.values():
            unknown = [f for f in model.fallback if f not in self.models]
            if unknown:
                raise ValueError(f"model {model.id}: unknown fallback model(s) {unknown}")
        self.default = next(iter(self.models.values()))

    def get(self, model_id: str | None) -> Model:
        if model_id is None:
            return self.default
        model = self.models.get(model_id)
        if model is None:
            raise NotFound(
                f"Unknown model: {model_id}", code="unknown_model", available=list(self.models)
            )
        return model

    def chain(self, model: Model) -> list[Model]:
        """The model, then its fallbacks in order (each once)."""
        out = [model]
        for name in model.fallback:
            candidate = self.models[name]
            if candidate not in out:
                out.append(candidate)
        return out

    def max_price_milli(self, model: Model, words: int) -> int:
        """What to hold: the dearest model the request may end up served by."""
        return max(m.price_milli(words) for m in self.chain(model))

    def providers(self) -> set[str]:
        return {m.provider for m in self.models.values()}
