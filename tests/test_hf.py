from __future__ import annotations

import json
import shutil
import stat

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from dataeff.checkpoint import save_weights
from dataeff.config import to_dict
from dataeff.errors import DataeffError
from dataeff.hf import export_run, from_hf, save_hf, to_hf
from dataeff.model import ModelConfig, Transformer

EOS = "<|endoftext|>"

CONFIGS = {
    "tied": {},
    "untied-gqa": {"tie_embeddings": False, "n_kv_heads": 2, "d_ff": 48, "rope_theta": 500.0, "norm_eps": 1e-6},
    "qknorm-gqa": {"qk_norm": True, "tie_embeddings": False, "n_kv_heads": 1},
    "qknorm-tied": {"qk_norm": True},
}


def _model(vocab_size: int = 61, **overrides: object) -> Transformer:
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=4, seq_len=16, vocab_size=vocab_size, **overrides)  # type: ignore[arg-type]
    model = Transformer(cfg)
    # Every tensor distinct and far from its init (norms included), so any misplaced tensor changes the logits.
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.3 * noise if p.dim() == 1 else 0.3 * noise)
    return model.eval()


def _tokens(vocab_size: int, shape: tuple[int, int] = (3, 16)) -> torch.Tensor:
    return torch.randint(0, vocab_size, shape, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory: pytest.TempPathFactory) -> str:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(["the cat sat on the mat", "a dog ran far away from the cat"] * 10, trainer)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return str(path)


@torch.no_grad()
def _assert_same_logits(ours: Transformer, hf: torch.nn.Module, x: torch.Tensor) -> None:
    expected = ours(x)
    assert expected.std() > 0.5  # logits large enough that 1e-4 agreement means something
    torch.testing.assert_close(hf(input_ids=x).logits, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", CONFIGS)
def test_to_hf_matches_logits_and_from_hf_round_trips(name):
    model = _model(**CONFIGS[name])
    hf = to_hf(model)
    assert isinstance(hf, Qwen3ForCausalLM if model.cfg.qk_norm else LlamaForCausalLM)
    assert not hf.training and hf.config.attention_dropout == 0.0
    assert hf.config.rope_parameters == {"rope_type": "default", "rope_theta": model.cfg.rope_theta}
    assert (hf.lm_head.weight is hf.model.embed_tokens.weight) == model.cfg.tie_embeddings
    x = _tokens(model.cfg.vocab_size)
    _assert_same_logits(model, hf, x)
    if model.cfg.qk_norm:
        assert set(hf.config.layer_types) == {"full_attention"} and hf.config.sliding_window is None

    back = from_hf(hf)
    assert back.cfg == model.cfg
    assert back.state_dict().keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
    with torch.no_grad():
        assert torch.equal(back.eval()(x), model(x))


def test_export_copies_weights():
    model = _model()
    hf = to_hf(model)
    with torch.no_grad():
        model.embed.weight.zero_()
    assert hf.model.embed_tokens.weight.abs().sum() > 0


@pytest.mark.parametrize("name", ["untied-gqa", "qknorm-tied"])
def test_save_hf_loads_offline_with_tokenizer(tmp_path, tokenizer_json, name):
    tok = Tokenizer.from_file(tokenizer_json)
    model = _model(vocab_size=tok.get_vocab_size() + 3, **CONFIGS[name])
    out = save_hf(model, tmp_path / "export", tokenizer_json, eos_token=EOS)

    hf = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    assert hf.dtype == torch.float32
    _assert_same_logits(model, hf, _tokens(model.cfg.vocab_size))
    eos_id = tok.token_to_id(EOS)
    assert hf.config.eos_token_id == eos_id and hf.generation_config.eos_token_id == eos_id
    # Documents start after an end-of-document token, so it is also the export's BOS.
    assert hf.config.bos_token_id == eos_id
    config = json.loads((out / "config.json").read_text())
    assert config["rope_theta"] == model.cfg.rope_theta  # for transformers 4.x readers

    hf_tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert json.loads((out / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert hf_tok.eos_token == EOS and hf_tok.eos_token_id == eos_id
    assert hf_tok.model_max_length == model.cfg.seq_len
    for text in ["the cat sat", "  dog ran  far" + EOS + "Über 🙂", ""]:
        assert hf_tok(text)["input_ids"] == [eos_id, *tok.encode(text).ids]
        assert hf_tok(text, add_special_tokens=False)["input_ids"] == tok.encode(text).ids
    assert hf_tok.decode(tok.encode("a cat").ids) == "a cat"

    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no temporary left beside it

    back = from_hf(out)
    for key, value in model.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key


def test_save_hf_without_tokenizer(tmp_path):
    model = _model()
    out = save_hf(model, tmp_path / "m")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    _assert_same_logits(model, AutoModelForCausalLM.from_pretrained(out, local_files_only=True), _tokens(61))


def test_save_hf_refusals_and_crash_leave_nothing(tmp_path, tokenizer_json, monkeypatch):
    model = _model(vocab_size=10)
    with pytest.raises(DataeffError, match=r"tokenizer\.json: \d+ tokens do not fit the model's vocab_size=10"):
        save_hf(model, tmp_path / "a", tokenizer_json)
    model = _model(vocab_size=400)
    with pytest.raises(DataeffError, match="eos_token '</s>' is not in the vocabulary"):
        save_hf(model, tmp_path / "a", tokenizer_json, eos_token="</s>")
    with pytest.raises(DataeffError, match="needs tokenizer_json"):
        save_hf(model, tmp_path / "a", eos_token=EOS)
    with pytest.raises(DataeffError, match=r"not a readable tokenizer\.json"):
        save_hf(model, tmp_path / "a", tmp_path / "missing.json")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    with pytest.raises(DataeffError, match="full: already exists and is not empty"):
        save_hf(model, tmp_path / "full")

    def crash(*args: object, **kwargs: object) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(PreTrainedTokenizerFast, "save_pretrained", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        save_hf(model, tmp_path / "a", tokenizer_json, eos_token=EOS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]


def test_export_run(tmp_path, tokenizer_json):
    model = _model(vocab_size=300, qk_norm=True, n_kv_heads=2)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("model:\n  qk_norm: true\n")
    shutil.copy(tokenizer_json, run / "tokenizer.json")
    save_weights(run / "model.safetensors", model, {"model": to_dict(model.cfg)})

    out = export_run(run, tmp_path / "hf", eos_token=EOS)
    assert AutoConfig.from_pretrained(out, local_files_only=True).model_type == "qwen3"
    _assert_same_logits(model, AutoModelForCausalLM.from_pretrained(out, local_files_only=True), _tokens(300))
    assert AutoTokenizer.from_pretrained(out, local_files_only=True).eos_token == EOS


def test_export_run_refusals(tmp_path, tokenizer_json):
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(DataeffError, match=r"model\.safetensors: not found"):
        export_run(run, tmp_path / "hf")
    shutil.copy(tokenizer_json, run / "tokenizer.json")
    save_weights(run / "model.safetensors", _model(vocab_size=300), {"step": 3})
    with pytest.raises(DataeffError, match="holds no model config"):
        export_run(run, tmp_path / "hf")
    cfg = to_dict(_model(vocab_size=300).cfg) | {"d_model": 64}
    save_weights(run / "model.safetensors", _model(vocab_size=300), {"model": cfg})
    with pytest.raises(DataeffError, match="weights do not fit the model"):
        export_run(run, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def _tiny_llama(**overrides: object) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, **overrides
    )


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"attention_bias": True}, "attention_bias=True"),
        ({"mlp_bias": True}, "mlp_bias=True"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
        ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}, "rope_parameters="),
        ({"head_dim": 16}, "head_dim=16"),
    ],
)
def test_from_hf_refuses_unsupported_configs(overrides, field):
    hf = LlamaForCausalLM(_tiny_llama(**overrides))
    with pytest.raises(DataeffError, match=f"^LlamaForCausalLM: {field}.* is not supported"):
        from_hf(hf)


