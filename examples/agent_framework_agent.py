"""A tool-using agent with Microsoft Agent Framework, against an edgefleet fleet.

    pip install agent-framework-core agent-framework-openai
    make fleet          # in another terminal
    python examples/agent_framework_agent.py [--base-url http://127.0.0.1:8080/v1]

``OpenAIChatClient`` speaks the Responses API (``/v1/responses``), which the
coordinator serves; the agent calls the Python function below as a tool.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Annotated

from agent_framework import tool
from agent_framework.openai import OpenAIChatClient


@tool
def get_weather(city: Annotated[str, "The city"]) -> str:
    """Current weather in a city."""
    print(f"(tool called: get_weather({city!r}))")
    return f"{city}: 21 °C, clear sky"  # a stand-in weather service


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base-url", default="http://127.0.0.1:8080/v1")
    parser.add_argument("--api-key", default="none")
    parser.add_argument("--model", default="smollm2-135m")
    args = parser.parse_args()
    client = OpenAIChatClient(model=args.model, base_url=args.base_url, api_key=args.api_key)
    agent = client.as_agent(
        name="weather",
        instructions="You answer questions about the weather. Use the get_weather tool.",
        tools=[get_weather],
        default_options={"tool_choice": "required", "max_tokens": 80},
    )
    result = await agent.run("What is the weather in Lisbon?")
    print(f"answer: {result.text}")


if __name__ == "__main__":
    asyncio.run(main())
