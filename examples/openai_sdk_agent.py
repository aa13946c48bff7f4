"""A tool-using agent with the official openai SDK, against an edgefleet fleet.

Start a fleet (``make fleet``), then:

    python examples/openai_sdk_agent.py [--base-url http://127.0.0.1:8080/v1]

The only edgefleet-specific line is the base URL. The agent loop is the
standard one: the model asks for a tool call, the program runs the function
and sends the result back, and the model answers.
"""

from __future__ import annotations

import argparse
import json

from openai import OpenAI

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]


def get_weather(city: str) -> dict:
    return {"city": city, "temperature_c": 21, "sky": "clear"}  # a stand-in weather service


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base-url", default="http://127.0.0.1:8080/v1")
    parser.add_argument("--api-key", default="none")
    parser.add_argument("--model", default="smollm2-135m")
    args = parser.parse_args()
    client = OpenAI(base_url=args.base_url, api_key=args.api_key)

    messages = [{"role": "user", "content": "What is the weather in Lisbon?"}]
    # 1. The model must call the tool (tool_choice: required).
    reply = client.chat.completions.create(
        model=args.model,
        messages=messages,
        tools=TOOLS,
        tool_choice="required",
        max_tokens=80,
    )
    call = reply.choices[0].message.tool_calls[0]
    arguments = json.loads(call.function.arguments)
    print(f"model called {call.function.name}({arguments})")
    # 2. Run it and hand the result back; the model answers in words.
    result = get_weather(**arguments)
    messages += [
        reply.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps(result)},
    ]
    final = client.chat.completions.create(
        model=args.model,
        messages=messages,
        tools=TOOLS,
        tool_choice="none",
        max_tokens=60,
    )
    print(f"answer: {final.choices[0].message.content}")


if __name__ == "__main__":
    main()