def test_from_hf_refuses_sliding_window_qwen3():
    cfg = Qwen3Config(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, head_dim=8,
        use_sliding_window=True, sliding_window=4, max_window_layers=1,
    )
    with pytest.raises(DataeffError, match=r"^Qwen3ForCausalLM: layer_types=\['full_attention', 'sliding_attention'\]"):
        from_hf(Qwen3ForCausalLM(cfg))


def test_from_hf_directory_refusals(tmp_path):
    LlamaForCausalLM(_tiny_llama(attention_bias=True)).save_pretrained(tmp_path / "bias")
    with pytest.raises(DataeffError, match=r"bias/config\.json: attention_bias=True is not supported"):
        from_hf(tmp_path / "bias")
    with pytest.raises(DataeffError, match=r"nothing/config\.json: not a loadable Hugging Face model directory"):
        (tmp_path / "nothing").mkdir()
        from_hf(tmp_path / "nothing")
    with pytest.raises(DataeffError, match="is not a LlamaForCausalLM or Qwen3ForCausalLM"):
        from_hf(LlamaForCausalLM(_tiny_llama()).model)  # type: ignore[arg-type]


def test_from_hf_reads_transformers_4_style_config(tmp_path):
    LlamaForCausalLM(_tiny_llama()).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["rope_parameters"]
    config |= {"rope_theta": 123.0, "rope_scaling": None}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert from_hf(tmp_path).cfg.rope_theta == 123.0


@pytest.mark.parametrize("name", ["untied-gqa", "qknorm-tied"])
def test_hf_greedy_generate_matches_our_argmax_decoding(name):
    model = _model(**CONFIGS[name])
    prompt = _tokens(model.cfg.vocab_size, (2, 5))
    ours = prompt
    with torch.no_grad():
        for _ in range(6):
            ours = torch.cat([ours, model(ours)[:, -1].argmax(-1, keepdim=True)], dim=1)
    hf = to_hf(model)
    theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(theirs, ours)
