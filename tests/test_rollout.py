"""grpo.rollout: the trainer's tensors from sampled completions (``collate``)."""

from __future__ import annotations

import pytest

from grpo.rollout import collate
from models.samplers import Completion


def test_collate_pads_prompts_left_completions_right_and_masks_from_lengths():
    # pad id 2 is also the EOS: the mask must come from the lengths, not from the ids
    outputs = [
        Completion(0, [8, 2], "a", False, [-0.5, -0.25]),
        Completion(0, [9], "b", True, [-1.0]),
        Completion(1, [2], "", False, [-2.0]),
    ]
    batch = collate([[5, 6], [7]], outputs, pad_id=2)
    assert batch["prompt_ids"].tolist() == [[5, 6], [5, 6], [2, 7]]
    assert batch["prompt_mask"].tolist() == [[1, 1], [1, 1], [0, 1]]
    assert batch["completion_ids"].tolist() == [[8, 2], [9, 2], [2, 2]]
    assert batch["completion_mask"].tolist() == [[1.0, 1.0], [1.0, 0.0], [1.0, 0.0]]
    assert batch["input_ids"].tolist() == [[5, 6, 8, 2], [5, 6, 9, 2], [2, 7, 2, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0], [0, 1, 1, 0]]
    assert batch["sampler_logp"].tolist() == [[-0.5, -0.25], [-1.0, 0.0], [-2.0, 0.0]]
    assert batch["completion_lengths"].tolist() == [2, 1, 1]
    assert batch["truncated"].tolist() == [False, True, False]


def test_collate_names_a_completion_whose_logprobs_do_not_match_its_tokens():
    with pytest.raises(ValueError, match="completion 1: 2 token ids but 1 log-probs"):
        collate(
            [[1]], [Completion(0, [3], "", True, [0.0]), Completion(0, [3, 4], "", True, [0.0])], pad_id=0
        )
