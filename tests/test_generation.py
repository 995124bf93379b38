"""Generation behaviour: seeds, stop strings, eos lists, min_tokens, chat templates, chunked prefill, streaming."""

import json
import shutil

import pytest
import torch
import transformers

from checkpoints import make_checkpoint
from moetier import LLM, SamplingParams
from moetier.engine.block_manager import BlockManager
from moetier.engine.scheduler import Scheduler
from moetier.engine.sequence import Sequence
from parity import reference_greedy

PROMPT = [5, 17, 42, 99, 7, 250, 3, 11]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen3")
    model = make_checkpoint("qwen3_moe", path)
    return path, model


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(str(model_dir[0]), dtype="float32", max_model_len=128)


def test_seeded_sampling_reproduces_and_seeds_differ(llm):
    params = [SamplingParams(max_tokens=24, temperature=1.0, seed=s, ignore_eos=True) for s in (1, 1, 2)]
    a, b, c = llm.generate([PROMPT] * 3, params)
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


def test_top_k_one_is_greedy(llm):
    greedy, sampled = llm.generate(
        [PROMPT, PROMPT],
        [SamplingParams(max_tokens=10, ignore_eos=True), SamplingParams(max_tokens=10, temperature=2.0, top_k=1, ignore_eos=True)],
    )
    assert greedy.token_ids == sampled.token_ids


def test_stop_string_stops_where_transformers_does(llm, model_dir):
    path, reference = model_dir
    [free] = llm.generate([PROMPT], SamplingParams(max_tokens=20, ignore_eos=True))
    stop = free.text[len(free.text) // 2 :][:3]
    assert stop, "greedy text too short to pick a stop string"
    [stopped] = llm.generate([PROMPT], SamplingParams(max_tokens=20, ignore_eos=True, stop=[stop]))
    assert stopped.finish_reason == "stop"
    assert stopped.text == free.text[: free.text.find(stop)]
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    reference.generation_config.eos_token_id = None
    theirs = reference.generate(
        torch.tensor([PROMPT]), max_new_tokens=20, do_sample=False, stop_strings=[stop], tokenizer=tokenizer
    )[0, len(PROMPT) :].tolist()
    assert stopped.token_ids == theirs


def test_eos_list_from_generation_config(model_dir, tmp_path):
    path, reference = model_dir
    expected = [t for t, _ in reference_greedy(reference, PROMPT, 12)]
    stop_at = expected[5]
    target = tmp_path / "ckpt"
    shutil.copytree(path, target)
    (target / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, stop_at]}))
    llm = LLM(str(target), dtype="float32", max_model_len=64)
    [out] = llm.generate([PROMPT], SamplingParams(max_tokens=12))
    assert out.finish_reason == "stop"
    assert out.token_ids == expected[: expected.index(stop_at) + 1]
    [out] = llm.generate([PROMPT], SamplingParams(max_tokens=12, min_tokens=12))
    assert out.finish_reason == "length" and len(out.token_ids) == 12
    assert stop_at not in out.token_ids and 2 not in out.token_ids  # both eos ids banned until min_tokens


def test_chat_template_renders_as_transformers(llm, model_dir):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "def add(a, b):"}]
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir[0])
    expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert llm.tokenizer.apply_chat_template(messages) == expected
    assert llm.tokenizer.encode_chat(messages) == tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]


def test_chunked_prefill_matches_whole_prefill(model_dir, llm):
    chunked = LLM(str(model_dir[0]), dtype="float32", max_model_len=128, max_num_batched_tokens=5)
    long_prompt = list(range(10, 60))
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    assert chunked.generate([long_prompt, PROMPT], params)[0].token_ids == llm.generate([long_prompt], params)[0].token_ids
    torch.testing.assert_close(chunked.score(long_prompt), llm.score(long_prompt), rtol=0, atol=1e-5)


def test_streamed_deltas_add_up_to_the_text(llm):
    deltas: dict[int, list[str]] = {0: [], 1: []}
    outputs = llm.generate(
        [PROMPT, [9, 8, 7]], SamplingParams(max_tokens=15, ignore_eos=True), on_output=lambda i, o: deltas[i].append(o.new_text)
    )
    for i, out in enumerate(outputs):
        assert "".join(deltas[i]) == out.text


def test_scheduler_preempts_newest_when_blocks_run_out():
    blocks = BlockManager(num_blocks=4, block_size=4)
    scheduler = Scheduler(blocks, max_num_seqs=4, max_num_batched_tokens=64)
    a = Sequence("a", [1] * 8, SamplingParams())
    b = Sequence("b", [1] * 8, SamplingParams())
    scheduler.add(a)
    scheduler.add(b)
    first = scheduler.schedule()
    assert [(s.seq.request_id, s.num_new_tokens) for s in first] == [("a", 8), ("b", 8)]
    for item in first:
        item.seq.num_computed += item.num_new_tokens
        item.seq.output_ids.append(0)
    # Both now need a third block for token 9, but only the 4 blocks exist: b is preempted, a continues.
    second = scheduler.schedule()
    assert [(s.seq.request_id, s.num_new_tokens) for s in second] == [("a", 1)]
    assert b.num_computed == 0 and b.block_ids == [] and scheduler.waiting[0] is b
    assert blocks.num_free == 1
