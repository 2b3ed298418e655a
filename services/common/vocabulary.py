"""The words every service shares, kept in step with the CHECK constraints of the schema."""
from __future__ import annotations

TASK_TYPES = ("text-generation", "code-generation", "question-answering", "conversation",
              "summarization", "classification")
OUTPUT_FORMATS = ("json", "markdown", "code", "text")
RUNTIME_DRIVERS = ("process", "docker", "external")
PROTOCOLS = ("ollama", "openai")
