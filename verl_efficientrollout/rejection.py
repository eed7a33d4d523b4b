"""Lossless speculative (rejection) sampling as pure, batched torch functions.

Vocabulary (vLLM's): the drafter proposes draft tokens; the target accepts a prefix of them
(accepted tokens), then emits one more token: a recovered token at the first rejection, or a
bonus token from the target's last position when every draft token was accepted. A row
therefore emits ``num_accepted + 1`` output tokens; the rest of the row is padding.

Rule (Leviathan et al. 2023; Chen et al. 2023): accept draft token ``x`` at position ``j``
with probability ``min(1, target_probs[j, x] / draft_probs[j, x])``; at the first rejection
draw the recovered token from ``normalize(max(target_probs[j] - draft_probs[j], 0))``. The
output then follows ``target_probs`` exactly, whatever the draft distribution.

Random-number contract (identical for ``rejection_sample`` and its loop reference): each
call draws, from ``generator`` and in this order,
  1. ``torch.rand((batch, max_gamma), dtype=float32)``: one uniform per draft slot, and
  2. one ``sample`` call on a ``[batch, vocab]`` tensor: ``batch`` float64 uniforms.
The amount depends only on the shapes, never on the values, ``num_draft_tokens`` or
``greedy``; so outputs are reproducible for a fixed seed and batch (not per request: a row's
random numbers depend on its position in the batch and on ``max_gamma``). Padding slots and
greedy rows draw their share but ignore it: greedy rows follow the argmax path exactly.
"""

from __future__ import annotations

import torch

from verl_efficientrollout._mutations import injected_bug
from verl_efficientrollout.sampling import logits_to_probs, sample

PLACEHOLDER_TOKEN_ID = -1


def rejection_sample(
    draft_token_ids: torch.Tensor,  # [batch, max_gamma] int64; slots >= num_draft_tokens ignored
    num_draft_tokens: torch.Tensor,  # [batch] int64, each in [0, max_gamma]
    draft_probs: torch.Tensor,  # [batch, max_gamma, vocab]
    target_probs: torch.Tensor,  # [batch, max_gamma + 1, vocab]; j = after j draft tokens
    generator: torch.Generator,
    greedy: torch.Tensor | None = None,  # [batch] bool; None = all sampled
) -> tuple[torch.Tensor, torch.Tensor]:  # ([batch, max_gamma + 1] int64, [batch] int64)
    """Verify a ragged batch of drafts; returns ``(output_token_ids, num_accepted)``.

    ``output_token_ids[b, :num_accepted[b]]`` are the accepted draft tokens, slot
    ``num_accepted[b]`` holds the recovered or bonus token, later slots hold
    ``PLACEHOLDER_TOKEN_ID``. A row with no draft tokens is plain decoding from
    ``target_probs[b, 0]``. Greedy rows accept while the draft token equals
    ``argmax(target_probs[j])`` and emit that argmax as the recovered/bonus token.
    """
    batch, max_gamma = draft_token_ids.shape
    device = target_probs.device
    rows = torch.arange(batch, device=device)
    if greedy is None:
        greedy = torch.zeros(batch, dtype=torch.bool, device=device)
    uniform = torch.rand(draft_token_ids.shape, generator=generator, device=device, dtype=torch.float32)

    in_draft = torch.arange(max_gamma, device=device) < num_draft_tokens[:, None]
    token_ids = torch.where(in_draft, draft_token_ids, 0)  # [batch, max_gamma]; padding -> 0
    draft_token_probs = draft_probs.gather(-1, token_ids[..., None]).squeeze(-1)
    target_token_probs = target_probs[:, :max_gamma].gather(-1, token_ids[..., None]).squeeze(-1)
    target_argmax = target_probs.argmax(dim=-1)  # [batch, max_gamma + 1]
    accept = torch.where(
        greedy[:, None],
        token_ids == target_argmax[:, :max_gamma],
        uniform * draft_token_probs < target_token_probs,  # min(1, t/d) > u, safe for zeros
    ) & in_draft
    accepted = accept.long().cumprod(dim=1).bool()  # [batch, max_gamma], the accepted prefix
    num_accepted = accepted.sum(dim=1)

    # Distribution of the final token: residual at a rejection, the target itself as bonus.
    final_target = target_probs[rows, num_accepted]  # [batch, vocab]
    final_draft = torch.zeros_like(final_target)
    if max_gamma > 0:
        rejected = (num_accepted < num_draft_tokens)[:, None]
        bug = injected_bug()  # tests only (``_mutations``): "" otherwise
        at = num_accepted + 1 if bug == "residual-of-next-draft" else num_accepted
        rejected_draft = draft_probs[rows, at.clamp(max=max_gamma - 1)]
        final_draft = torch.where(rejected & (bug != "no-residual"), rejected_draft, 0.0)
    residual = (final_target - final_draft).clamp(min=0)  # unnormalised: `sample` is scale-free
    final = torch.where((residual > 0).any(dim=-1, keepdim=True), residual, final_target)
    final_token = torch.where(greedy, target_argmax[rows, num_accepted], sample(final, generator))

    output = torch.full((batch, max_gamma + 1), PLACEHOLDER_TOKEN_ID, device=device)
    output[:, :max_gamma] = torch.where(accepted, token_ids, PLACEHOLDER_TOKEN_ID)
    output[rows, num_accepted] = final_token
    return output, num_accepted


