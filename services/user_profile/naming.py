"""Names of the user-profile service's faust app and its internal topics.

Kept free of faust imports so that ``infra.topics`` can create these topics (with the
partition count faust expects) before any worker starts.
"""

from __future__ import annotations

from shared.config import Settings

SERVICE = "user-profile"
TABLE = "user-state"


def app_id(settings: Settings) -> str:
    """The faust app id; also the consumer-group id and the prefix of its topics."""
    return settings.group(SERVICE)


def changelog_topic(settings: Settings) -> str:
    return f"{app_id(settings)}-{TABLE}-changelog"


def leader_topic(settings: Settings) -> str:
    return f"{app_id(settings)}-__assignor-__leader"
