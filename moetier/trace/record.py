"""`moetier trace record`: routing of a model over a text (teacher-forced windows, each optionally
continued by greedy generation for decode-phase tokens) or over a list of prompts."""

from moetier.errors import MoetierError
from moetier.sampling_params import SamplingParams
from moetier.trace.format import RoutingTrace
from moetier.trace.recorder import attach_recorder, engine_trace


def text_windows(ids: list[int], window: int, max_tokens: int | None) -> list[list[int]]:
    """The first max_tokens ids cut into consecutive windows of `window` tokens (the last may be shorter)."""
    if window < 1:
        raise MoetierError("the window must hold at least one token")
    ids = ids[:max_tokens] if max_tokens is not None else ids
    return [ids[i : i + window] for i in range(0, len(ids), window)]


def record(llm, prompts: list[str | list[int]], generate: int) -> RoutingTrace:
    """Runs every prompt (prefill) plus `generate` greedy decode tokens each, recording the routing."""
    if not prompts:
        raise MoetierError("nothing to record: no prompts or an empty text")
    if generate < 0:
        raise MoetierError("--generate must be >= 0")
    recorder = attach_recorder(llm.engine)
    # The sampled token after the last step is never fed back, so `generate` decode tokens need one more.
    llm.generate(prompts, SamplingParams(max_tokens=generate + 1, ignore_eos=True))
    return engine_trace(llm.engine, recorder)
