"""The census shrinker (:func:`excise.models.anatomy.census.tiny_default_config`) and the refusals it relies on.

Models are sized on the meta device (no weights), so these are fast; the full census is the slow
``test_doc_census_is_current`` in tests/test_anatomy_matrix.py.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from excise.errors import ExciseError
from excise.models.anatomy import Anatomy, check_family
from excise.models.anatomy.census import MAX_PARAMS, _settable, census_row, tiny_default_config
from excise.models.anatomy.spec import _text_config

pytestmark = pytest.mark.usefixtures("one_thread")


def _n_params(model_type: str) -> int:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    cls = AutoModelForCausalLM if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES else AutoModel  # llava: AutoModel
    with torch.device("meta"):
        return sum(p.numel() for p in cls.from_config(tiny_default_config(model_type)).parameters())


@pytest.mark.parametrize("model_type", ["gemma3", "llava", "mllama"])
def test_nested_sub_configs_are_shrunk(model_type):
    """A composite default (billions of parameters in its text and vision configs) becomes a tiny model."""
    cfg = tiny_default_config(model_type)
    assert cfg.text_config.hidden_size == 64 and cfg.text_config.num_hidden_layers == 2
    assert cfg.vision_config.hidden_size == 64 and cfg.vision_config.num_hidden_layers == 2
    assert _n_params(model_type) < MAX_PARAMS


def test_per_layer_lists_are_derived_again_for_two_layers():
    cfg = tiny_default_config("gemma3")
    assert len(cfg.text_config.layer_types) == cfg.text_config.num_hidden_layers == 2


def test_property_only_attributes_are_never_set():
    """bamba's layer_types is an alias of the read-only property layers_block_type; funnel's
    num_hidden_layers is a property whose setter raises: neither is passed, and both configs build."""
    from transformers import BambaConfig, FunnelConfig

    assert not _settable(BambaConfig, "layer_types") and not _settable(BambaConfig, "layers_block_type")
    assert not _settable(FunnelConfig, "num_hidden_layers")
    assert _settable(BambaConfig, "hidden_size")
    cfg = tiny_default_config("bamba")
    assert cfg.hidden_size == 64 and len(cfg.layers_block_type) == cfg.num_hidden_layers == 2
    assert tiny_default_config("funnel").d_model == 64


def test_none_sizes_are_filled_generically():
    """ministral's default leaves head_dim None (its attention needs it); nemotron leaves the kv heads None."""
    assert tiny_default_config("ministral").head_dim == 16
    cfg = tiny_default_config("nemotron")
    assert cfg.num_key_value_heads == cfg.num_attention_heads == 4
    assert _n_params("ministral") < MAX_PARAMS and _n_params("nemotron") < MAX_PARAMS


def test_heterogeneous_config_shrinks_without_ambiguity_error():
    """gemma4_text sets head_dim per layer: reading it globally raises in transformers; the shrinker does not."""
    assert tiny_default_config("gemma4_text").hidden_size == 64


def test_several_text_configs_refused_with_a_specific_message():
    with pytest.raises(ExciseError, match=r"^musicgen: several text configs \(text_encoder, decoder\); "
                                          r"excise needs one language model$"):
        _text_config(AutoConfig.for_model("musicgen"))
    row = census_row("musicgen")
    assert row["status"] == "refused" and "several text configs" in row["detail"]


def test_text_config_unchanged_for_other_families():
    gpt2 = AutoConfig.for_model("gpt2")
    assert _text_config(gpt2) is gpt2
    llava = AutoConfig.for_model("llava")
    assert _text_config(llava) is llava.text_config


def test_per_layer_head_sizes_refused():
    """A config whose head_dim varies per layer (gemma4) is refused before weights, as object or config.json dict."""
    cfg = AutoConfig.for_model("gemma4_text")
    with pytest.raises(ExciseError, match="sets head_dim per layer"):
        check_family("gemma4_text", cfg)
    with pytest.raises(ExciseError, match="sets head_dim per layer"):
        check_family("gemma4_text", {"num_attention_heads": 8, "hidden_size": 64,
                                     "per_layer_config": {"5": {"head_dim": 512}}})
    check_family("gemma4_text", {"num_attention_heads": 8, "hidden_size": 64,  # per-layer windows are fine
                                 "per_layer_config": {"5": {"sliding_window": None}}})


def test_anatomy_of_refuses_heterogeneous_model():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_default_config("gemma4_text"))
    with pytest.raises(ExciseError, match="per layer"):
        Anatomy.of(model)
