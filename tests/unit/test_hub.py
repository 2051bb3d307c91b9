"""The Hub settings at the edge (repo id, parts), where each part's files go in the repository, and the Hub's card."""

import pytest

from entrypoints.config import parse_config
from entrypoints.errors import ConfigError
from entrypoints.hub import hub_card, repo_files

LISTED = ["README.md", "adapter/adapter_config.json", "adapter/adapter_model.safetensors", "adapter/tokenizer.json",
          "merged/config.json", "merged/model-00001-of-00002.safetensors", "merged/tokenizer.json"]


def _env(tmp_path, **extra):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "x"}\n')
    return {"QLORA_DATA": str(data), "QLORA_BASE_DIR": str(tmp_path / "ml"), **extra}


def test_hub_settings_default_to_no_publish_private_adapter(tmp_path):
    cfg = parse_config(_env(tmp_path))
    assert (cfg.hub_repo, cfg.hub_private, cfg.hub_parts) == ("", True, "adapter")
    cfg = parse_config(_env(tmp_path, QLORA_HUB_REPO="my-org/llama2.qlora_v1", QLORA_HUB_PRIVATE="false",
                            QLORA_HUB_PARTS="both"))
    assert (cfg.hub_repo, cfg.hub_private, cfg.hub_parts) == ("my-org/llama2.qlora_v1", False, "both")


@pytest.mark.parametrize("repo", ["llama2-qlora", "org/", "/name", "org/na me", "org/name/extra", "org--x/name",
                                  "org/name.git", "org/-name", "org/a..b", "org/" + "x" * 97])
def test_a_bad_repo_id_is_a_configuration_error_naming_the_variable(tmp_path, repo):
    with pytest.raises(ConfigError) as err:
        parse_config(_env(tmp_path, QLORA_HUB_REPO=repo))
    assert f"QLORA_HUB_REPO={repo!r}: is not a Hub repository id: write `org/name`" in str(err.value)


def test_bad_parts_and_merged_parts_without_a_merge_are_errors(tmp_path):
    with pytest.raises(ConfigError) as err:
        parse_config(_env(tmp_path, QLORA_HUB_REPO="org/name", QLORA_HUB_PARTS="weights"))
    assert "QLORA_HUB_PARTS='weights': expected one of adapter, merged, both" in str(err.value)
    with pytest.raises(ConfigError) as err:
        parse_config(_env(tmp_path, QLORA_HUB_REPO="org/name", QLORA_HUB_PARTS="merged", QLORA_MERGE="false"))
    assert "QLORA_HUB_PARTS='merged': needs the merged model, which QLORA_MERGE=false does not write" in str(err.value)
    parse_config(_env(tmp_path, QLORA_HUB_REPO="org/name", QLORA_MERGE="false"))  # the adapter alone is fine


def test_one_part_goes_to_the_root_both_put_the_adapter_in_a_folder():
    assert repo_files("adapter", LISTED) == {"adapter_config.json": "adapter/adapter_config.json",
                                             "adapter_model.safetensors": "adapter/adapter_model.safetensors",
                                             "tokenizer.json": "adapter/tokenizer.json"}
    assert repo_files("merged", LISTED) == {"config.json": "merged/config.json", "tokenizer.json": "merged/tokenizer.json",
                                            "model-00001-of-00002.safetensors": "merged/model-00001-of-00002.safetensors"}
    both = repo_files("both", LISTED)
    assert both["config.json"] == "merged/config.json" and both["adapter/adapter_config.json"] == "adapter/adapter_config.json"
    assert "adapter_config.json" not in both and "README.md" not in both and len(both) == 6


def test_the_card_keeps_the_job_card_and_names_only_a_hub_base_model():
    card = "---\nbase_model: s3://bucket/models/llama\nlibrary_name: peft\ntags: [qlora]\n---\n# run\n\n## Metrics\n"
    on_hub = hub_card(card, "s3://bucket/models/llama", "adapter", "org/name")
    assert on_hub.startswith("---\nlibrary_name: peft\ntags: [qlora, lora, sft, trl]\n---\n# run\n\n## Metrics\n")
    assert "base_model" not in on_hub.split("---")[1] and 'PeftModel.from_pretrained(base, "org/name")' in on_hub
    on_hub = hub_card(card, "meta-llama/Llama-2-7b-hf", "merged", "org/name")
    assert on_hub.startswith("---\nbase_model: meta-llama/Llama-2-7b-hf\nlibrary_name: transformers\n")
