"""The loss head computes the model's own loss: post-lm_head transforms from one table (loss.POST_HEAD), and a
model whose forward transforms its logits in a way the table does not know is refused at prepare time."""

from __future__ import annotations

import pytest
import torch

import archs
from archs import one_thread  # noqa: F401 (a fixture)
from conftest import FACTS, tiny_recipe, write_jsonl
from qlora_kit.errors import ModelError
from qlora_kit.train import loss

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(name):
    tok = archs.tokenizer()
    torch.manual_seed(0)
    return archs.tiny_model(name, len(tok), tok.pad_token_id, tok.bos_token_id, tok.eos_token_id).eval()


@pytest.mark.parametrize("name,ops", [("Llama", ()), ("Gemma 2", (("softcap", 2.0),)),
                                      ("Cohere", (("multiply", 0.25),)), ("Granite", (("divide", 4.0),))])
def test_chunked_loss_equals_the_models_forward(name, ops):
    """Real weights, real decoder, fp32: CausalLMLoss (chunks of 7 label positions) == model(labels=...).loss, on
    rows of different lengths (right padding masked in the labels)."""
    model = _model(name)
    assert loss.post_head(model.config) == ops
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, model.config.vocab_size, (3, 20), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 12:], mask[2, 5:] = 0, 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, :4] = -100  # a prompt
    with torch.no_grad():
        ours, n = loss.CausalLMLoss(model, chunk=7)(ids, mask, labels)
        theirs = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert n == int((labels[:, 1:] != -100).sum())
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-6)


def test_a_transform_the_table_lacks_is_refused(monkeypatch):
    """Granite without its table entry is what any architecture with an unknown post-lm_head transform looks like:
    check_head compares against the model's own forward and refuses, naming the model type."""
    model = _model("Granite")
    loss.check_head(model)  # known: passes
    monkeypatch.setattr(loss, "POST_HEAD", tuple(e for e in loss.POST_HEAD if e[0] != "logits_scaling"))
    with pytest.raises(ModelError, match=r"granite.*different loss.*not supported"):
        loss.check_head(model)
    with pytest.raises(ModelError, match="granite"):
        loss.CausalLMLoss(model)


def test_prepare_refuses_an_unknown_transform_with_exit_2(tmp_path, monkeypatch, capsys):
    from qlora_kit.cli.main import main

    tok = archs.tokenizer()
    folder = tmp_path / "m"
    _model("Cohere").save_pretrained(folder)
    tok.save_pretrained(folder)
    monkeypatch.setattr(loss, "POST_HEAD", tuple(e for e in loss.POST_HEAD if e[0] != "logit_scale"))
    import yaml

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(folder, write_jsonl(tmp_path / "d.jsonl", FACTS)).to_dict()))
    assert main(["train", str(recipe), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "cohere" in err and "Traceback" not in err


def test_check_head_runs_the_real_decoder_when_the_stand_in_is_not_enough(monkeypatch):
    """A forward that reads more of its decoder's output than last_hidden_state gets the real decoder: the check
    still passes for a known transform and still refuses an unknown one."""
    def refuse(self, *args, **kwargs):
        raise AttributeError("this forward wants more than last_hidden_state")

    monkeypatch.setattr(loss._Stand, "forward", refuse)
    model = _model("Granite")
    head = model.lm_head
    loss.check_head(model)
    assert model.lm_head is head and isinstance(model.model, type(_model("Granite").model))  # both put back
    monkeypatch.setattr(loss, "POST_HEAD", ())
    with pytest.raises(ModelError, match="granite"):
        loss.check_head(model)
