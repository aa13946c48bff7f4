"""What one decode step holds (continuous_batching.plan_step): pure, no model."""

from __future__ import annotations

from edgefleet.generation import Sampling
from node_agent.runtime.base import FinishReason
from node_agent.runtime.continuous_batching import Generation, plan_step


def generation(seq_id: int, *, next_token: int | None = None, pending=()) -> Generation:
    return Generation(
        seq_id=seq_id,
        prompt=list(pending),
        sampling=Sampling(),
        grammar=None,
        limit=10,
        length_reason=FinishReason.LENGTH,
        emit=lambda event: None,
        on_released=lambda: None,
        loop=None,  # never posted to: the plan only reads and takes tokens
        pending=list(pending),
        next_token=next_token,
    )


def test_a_step_lists_its_sequences_in_ascending_id_whatever_order_they_came_in():
    # Slots taken in the order 5, 0, 7, 2 (a prompt still being read among them).
    active = [
        generation(5, next_token=50),
        generation(0, next_token=10),
        generation(7, pending=[1, 2, 3]),
        generation(2, next_token=20),
    ]
    plan = plan_step(active, prompt_chunk=256, batch_tokens=260)
    assert [g.seq_id for g, _, _ in plan] == [0, 2, 5, 7]
    assert [(tokens, logits) for _, tokens, logits in plan] == [
        ([10], True),
        ([20], True),
        ([50], True),
        ([1, 2, 3], True),  # the whole prompt: its last token's logits start the reply
    ]


def test_prompts_are_read_oldest_first_a_chunk_per_step():
    older, newer = generation(3, pending=list(range(5))), generation(1, pending=list(range(5)))
    plan = plan_step([older, newer, generation(0, next_token=9)], prompt_chunk=7, batch_tokens=9)
    assert [(g.seq_id, tokens, logits) for g, tokens, logits in plan] == [
        (0, [9], True),
        (1, [0, 1], False),  # the newer request gets what is left of the chunk
        (3, [0, 1, 2, 3, 4], True),
    ]
    assert newer.pending == [2, 3, 4] and older.pending == []
