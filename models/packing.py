"""Each prompt once per group: log-probs of G completions scored against one shared copy of their prompt.

GRPO samples G completions per prompt, and the row-by-row layout of ``models.forward`` runs the prompt
G times (once in every row). Here the rows of a group are packed into one row, the prompt first, then
the completions one after another, and a block attention mask keeps the completions apart. For G = 2,
prompt p0 p1 p2, completions a0 a1 and b0 b1 b2 (and one pad, to line this row up with a longer one)::

    input_ids      p0 p1 p2 a0 a1 b0 b1 b2 pad
    position_ids    0  1  2  3  4  3  4  5  0      each completion continues from the prompt
    segment_ids     0  0  0  1  1  2  2  2 -1      0 prompt, j completion j, -1 padding

    attention (row = query, column = key; x = may attend)
              p0 p1 p2 a0 a1 b0 b1 b2 pad
        p0     x  .  .  .  .  .  .  .  .       the prompt: causal over the prompt
        p1     x  x  .  .  .  .  .  .  .
        p2     x  x  x  .  .  .  .  .  .
        a0     x  x  x  x  .  .  .  .  .       a completion: the whole prompt,
        a1     x  x  x  x  x  .  .  .  .       and itself causally,
        b0     x  x  x  .  .  x  .  .  .       never a sibling
        b1     x  x  x  .  .  x  x  .  .
        b2     x  x  x  .  .  x  x  x  .
        pad    .  .  .  .  .  .  .  .  x       padding sees only itself (no empty softmax row)

Every real token sees exactly the tokens, at exactly the positions, it sees in its own row of the
row-by-row layout, so the hidden states, log-probs and gradients are the same (up to float summation
order). The state at p2 predicts both a0 and b0; a0 predicts a1, b0 predicts b1, b1 predicts b2. With
LoRA the prompt's activations depend on the adapter: autograd sums the G completions' gradients into
the one prompt copy, which is what the G copies of the row-by-row pass add up to.

Relation to verl's prefix grouper (``verl/trainer/ppo/prefix_grouper_utils.py`` and the external
``prefix_grouper`` package): the packed row and the position ids are the same. verl keeps a 2-D padding
mask and monkey-patches every attention function to run two attentions (the prefix over itself, each
suffix over [prefix | its own suffix]), so flash kernels still apply and no [S, S] mask exists, then
takes full [S, V] logits. Ours patches nothing: one ordinary forward with a 4-D block mask that
transformers' "sdpa" and "eager" attention take as-is, and only the predicting states go to
``token_logprobs``. The price: an [S, S] boolean mask per group and attention over all S x S pairs.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from models.forward import (
    LogprobOptions,
    check_row_layout,
    decoder_autocast,
    decoder_body,
    logprobs_from_states,
)

# Attention implementations that take a custom 4-D mask as-is, and the mask format each expects.
# "sdpa": torch's scaled_dot_product_attention, boolean (True = may attend) or additive float.
# "eager": adds the mask to the scores, so it must be additive (0 or a large negative); a boolean mask
# would add 0 / 1 and silently attend everywhere.
MASK_FORMATS = {"sdpa": "bool", "eager": "additive"}


class PackedGroups(NamedTuple):
    """One packed row per group (B groups, packed length S; N rows and T completion columns before).

    input_ids:       [B, S] [prompt | c1 | ... | cG | pad], padding id `pad_id`.
    position_ids:    [B, S] prompt 0..P-1, each completion P, P+1, ...; 0 on padding.
    segment_ids:     [B, S] 0 prompt, j (1..G) the j-th row of the group, -1 padding.
    attention_mask:  [B, 1, S, S] bool, True where query (dim 2) may attend key (dim 3).
    predictor_index: [N, T] long, for each scored completion token (i, t) the index into the flattened
                     [B * S] packed states of the state that predicts it; -1 where completion_mask is 0.
    """

    input_ids: Tensor
    position_ids: Tensor
    segment_ids: Tensor
    attention_mask: Tensor
    predictor_index: Tensor


# ----------------------------------------------------------------------------------------------------
# Pure functions: grouping and packing
# ----------------------------------------------------------------------------------------------------


def group_rows(input_ids: Tensor, attention_mask: Tensor, prompt_len: int) -> list[slice]:
    """Runs of consecutive rows whose real prompt tokens are identical.

    Args:
        input_ids: [N, L] rows [left-padded prompt | completion]; the prompt is the first
            `prompt_len` columns.
        attention_mask: [N, L], 1 on real tokens. Only the prompt columns are read.
        prompt_len: P, the number of prompt columns.

    Returns:
        Slices of rows covering 0..N in order. The rows need not come in full groups (a micro-batch may cut
        one), and the same prompt twice in a row (a duplicated question) simply makes one larger group.

    Example (pad 0; rows 0 and 1 share the prompt [5, 6], row 2 has [4, 5, 6]):
        >>> ids = torch.tensor([[0, 5, 6, 7], [0, 5, 6, 9], [4, 5, 6, 3]])
        >>> mask = torch.tensor([[0, 1, 1, 1], [0, 1, 1, 1], [1, 1, 1, 1]])
        >>> group_rows(ids, mask, prompt_len=3)
        [slice(0, 2, None), slice(2, 3, None)]
    """
    if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"input_ids [N, L] and attention_mask of the same shape expected, got "
            f"{tuple(input_ids.shape)} and {tuple(attention_mask.shape)}"
        )
    if not 0 < prompt_len <= input_ids.shape[1]:
        raise ValueError(f"prompt_len={prompt_len} must be in 1..L={input_ids.shape[1]}")
    prompts = _prompt_tokens(input_ids, attention_mask, prompt_len)
    groups, start = [], 0
    for row in range(1, len(prompts) + 1):
        if row == len(prompts) or prompts[row] != prompts[start]:
            groups.append(slice(start, row))
            start = row
    return groups


def pack_groups(
    input_ids: Tensor,
    attention_mask: Tensor,
    completion_mask: Tensor,
    groups: list[slice],
    pad_id: int = 0,
) -> PackedGroups:
    """Pack each group's rows into one row [prompt | c1 | ... | cG], padded at the end to a common S.

    Args:
        input_ids: [N, L] = [left-padded prompt | right-padded completion], T = completion_mask.shape[1].
        attention_mask: [N, L], 1 on real tokens. The completion part must be right-padded; tokens it
            marks real but completion_mask does not score are still packed (later tokens attend to them).
        completion_mask: [N, T], 1 on the completion tokens to score.
        groups: from ``group_rows``: consecutive slices covering 0..N, each with one prompt.
        pad_id: token id written at the padding (any valid id: padding is masked out).

    Returns:
        PackedGroups (B = len(groups) rows of length S = the longest packed group); see its docstring.

    Example (P = 3, T = 2, pad 0; group [0:2] has prompt [5, 6] and completions [7, 8] and [9];
    group [2:3] has prompt [4, 5, 6] and completion [3]):
        >>> ids = torch.tensor([[0, 5, 6, 7, 8], [0, 5, 6, 9, 0], [4, 5, 6, 3, 0]])
        >>> mask = torch.tensor([[0, 1, 1, 1, 1], [0, 1, 1, 1, 0], [1, 1, 1, 1, 0]])
        >>> packed = pack_groups(ids, mask, mask[:, 3:], [slice(0, 2), slice(2, 3)])
        >>> packed.input_ids, packed.position_ids, packed.segment_ids
        (tensor([[5, 6, 7, 8, 9],
                [4, 5, 6, 3, 0]]), tensor([[0, 1, 2, 3, 2],
                [0, 1, 2, 3, 0]]), tensor([[ 0,  0,  1,  1,  2],
                [ 0,  0,  0,  1, -1]]))
        >>> packed.predictor_index  # 7 and 9 by the state of 6 (flat 1), 8 by 7 (2), 3 by 6 (5 + 2)
        tensor([[ 1,  2],
                [ 1, -1],
                [ 7, -1]])
    """
    _check_rows(input_ids, attention_mask, completion_mask)
    n, length = input_ids.shape
    num_completion = completion_mask.shape[1]
    prompt_len = length - num_completion
    _check_groups(groups, n)

    prompts = _prompt_tokens(input_ids, attention_mask, prompt_len)
    ids_cpu = input_ids.detach().cpu()
    completion_lengths = attention_mask[:, prompt_len:].bool().sum(dim=1).tolist()
    group_of_row = torch.zeros(n, dtype=torch.long)
    local_predictor = torch.zeros(n, num_completion, dtype=torch.long)  # index within the packed row
    packed_ids, packed_positions, packed_segments = [], [], []
    for group_index, group in enumerate(groups):
        prompt = prompts[group.start]
        for row in range(group.start, group.stop):
            if prompts[row] != prompt:
                raise ValueError(f"group {group}: row {row} has another prompt than row {group.start}")
        p = len(prompt)
        ids = [torch.tensor(prompt)]
        positions = [torch.arange(p)]
        segments = [torch.zeros(p, dtype=torch.long)]
        offset = p  # where the next completion starts in the packed row
        for segment, row in enumerate(range(group.start, group.stop), start=1):
            c = completion_lengths[row]
            ids.append(ids_cpu[row, prompt_len : prompt_len + c])
            positions.append(torch.arange(p, p + c))
            segments.append(torch.full((c,), segment, dtype=torch.long))
            # token t of this completion sits at offset + t and is predicted by the state just before it;
            # token 0 is predicted by the last prompt token
            predictor = offset - 1 + torch.arange(c)
            predictor[:1] = p - 1
            local_predictor[row, :c] = predictor
            group_of_row[row] = group_index
            offset += c
        packed_ids.append(torch.cat(ids))
        packed_positions.append(torch.cat(positions))
        packed_segments.append(torch.cat(segments))

    packed_len = max(len(row) for row in packed_ids)
    device = input_ids.device
    flat_predictor = group_of_row[:, None] * packed_len + local_predictor
    predictor_index = torch.where(completion_mask.detach().cpu().bool(), flat_predictor, -1)
    segment_ids = _pad_rows(packed_segments, packed_len, -1).to(device)
    return PackedGroups(
        input_ids=_pad_rows(packed_ids, packed_len, pad_id).to(device),
        position_ids=_pad_rows(packed_positions, packed_len, 0).to(device),
        segment_ids=segment_ids,
        attention_mask=block_causal_mask(segment_ids),
        predictor_index=predictor_index.to(device),
    )


def block_causal_mask(segment_ids: Tensor) -> Tensor:
    """Who may attend to whom in a packed row: causal, the prompt shared, completions kept apart.

    Query q may attend key k when k <= q and (k is a prompt token, or k is in q's own completion);
    a padding query attends only to itself (so no softmax row is empty), and no real token sees padding.

    Args:
        segment_ids: [B, S] long, 0 prompt, j >= 1 completion j, -1 padding.

    Returns:
        [B, 1, S, S] bool, True where query (dim 2) may attend key (dim 3).

    Example (prompt of 2, completions of 1 and 2 tokens, one pad; 1 = may attend):
        >>> block_causal_mask(torch.tensor([[0, 0, 1, 2, 2, -1]]))[0, 0].int()
        tensor([[1, 0, 0, 0, 0, 0],
                [1, 1, 0, 0, 0, 0],
                [1, 1, 1, 0, 0, 0],
                [1, 1, 0, 1, 0, 0],
                [1, 1, 0, 1, 1, 0],
                [0, 0, 0, 0, 0, 1]], dtype=torch.int32)
    """
    if segment_ids.dim() != 2:
        raise ValueError(f"segment_ids must be [B, S], got shape {tuple(segment_ids.shape)}")
    length = segment_ids.shape[1]
    query, key = segment_ids[:, :, None], segment_ids[:, None, :]  # [B, S, 1], [B, 1, S]
    index = torch.arange(length, device=segment_ids.device)
    # in place, so only one [B, S, S] mask is ever alive (64 MiB per group at S = 8,192)
    allowed = key == query  # same segment ...
    allowed |= key == 0  # ... or a prompt key,
    allowed &= query >= 0  # for real queries,
    allowed &= index[None, :] <= index[:, None]  # causally (key position <= query position);
    allowed |= torch.eye(length, dtype=torch.bool, device=segment_ids.device)  # padding sees itself
    return allowed[:, None]


def attention_mask_for(allowed: Tensor, attn_implementation: str, dtype: torch.dtype) -> Tensor:
    """The 4-D mask in the format the model's attention implementation expects.

    Args:
        allowed: [B, 1, S, S] bool, True where the query may attend the key.
        attn_implementation: ``model.config._attn_implementation`` ("sdpa" or "eager").
        dtype: the dtype of the attention scores (eager's additive mask).

    Returns:
        "sdpa": `allowed` itself (torch's SDPA reads True as "take part"). "eager": an additive mask,
        0 where allowed and the most negative `dtype` number elsewhere (what transformers builds itself).

    Example:
        >>> attention_mask_for(torch.tensor([[[[True, False]]]]), "eager", torch.float32)
        tensor([[[[ 0.0000e+00, -3.4028e+38]]]])
    """
    if attn_implementation not in MASK_FORMATS:
        raise ValueError(
            f"shared-prompt packing needs an attention implementation that takes a custom 4-D mask "
            f"({', '.join(MASK_FORMATS)}); the model uses attn_implementation={attn_implementation!r}. "
            "Load it with attn_implementation='sdpa', or turn share_prompt_forward off"
        )
    if MASK_FORMATS[attn_implementation] == "bool":
        return allowed
    additive = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return additive.masked_fill_(~allowed, torch.finfo(dtype).min)


def decoder_token_counts(
    input_ids: Tensor, attention_mask: Tensor, completion_mask: Tensor
) -> dict[str, int]:
    """Tokens through the decoder, row by row vs packed (padding included: the decoder runs it too).

    Args:
        input_ids: [N, L]; attention_mask: [N, L]; completion_mask: [N, T] (the rows of one forward call).

    Returns:
        {"row_by_row": N * L, "packed": B * S} for the packing ``shared_prompt_logprobs`` uses.

    Example: two rows sharing the prompt [5, 6] (3 prompt columns, one of them padding) with
    completions of 2 and 1 tokens: row by row 2 x 5 = 10, packed 1 x (2 + 2 + 1) = 5.
        >>> ids = torch.tensor([[0, 5, 6, 7, 8], [0, 5, 6, 9, 0]])
        >>> mask = torch.tensor([[0, 1, 1, 1, 1], [0, 1, 1, 1, 0]])
        >>> decoder_token_counts(ids, mask, mask[:, 3:])
        {'row_by_row': 10, 'packed': 5}
    """
    _check_rows(input_ids, attention_mask, completion_mask)
    prompt_len = input_ids.shape[1] - completion_mask.shape[1]
    real = attention_mask.bool()
    prompt_lengths = real[:, :prompt_len].sum(dim=1).tolist()
    completion_lengths = real[:, prompt_len:].sum(dim=1).tolist()
    groups = group_rows(input_ids, attention_mask, prompt_len)
    packed_len = max(prompt_lengths[g.start] + sum(completion_lengths[g]) for g in groups)
    return {"row_by_row": input_ids.numel(), "packed": len(groups) * packed_len}


# ----------------------------------------------------------------------------------------------------
# The forward
# ----------------------------------------------------------------------------------------------------


def shared_prompt_logprobs(
    model,
    input_ids: Tensor,
    attention_mask: Tensor,
    completion_mask: Tensor,
    options: LogprobOptions = LogprobOptions(),
    return_entropy: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """``models.forward.completion_logprobs`` with each distinct prompt run through the model once.

    Same arguments, shapes and results: consecutive rows with identical real prompt tokens form a group,
    packed into one row (see the module docstring); the states that predict completion tokens go,
    with the lm_head weight, to ``token_logprobs``.

    Args:
        model: the policy (a PeftModel; inside ``reference_model(model)`` the reference) or a plain
            ``*ForCausalLM`` with attn_implementation "sdpa" or "eager" and full attention in every layer.
        input_ids: [N, L] LongTensor, rows [left-padded prompt | right-padded completion].
        attention_mask: [N, L], 1 on real tokens; the last prompt column must be real in every row.
        completion_mask: [N, T], 1.0 on the completion tokens to score.
        options, return_entropy: as in ``completion_logprobs`` (``LogprobOptions``; share_prompt is not read).

    Returns:
        logp: [N, T] float32, 0.0 where completion_mask is 0; differentiable w.r.t. the LoRA weights.
        With `return_entropy`, (logp, entropy) with entropy [N, T] (0 where masked; detached unless
        ``options.entropy_grad``, for an entropy bonus in the loss).

    Example: rows [pad, 5, 6 | 7, 8] and [pad, 5, 6 | 9, pad] run as the one row [5, 6, 7, 8, 9]:
    logp[0, 0] (7) and logp[1, 0] (9) are both scored from the state at 6, logp[0, 1] (8) from 7.
    """
    _check_rows(input_ids, attention_mask, completion_mask)
    num_completion = completion_mask.shape[1]
    groups = group_rows(input_ids, attention_mask, input_ids.shape[1] - num_completion)
    packed = pack_groups(input_ids, attention_mask, completion_mask, groups)
    with decoder_autocast(input_ids.device, options.compute_dtype):
        states = packed_hidden_states(model, packed)  # [B, S, H]

    keep = completion_mask.bool()
    hidden = states.flatten(0, 1)[packed.predictor_index[keep]]  # [M, H]
    targets = input_ids[:, -num_completion:][keep]  # [M]
    return logprobs_from_states(model, hidden, targets, completion_mask, options, return_entropy)


def packed_hidden_states(model, packed: PackedGroups) -> Tensor:
    """Final hidden states [B, S, H] of the packed rows: one decoder forward with the block mask."""
    body = decoder_body(model)
    config = body.config
    not_full = sorted(
        {kind for kind in getattr(config, "layer_types", None) or [] if kind != "full_attention"}
    )
    if not_full:
        # transformers would hand our mask to those layers too, dropping their sliding window
        raise ValueError(
            f"shared-prompt packing supports full-attention layers only; this model also has {not_full}. "
            "Turn share_prompt_forward off"
        )
    scores_dtype = body.get_input_embeddings().weight.dtype
    if not scores_dtype.is_floating_point:
        scores_dtype = torch.float32
    mask = attention_mask_for(packed.attention_mask, config._attn_implementation, scores_dtype)
    out = body(
        input_ids=packed.input_ids,
        attention_mask=mask,
        position_ids=packed.position_ids,
        use_cache=False,
    )
    return out.last_hidden_state


# ----------------------------------------------------------------------------------------------------
# Helpers and input checks
# ----------------------------------------------------------------------------------------------------


def _prompt_tokens(input_ids: Tensor, attention_mask: Tensor, prompt_len: int) -> list[list[int]]:
    """The real prompt tokens of each row, as Python lists (one host copy; N and P are small)."""
    ids = input_ids[:, :prompt_len].detach().cpu()
    real = attention_mask[:, :prompt_len].detach().cpu().bool()
    return [row[keep].tolist() for row, keep in zip(ids, real, strict=True)]


def _pad_rows(rows: list[Tensor], length: int, value: int) -> Tensor:
    """Stack 1-D tensors into [len(rows), length], filling the end of each with `value`."""
    out = torch.full((len(rows), length), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


def _check_rows(input_ids: Tensor, attention_mask: Tensor, completion_mask: Tensor) -> None:
    """The row layout of completion_logprobs (shapes, completion attended), and the strict padding packing needs."""
    check_row_layout(input_ids, attention_mask, completion_mask)
    num_completion = completion_mask.shape[1]
    real = attention_mask.bool()
    no_prompt_end = (~real[:, -num_completion - 1]).nonzero().flatten().tolist()
    if no_prompt_end:
        raise ValueError(
            f"rows {no_prompt_end[:5]}: the last prompt column is padding; prompts must be left-padded "
            "(the last prompt token predicts the first completion token)"
        )
    tail = real[:, -num_completion:]
    not_right_padded = (tail[:, 1:] & ~tail[:, :-1]).any(dim=1).nonzero().flatten().tolist()
    if not_right_padded:
        raise ValueError(
            f"rows {not_right_padded[:5]}: the completion part of attention_mask has a 0 before a 1; "
            "completions must be right-padded"
        )
    if (completion_mask.bool() & ~tail).any():
        raise ValueError(
            "completion_mask is 1 where attention_mask is 0: completion tokens must be attended to"
        )


def _check_groups(groups: list[slice], n: int) -> None:
    expected_start = 0
    for group in groups:
        if group.step not in (None, 1) or group.start != expected_start or not group.start < group.stop:
            raise ValueError(
                f"groups must be consecutive non-empty slices covering rows 0..{n}; got {groups} "
                f"(problem at {group})"
            )
        expected_start = group.stop
    if expected_start != n:
        raise ValueError(f"groups must cover rows 0..{n}; they end at row {expected_start}")
