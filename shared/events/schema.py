"""JSON Schema of every topic and an AsyncAPI document of the user-facing ones.

``python -m shared.events.schema`` writes them under ``docs/``; a test fails when the
committed files differ from what the models generate.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from shared.events.topic import TOPICS, TopicSpec

DOCS = Path(__file__).resolve().parents[2] / "docs"


def topic_schema(spec: TopicSpec) -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of a topic's message value."""
    schema = spec.record.model_json_schema(mode="validation")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = f"reelstream/{spec.name}.schema.json"
    schema["x-kafka-topic"] = spec.name
    schema["x-kafka-key"] = f"the {spec.key_field} as a UTF-8 string" if spec.key_field else "none"
    schema["x-kafka-cleanup-policy"] = "compact" if spec.compacted else "delete"
    return schema


def asyncapi() -> dict[str, Any]:
    """AsyncAPI 3.0 document of the topics users publish to and consume from."""
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    for spec in TOPICS:
        if not spec.user_facing:
            continue
        name = spec.record.__name__
        messages[name] = {
            "name": name,
            "contentType": "application/json",
            "payload": {"$ref": f"./schemas/{spec.name}.schema.json"},
            "bindings": {
                "kafka": {"key": {"type": "string", "description": f"the {spec.key_field}"}}
            },
        }
        channels[spec.name] = {
            "address": spec.name,
            "messages": {name: {"$ref": f"#/components/messages/{name}"}},
        }
        # Users send movies and ratings and receive recommendations.
        action = "receive" if spec.name == "recommendations" else "send"
        operations[f"{action}-{spec.name}"] = {
            "action": action,
            "channel": {"$ref": f"#/channels/{spec.name}"},
        }
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "reelstream",
            "version": "1.0.0",
            "description": "Publish movies and ratings; consume recommendation lists.",
        },
        "defaultContentType": "application/json",
        "servers": {
            "local": {"host": "127.0.0.1:9092", "protocol": "kafka"},
        },
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages},
    }


def render() -> dict[Path, str]:
    """File path → content of every generated document."""
    files = {
        DOCS / "schemas" / f"{spec.name}.schema.json": json.dumps(topic_schema(spec), indent=2)
        + "\n"
        for spec in TOPICS
    }
    files[DOCS / "asyncapi.json"] = json.dumps(asyncapi(), indent=2) + "\n"
    return files


def main() -> None:
    argparse.ArgumentParser(description=__doc__).parse_args()
    for path, text in render().items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(path.relative_to(DOCS.parent))


if __name__ == "__main__":
    main()
