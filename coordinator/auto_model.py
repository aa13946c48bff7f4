"""``"model": "auto"``: pick a model by how demanding the task looks.

A documented heuristic rather than a model call, so choosing costs
microseconds: a request is *complex* when its last user message is long
(over 600 characters), contains code or asks for reasoning ("explain",
"why", "step by step", "analyze", "compare", "prove", "write code", ...),
when the conversation is long (over 8 messages), or when it carries tools;
otherwise it is *simple*. A table maps each class to a model alias
(``--auto-model simple=ALIAS``, ``--auto-model complex=ALIAS``); else a model
of the fleet's registry tagged with the class (``edgefleet models add NAME FILE
--task simple``), served or loadable on demand; by default simple goes to the
smallest model the fleet serves and complex to the largest.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from edgefleet.errors import Reason, Unavailable

REASONING = re.compile(
    r"\b(explain|why|step[- ]by[- ]step|analy[sz]e|compare|prove|derive|debug|refactor|"
    r"write (a |the )?(code|function|program|script)|plan|summari[sz]e)\b",
    re.IGNORECASE,
)


def complexity(last_user_message: str, message_count: int, has_tools: bool) -> str:
    if has_tools or message_count > 8 or len(last_user_message) > 600:
        return "complex"
    if "```" in last_user_message or REASONING.search(last_user_message):
        return "complex"
    return "simple"


def choose(
    last_user_message: str,
    message_count: int,
    has_tools: bool,
    *,
    table: Mapping[str, str],
    model_sizes: Mapping[str, int],
    tagged: Mapping[str, Sequence[str]] | None = None,
) -> str:
    """The alias to serve the request with; ``model_sizes``: served alias -> bytes;
    ``tagged``: task class -> registry aliases tagged with it that can be served."""
    task = complexity(last_user_message, message_count, has_tools)
    configured = table.get(task)
    if configured and configured in model_sizes:
        return configured
    for alias in sorted((tagged or {}).get(task, ())):
        return alias  # tagged for this class by the operator: served or loadable
    if not model_sizes:
        raise Unavailable("no model is served by a ready node", reason=Reason.NO_READY_NODE)
    ordered = sorted(model_sizes, key=lambda alias: (model_sizes[alias], alias))
    return ordered[-1] if task == "complex" else ordered[0]
