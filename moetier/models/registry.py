"""Families by HF `architectures` name."""

from moetier.errors import UnsupportedModelError
from moetier.models.families.deepseek import DEEPSEEK_V2, DEEPSEEK_V3
from moetier.models.families.gpt_oss import GPT_OSS
from moetier.models.families.gqa_moe import MIXTRAL, OLMOE, QWEN2_MOE, QWEN3_MOE
from moetier.models.family import Family

FAMILIES: tuple[Family, ...] = (MIXTRAL, QWEN2_MOE, QWEN3_MOE, OLMOE, DEEPSEEK_V2, DEEPSEEK_V3, GPT_OSS)


def supported_architectures() -> list[str]:
    return sorted(arch for family in FAMILIES for arch in family.architectures)


def family_for(config: dict) -> Family:
    architectures = config.get("architectures") or []
    for family in FAMILIES:
        if any(arch in family.architectures for arch in architectures):
            return family
    raise UnsupportedModelError(
        f"unsupported architecture {architectures or '(none in config.json)'}; "
        f"moetier runs: {', '.join(supported_architectures())}"
    )
