"""Sampler: logits processing (repetition penalty, min_tokens, temperature, top-k, top-p) and draws.

Each seeded request has its own torch.Generator, so its samples do not depend on its batch mates.
"""

import torch

from moetier.engine.sequence import Sequence


def apply_repetition_penalty(logits_V: torch.Tensor, token_ids: list[int], penalty: float) -> torch.Tensor:
    """HF semantics: seen tokens' positive logits are divided by the penalty, negative ones multiplied."""
    ids = torch.tensor(sorted(set(token_ids)), dtype=torch.int64, device=logits_V.device)
    seen = logits_V[ids]
    logits_V = logits_V.clone()
    logits_V[ids] = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits_V


def restrict_top_k_top_p(logits_V: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Keeps the top_k tokens, then the smallest prefix of them whose probability reaches top_p."""
    sorted_logits, order = torch.sort(logits_V, descending=True)
    keep = torch.ones_like(sorted_logits, dtype=torch.bool)
    if top_k > 0:
        keep[top_k:] = False
    if top_p < 1.0:
        probs = torch.softmax(sorted_logits.masked_fill(~keep, float("-inf")), dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs
        keep &= mass_before < top_p
    keep[0] = True
    return torch.full_like(logits_V, float("-inf")).scatter(0, order[keep], sorted_logits[keep])


class Sampler:
    def __init__(self, stop_token_ids: frozenset[int]):
        self.stop_token_ids = stop_token_ids
        self.generators: dict[str, torch.Generator] = {}

    def release(self, request_id: str) -> None:
        self.generators.pop(request_id, None)

    def _generator(self, seq: Sequence, device: torch.device) -> torch.Generator | None:
        if seq.params.seed is None:
            return None
        if seq.request_id not in self.generators:
            self.generators[seq.request_id] = torch.Generator(device=device).manual_seed(seq.params.seed)
        return self.generators[seq.request_id]

    @staticmethod
    def _plain_greedy(seq: Sequence) -> bool:
        params = seq.params
        return params.greedy and params.repetition_penalty == 1.0 and len(seq.output_ids) >= params.min_tokens

    def process(self, logits_V: torch.Tensor, seq: Sequence) -> torch.Tensor:
        params = seq.params
        if params.repetition_penalty != 1.0:
            logits_V = apply_repetition_penalty(logits_V, seq.all_ids, params.repetition_penalty)
        if len(seq.output_ids) < params.min_tokens:
            banned = set(params.stop_token_ids) | (set() if params.ignore_eos else set(self.stop_token_ids))
            if banned:
                logits_V = logits_V.clone()
                logits_V[list(banned)] = float("-inf")
        return logits_V

    def sample(self, logits_BV: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        if all(self._plain_greedy(seq) for seq in seqs):
            return torch.argmax(logits_BV, dim=-1).tolist()  # one host sync for the whole batch
        tokens = []
        for logits_V, seq in zip(logits_BV, seqs):
            params = seq.params
            logits_V = self.process(logits_V, seq)
            if params.greedy:
                tokens.append(int(torch.argmax(logits_V)))
                continue
            logits_V = restrict_top_k_top_p(logits_V / params.temperature, params.top_k, params.top_p)
            probs_V = torch.softmax(logits_V, dim=-1)
            tokens.append(int(torch.multinomial(probs_V, 1, generator=self._generator(seq, logits_V.device))))
        return tokens