def speculative_sample(
    draft_token_ids: torch.Tensor,  # [batch, max_gamma] int64
    num_draft_tokens: torch.Tensor,  # [batch] int64
    draft_logits: torch.Tensor,  # [batch, max_gamma, vocab]
    target_logits: torch.Tensor,  # [batch, max_gamma + 1, vocab]
    temperature: torch.Tensor,  # [batch] float; 0 = greedy
    top_k: torch.Tensor,  # [batch] int; 0 = off
    top_p: torch.Tensor,  # [batch] float; 1.0 = off
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:  # ([batch, max_gamma + 1] int64, [batch] int64)
    """``rejection_sample`` on logits processed by ``logits_to_probs`` with the same params.

    Lossless only if the drafter drew ``draft_token_ids`` from
    ``logits_to_probs(draft_logits, temperature, top_k, top_p)`` (greedy rows: its argmax);
    the output then follows ``logits_to_probs(target_logits, ...)`` exactly.
    """
    draft_probs = logits_to_probs(draft_logits, temperature, top_k, top_p)
    target_probs = logits_to_probs(target_logits, temperature, top_k, top_p)
    greedy = temperature == 0
    return rejection_sample(
        draft_token_ids, num_draft_tokens, draft_probs, target_probs, generator, greedy
    )


def rejection_sample_reference(
    draft_token_ids: torch.Tensor,  # [batch, max_gamma] int64
    num_draft_tokens: torch.Tensor,  # [batch] int64
    draft_probs: torch.Tensor,  # [batch, max_gamma, vocab]
    target_probs: torch.Tensor,  # [batch, max_gamma + 1, vocab]
    generator: torch.Generator,
    greedy: torch.Tensor | None = None,  # [batch] bool
) -> tuple[torch.Tensor, torch.Tensor]:  # ([batch, max_gamma + 1] int64, [batch] int64)
    """Slow loop over rows and positions with ``rejection_sample``'s semantics and random numbers.

    For tests only: same generator state in, identical outputs out.
    """
    batch, max_gamma = draft_token_ids.shape
    vocab = target_probs.shape[-1]
    device = target_probs.device
    uniform = torch.rand((batch, max_gamma), generator=generator, device=device, dtype=torch.float32)
    final = torch.empty((batch, vocab), dtype=target_probs.dtype, device=device)
    num_accepted = [0] * batch
    for b in range(batch):
        is_greedy = greedy is not None and bool(greedy[b])
        n, gamma = 0, int(num_draft_tokens[b])
        while n < gamma:
            token = int(draft_token_ids[b, n])
            if is_greedy:
                ok = token == int(target_probs[b, n].argmax())
            else:
                ok = bool(uniform[b, n] * draft_probs[b, n, token] < target_probs[b, n, token])
            if not ok:
                break
            n += 1
        num_accepted[b] = n
        final[b] = target_probs[b, n]
        if n < gamma:
            residual = (target_probs[b, n] - draft_probs[b, n]).clamp(min=0)
            if bool((residual > 0).any()):
                final[b] = residual
    sampled = sample(final, generator)

    output = torch.full((batch, max_gamma + 1), PLACEHOLDER_TOKEN_ID, dtype=torch.int64)
    for b in range(batch):
        n = num_accepted[b]
        output[b, :n] = draft_token_ids[b, :n]
        is_greedy = greedy is not None and bool(greedy[b])
        output[b, n] = int(target_probs[b, n].argmax()) if is_greedy else int(sampled[b])
    return output.to(device), torch.tensor(num_accepted, device=device)
