"""The writing tools (seed 003's Complete Write, Advanced Rewrite, Rich Describe,
Smart Brainstorm): each its own prompt template and required inputs."""

from __future__ import annotations

from dataclasses import dataclass

from services.generation.providers import Message
from services.generation.schemas import ToolIn
from services.kit.errors import Unprocessable

SYSTEM = (
    "You are Penora, a skilled creative-writing assistant. Answer with the requested "
    "text only: no preamble, no notes."
)


@dataclass(frozen=True)
class Tool:
    name: str
    title: str
    required: tuple[str, ...]
    template: str

    def messages(self, body: ToolIn) -> list[Message]:
        values = body.model_dump()
        missing = [f for f in self.required if not (values.get(f) or "").strip()]
        if missing:
            raise Unprocessable(
                f"The {self.name} tool needs: {', '.join(missing)}",
                code="missing_tool_input",
                tool=self.name,
                missing=missing,
            )
        fields = {
            k: (str(v).strip() if v is not None else "")
            for k, v in values.items()
            if k in ("text", "instructions", "subject", "topic", "count")
        }
        fields["instructions"] = fields["instructions"] or self.default_instructions()
        fields["max_words"] = str(body.max_words)
        return [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": self.template.format(**fields)},
        ]

    def default_instructions(self) -> str:
        return {
            "complete": "Keep the voice, tense and point of view.",
            "rewrite": "Make it more vivid and precise; keep the meaning.",
        }.get(self.name, "")


TOOLS: dict[str, Tool] = {
    "complete": Tool(
        "complete",
        "Complete Write",
        ("text",),
        "Continue this text seamlessly for up to {max_words} words. {instructions}\n\n"
        "Text so far:\n{text}",
    ),
    "rewrite": Tool(
        "rewrite",
        "Advanced Rewrite",
        ("text",),
        "Rewrite the passage below in at most {max_words} words. {instructions}\n\n"
        "Passage:\n{text}",
    ),
    "describe": Tool(
        "describe",
        "Rich Describe",
        ("subject",),
        "Write a rich description of {subject} in at most {max_words} words, using sight, "
        "sound, smell, touch and taste, with concrete detail and fresh imagery. "
        "{instructions}",
    ),
    "brainstorm": Tool(
        "brainstorm",
        "Smart Brainstorm",
        ("topic",),
        "Brainstorm {count} distinct, surprising ideas about: {topic}. One idea per line, "
        "numbered, each a sentence or two; at most {max_words} words in all. {instructions}",
    ),
}
