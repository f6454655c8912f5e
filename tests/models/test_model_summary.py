"""`kerasft model`: the model view's numbers on the tiny Gemma 3 preset against a hand count."""

import json
from pathlib import Path

import pytest

from kerasft.cli import main
from kerasft.config import load_config

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def view(tiny_preset):
    from kerasft.runtime import init_backend
    from kerasft.train.model_view import model_view

    init_backend()
    cfg = load_config(ROOT / "configs/quickstart.yaml",
                      [f"model.preset={tiny_preset}", "lora.rank=4", "lora.targets=[query,value,ffw_linear]"])
    return model_view(cfg)


def test_counts_match_a_hand_count(view):
    # Tiny Gemma 3 (kerasft.testing): vocabulary 512, hidden 32, 6 blocks, 4 query heads, 1 key/value
    # head, head dim 8, feed-forward 64; tied embedding.
    hidden, blocks, heads, head_dim, ffw, vocab = 32, 6, 4, 8, 64, 512
    per_block = (4 * hidden  # pre/post attention and feed-forward norms
                 + heads * hidden * head_dim + 2 * hidden * head_dim + heads * head_dim * hidden  # q, k, v, o
                 + 2 * head_dim  # query and key norms
                 + 3 * hidden * ffw)
    assert view["parameters"] == vocab * hidden + blocks * per_block + hidden
    assert (view["blocks"], view["hidden_dim"], view["vocabulary"]) == (blocks, hidden, vocab)
    assert sum(row["parameters"] for row in view["weights"]) == view["parameters"]
    rank = 4
    # keras' EinsumDense LoRA: A has the kernel's shape with its last axis replaced by the rank, B is (rank, out).
    lora = blocks * ((heads * hidden * rank + rank * head_dim) + (hidden * rank + rank * head_dim)
                     + (ffw * rank + rank * hidden))
    assert view["lora"]["parameters"] == lora
    assert view["lora"]["layers"] == 3 * blocks
    assert view["lora"]["kernels"] == ["decoder_block_*/attention/query/kernel", "decoder_block_*/attention/value/kernel",
                                       "decoder_block_*/ffw_linear/kernel"]
    assert {row["name"]: row["lora"] for row in view["weights"] if row["lora"]} == {
        "decoder_block_*/attention/query/kernel": "query", "decoder_block_*/attention/value/kernel": "value",
        "decoder_block_*/ffw_linear/kernel": "ffw_linear"}
    # The default trainable tokens: Gemma's two turn tokens, whole embedding rows.
    assert view["token_rows"] == {"tokens": ["<start_of_turn>", "<end_of_turn>"], "rows": 2, "parameters": 2 * hidden}
    assert view["trainable"] == lora + 2 * hidden
    assert view["total"] == view["parameters"] + lora
    assert view["trainable_share"] == pytest.approx(view["trainable"] / view["total"])
    assert view["built"] == "abstract"


def test_model_command_prints_the_table_and_json(tiny_preset, capsys):
    config = str(ROOT / "configs/quickstart.yaml")
    assert main(["model", config, f"model.preset={tiny_preset}", "lora.trainable_tokens=[]", "--json"]) == 0
    view = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert view["token_rows"]["rows"] == 0 and view["trainable"] == view["lora"]["parameters"]
    assert main(["model", config, f"model.preset={tiny_preset}", "lora.trainable_tokens=[]"]) == 0
    text = capsys.readouterr().out
    assert "decoder_block_*/attention/query/kernel" in text and f"{view['trainable']:,}" in text
    assert main(["model", config, "lora.targets=[nope]"]) == 2
    assert "lora.targets" in capsys.readouterr().err


def test_a_preset_that_cannot_be_planned_is_loaded_with_the_same_counts(view, tiny_preset, monkeypatch):
    import kerasft.train.plan
    from kerasft.errors import KerasftError
    from kerasft.train.model_view import model_view

    def refuse(model_cfg):
        raise KerasftError("model.preset: cannot plan offline")

    monkeypatch.setattr(kerasft.train.plan, "backbone_spec", refuse)
    cfg = load_config(ROOT / "configs/quickstart.yaml",
                      [f"model.preset={tiny_preset}", "lora.rank=4", "lora.targets=[query,value,ffw_linear]"])
    loaded = model_view(cfg)
    assert loaded["built"] == "loaded"
    assert {k: v for k, v in loaded.items() if k != "built"} == {k: v for k, v in view.items() if k != "built"}
