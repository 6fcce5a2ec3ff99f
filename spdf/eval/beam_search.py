"""Beam search with the semantics of Hugging Face transformers' `generate(num_beams=...)` (v4.50+ / v5).

Per step and batch row: the 2·num_beams best continuations of all beams by summed log-probability are taken; those
ending the sequence (EOS, a stop sequence, the length limit) and ranked among the first num_beams become finished
hypotheses scored sum_logprob / generated_length ** length_penalty (the generated length counts the EOS token);
the best num_beams that do not end keep running. A row is done when its num_beams best finished hypotheses cannot
be beaten (transformers' `early_stopping` rules), and returns the best one. Differences: the prompt is read once,
then its cache rows are copied to the beams (transformers runs it num_beams times); done rows leave the batch; left
padding never forms part of an n-gram.
"""
from __future__ import annotations

import torch

from .decoding import Rows, ban_repeated_ngrams, stop_hits

NEG = -1.0e9  # transformers' "impossible" score; finite so that sums and ranks stay defined


def beam_search(runner, rows: Rows, config, eos_id: int | None, stops: list[torch.Tensor]) -> list[list[int]]:
    K, N, P, lp = config.num_beams, config.max_new_tokens, rows.prompt_width, config.length_penalty
    B, device = rows.tokens.size(0), rows.tokens.device
    results: list[list[int] | None] = [None] * B
    logits = runner.next_logits(rows, P)  # one row per prompt until the first step fans it out to K beams
    run_scores = torch.zeros(B, 1, device=device)
    fin_scores = torch.full((B, K), NEG, device=device)
    fin_tokens = torch.zeros(B, K, N, dtype=torch.long, device=device)
    fin_len = torch.zeros(B, K, dtype=torch.long, device=device)
    fin_done = torch.zeros(B, K, dtype=torch.bool, device=device)
    improvable = torch.ones(B, dtype=torch.bool, device=device)
    top_ranked = torch.arange(2 * K, device=device) < K
    for t in range(N):
        Ba, k = run_scores.shape
        logp = logits.log_softmax(-1)
        if config.no_repeat_ngram_size:
            ban_repeated_ngrams(logp, rows.tokens[:, :P + t], rows.pad, config.no_repeat_ngram_size)
        V = logp.size(-1)
        cand, flat_idx = (logp.view(Ba, k, V) + run_scores[..., None]).view(Ba, k * V).topk(2 * K, dim=-1)
        parent = flat_idx // V + torch.arange(Ba, device=device)[:, None] * k  # row of rows.tokens extended
        token = flat_idx % V
        row_limit = rows.limit.view(Ba, k)[:, 0]

        # How many tokens of each candidate a finished hypothesis keeps (EOS / stop sequence removed).
        keep_len = torch.full_like(token, t + 1)
        if stops:
            prev = rows.tokens[parent.flatten(), P:P + t]
            for stop in reversed(stops):  # the first listed stop sequence wins a tie
                hit = stop_hits(prev, token.flatten(), stop).view(Ba, 2 * K)
                keep_len = torch.where(hit, t + 1 - stop.numel(), keep_len)
        if eos_id is not None:
            keep_len = torch.where(token == eos_id, t, keep_len)
        ends = (keep_len <= t) | (t + 1 >= row_limit)[:, None]

        accepting = improvable & ~(fin_done.all(1) & (config.early_stopping is True))
        new_fin = ends & top_ranked & accepting[:, None]
        if bool(new_fin.any()):
            hyp_scores = torch.where(new_fin, cand / (t + 1) ** lp, NEG)
            hyp_tokens = rows.tokens[parent.flatten(), P:].view(Ba, 2 * K, N).clone()
            hyp_tokens[:, :, t] = token
            fin_scores, best = torch.cat((fin_scores, hyp_scores), 1).topk(K, dim=-1)
            fin_tokens = torch.cat((fin_tokens, hyp_tokens), 1).gather(1, best[..., None].expand(-1, -1, N))
            fin_len = torch.cat((fin_len, keep_len), 1).gather(1, best)
            fin_done = torch.cat((fin_done, new_fin), 1).gather(1, best)

        run_scores, chosen = (cand + ends.float() * NEG).topk(K, dim=-1)
        next_parent, next_token = parent.gather(1, chosen), token.gather(1, chosen)

        # Could a running beam still beat the worst finished hypothesis? (transformers' heuristic)
        if config.early_stopping == "never" and lp > 0:
            best_length = row_limit.float()
        else:
            best_length = torch.full_like(run_scores[:, 0], t + 1)
        all_finished = fin_done.all(1)
        improvable &= ~all_finished | (run_scores[:, 0] / best_length ** lp > fin_scores.min(1).values)
        done = ~improvable | (all_finished & (config.early_stopping is True)) | (t + 1 >= row_limit)
        if bool(done.any()):
            row_ids = rows.ids.view(Ba, k)[:, 0]
            for b in done.nonzero().flatten().tolist():
                results[int(row_ids[b])] = fin_tokens[b, 0, :int(fin_len[b, 0])].tolist()
            alive = (~done).nonzero().flatten()
            if alive.numel() == 0:
                break
            next_parent, next_token, run_scores = next_parent[alive], next_token[alive], run_scores[alive]
            fin_scores, fin_tokens, fin_len = fin_scores[alive], fin_tokens[alive], fin_len[alive]
            fin_done, improvable = fin_done[alive], improvable[alive]
        rows.select(next_parent.flatten())
        runner.select(next_parent.flatten())
        rows.tokens[:, P + t] = next_token.flatten()
        logits = runner.next_logits(rows, P + t + 1)
    return results
