"""Every loader mistake ends in one clear MoetierError (and the CLI prints it without a traceback)."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from checkpoints import make_checkpoint
from moetier import LLM, MoetierError, SamplingParams
from moetier.cli import main


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen3")
    make_checkpoint("qwen3_moe", path)
    return path


@pytest.fixture
def copy(checkpoint, tmp_path):
    target = tmp_path / "ckpt"
    shutil.copytree(checkpoint, target)
    return target


def _edit_tensors(path, edit):
    file = path / "model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def _expect_error(path, pattern, **options):
    with pytest.raises(MoetierError, match=pattern):
        LLM(str(path), dtype="float32", **options)


def test_missing_path(tmp_path):
    _expect_error(tmp_path / "nope", "does not exist")


def test_directory_without_config(tmp_path):
    _expect_error(tmp_path, "no config.json")


def test_hub_id_not_in_local_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    _expect_error("some-org/not-a-cached-model", "not in the local Hugging Face cache")


def test_unsupported_architecture_lists_supported(copy):
    config = json.loads((copy / "config.json").read_text())
    config["architectures"] = ["LlamaForCausalLM"]
    (copy / "config.json").write_text(json.dumps(config))
    _expect_error(copy, r"unsupported architecture.*MixtralForCausalLM.*Qwen3MoeForCausalLM")


def test_missing_tensor(copy):
    _edit_tensors(copy, lambda t: t.pop("model.layers.1.mlp.experts.3.up_proj.weight"))
    _expect_error(copy, r"missing 1 tensors: layer 1 expert 3 up")


def test_unexpected_tensor(copy):
    _edit_tensors(copy, lambda t: t.update({"model.layers.0.extra.weight": torch.zeros(2)}))
    _expect_error(copy, r"tensors this qwen3_moe model does not: model.layers.0.extra.weight")


def test_shape_mismatch_with_config(copy):
    config = json.loads((copy / "config.json").read_text())
    config["moe_intermediate_size"] = 40
    (copy / "config.json").write_text(json.dumps(config))
    _expect_error(copy, r"shape mismatch for model\.layers\.\d+\.mlp\.experts")


def test_corrupt_header(copy):
    data = bytearray((copy / "model.safetensors").read_bytes())
    data[8:16] = b"\x00garbage"
    (copy / "model.safetensors").write_bytes(bytes(data))
    _expect_error(copy, "corrupt")


def test_truncated_file(copy):
    data = (copy / "model.safetensors").read_bytes()
    (copy / "model.safetensors").write_bytes(data[: len(data) // 2])
    _expect_error(copy, "truncated")


def test_cli_prints_one_line_and_exits_2(tmp_path, capsys):
    assert main(["generate", "hi", "--model", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and "does not exist" in err


def test_prompt_longer_than_context(checkpoint):
    llm = LLM(str(checkpoint), dtype="float32", max_model_len=16)
    with pytest.raises(MoetierError, match="prompt has 20 tokens but max_model_len is 16"):
        llm.generate([list(range(5, 25))])


def test_dummy_weights_from_config_alone(checkpoint, tmp_path):
    shutil.copy(checkpoint / "config.json", tmp_path / "config.json")
    llm = LLM(str(tmp_path), load_format="dummy", dtype="float32", max_model_len=64)
    [out] = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=4, ignore_eos=True))
    assert len(out.token_ids) == 4
    with pytest.raises(MoetierError, match="no tokenizer.json"):
        llm.generate("text prompt")
