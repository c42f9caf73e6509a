"""Conversion to and from Hugging Face ``transformers``, so trained models run in transformers, vLLM and
lm-evaluation-harness, and existing HF checkpoints can be pretrained further.

A dataeff model is a Llama: :func:`to_hf` gives a ``LlamaForCausalLM``, or a ``Qwen3ForCausalLM`` when the
model uses QK-norm (Llama has none; Qwen3 is Llama plus a per-head RMSNorm on queries and keys before RoPE,
which is exactly ours). Weights are copied, never shared, and the fused projections are split row-wise.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from tokenizers import Tokenizer, processors
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from dataeff.config import from_dict
from dataeff.data.tokenizer import Tokenizer as DataeffTokenizer
from dataeff.errors import DataeffError
from dataeff.model.config import ModelConfig
from dataeff.model.transformer import Transformer
from dataeff.model.weights import assign_weights, model_state, read_safetensors


def _weight_map(cfg: ModelConfig) -> list[tuple[str, list[str]]]:
    """Each dataeff tensor with the HF tensors its rows are made of, in order (one list serves both directions)."""
    pairs = [("embed.weight", ["model.embed_tokens.weight"]), ("norm.weight", ["model.norm.weight"])]
    if not cfg.tie_embeddings:
        pairs.append(("lm_head.weight", ["lm_head.weight"]))
    for i in range(cfg.n_layers):
        ours, hf = f"blocks.{i}.", f"model.layers.{i}."
        pairs += [
            (ours + "attn_norm.weight", [hf + "input_layernorm.weight"]),
            (ours + "attn.wqkv.weight", [hf + f"self_attn.{p}_proj.weight" for p in "qkv"]),
            (ours + "attn.wo.weight", [hf + "self_attn.o_proj.weight"]),
            (ours + "mlp_norm.weight", [hf + "post_attention_layernorm.weight"]),
            (ours + "mlp.w13.weight", [hf + "mlp.gate_proj.weight", hf + "mlp.up_proj.weight"]),
            (ours + "mlp.w2.weight", [hf + "mlp.down_proj.weight"]),
        ]
        if cfg.qk_norm:
            pairs += [(ours + f"attn.{p}_norm.weight", [hf + f"self_attn.{p}_norm.weight"]) for p in "qk"]
    return pairs


def to_hf(model: Transformer, *, bos_token_id: int | None = None, eos_token_id: int | None = None) -> PreTrainedModel:
    """A ``LlamaForCausalLM`` (``Qwen3ForCausalLM`` if ``qk_norm``) in eval mode with a copy of the weights.

    Dropout is a training-time setting and is not exported: HF's ``attention_dropout`` is 0.
    """
    cfg = model.cfg
    assert cfg.n_kv_heads is not None and cfg.d_ff is not None
    common = {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.seq_len,
        "initializer_range": cfg.init_std,
        "rms_norm_eps": cfg.norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": float(cfg.rope_theta)},
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        # LlamaConfig defaults to bos=1, eos=2 (Llama-2's ids), which would be wrong for any other vocabulary.
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": None,
    }
    hf_cfg: PreTrainedConfig
    if cfg.qk_norm:
        hf_cfg = Qwen3Config(**common, use_sliding_window=False)
        hf: PreTrainedModel = Qwen3ForCausalLM(hf_cfg)
    else:
        hf_cfg = LlamaConfig(**common, mlp_bias=False)
        hf = LlamaForCausalLM(hf_cfg)
    # transformers < 5 ignores `rope_parameters` and would silently fall back to theta=10000; 5.x drops this key.
    hf_cfg.rope_theta = float(cfg.rope_theta)

    ours = model_state(model)
    state: dict[str, torch.Tensor] = {}
    for name, parts in _weight_map(cfg):
        rows = [hf.get_parameter(p).shape[0] for p in parts]
        state.update(zip(parts, ours[name].split(rows), strict=True))
    if cfg.tie_embeddings:
        state["lm_head.weight"] = ours["embed.weight"]
    hf.load_state_dict(state, strict=True)
    return hf.eval()


def _check_supported(hf_cfg: PreTrainedConfig, source: str) -> None:
    def refuse(field: str, why: str) -> DataeffError:
        return DataeffError(f"{source}: {field}={getattr(hf_cfg, field, None)!r} is not supported ({why})")

    if hf_cfg.model_type not in ("llama", "qwen3"):
        raise refuse("model_type", "the supported families are Llama (model_type llama) and Qwen3 (qwen3)")
    if getattr(hf_cfg, "attention_bias", False):
        raise refuse("attention_bias", "dataeff attention has no biases")
    if getattr(hf_cfg, "mlp_bias", False):
        raise refuse("mlp_bias", "the dataeff MLP has no biases")
    if hf_cfg.hidden_act != "silu":
        raise refuse("hidden_act", "the dataeff MLP is SwiGLU")
    rope = hf_cfg.rope_parameters or {}
    if rope.get("rope_type") != "default" or rope.get("partial_rotary_factor", 1.0) != 1.0 or "rope_theta" not in rope:
        raise refuse("rope_parameters", "dataeff has plain RoPE over the whole head, without scaling")
    if any(kind != "full_attention" for kind in getattr(hf_cfg, "layer_types", None) or []):
        raise refuse("layer_types", "dataeff attention is full, never sliding-window")
    if hf_cfg.head_dim * hf_cfg.num_attention_heads != hf_cfg.hidden_size:
        raise refuse("head_dim", f"dataeff needs head_dim × num_attention_heads = hidden_size {hf_cfg.hidden_size}")


def hf_config(path: str | Path) -> PreTrainedConfig:
    """The config of a local HF checkpoint, refused unless it converts to dataeff (no weights are read, so an
    unsupported multi-GB model is refused in a moment)."""
    source = f"{path}/config.json" if Path(path).is_dir() else str(path)
    try:
        hf_cfg = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataeffError(f"{source}: not a loadable Hugging Face model directory ({first})") from None
    _check_supported(hf_cfg, source)
    return hf_cfg


def _load_hf(path: str | Path) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(path, config=hf_config(path), local_files_only=True)


def from_hf(model_or_path: PreTrainedModel | str | Path) -> Transformer:
    """A dataeff model (fp32, train mode) from a ``LlamaForCausalLM``/``Qwen3ForCausalLM`` or a local directory.

    The directory is what ``save_pretrained`` writes (or a model already in the local HF cache); nothing is
    downloaded. Dropout is set to 0: HF configs carry no equivalent of dataeff's residual and embedding dropout.
    """
    if isinstance(model_or_path, str | Path):
        hf = _load_hf(model_or_path)
    elif isinstance(model_or_path, LlamaForCausalLM | Qwen3ForCausalLM):
        hf = model_or_path
        _check_supported(hf.config, type(hf).__name__)
    else:
        raise DataeffError(f"from_hf: {type(model_or_path).__name__} is not a LlamaForCausalLM or Qwen3ForCausalLM")
    c = hf.config
    cfg = ModelConfig(
        d_model=c.hidden_size,
        n_layers=c.num_hidden_layers,
        n_heads=c.num_attention_heads,
        n_kv_heads=c.num_key_value_heads,
        d_ff=c.intermediate_size,
        seq_len=c.max_position_embeddings,
        vocab_size=c.vocab_size,
        tie_embeddings=bool(c.tie_word_embeddings),
        qk_norm=c.model_type == "qwen3",
        rope_theta=float(c.rope_parameters["rope_theta"]),
        norm_eps=c.rms_norm_eps,
        init_std=c.initializer_range,
    )
    model = Transformer(cfg, init_seed=None)
    theirs = hf.state_dict()
    model.load_state_dict({name: torch.cat([theirs[p] for p in parts]) for name, parts in _weight_map(model.cfg)})
    return model


def _hf_tokenizer(tokenizer_json: str | Path, eos_token: str | None, cfg: ModelConfig) -> PreTrainedTokenizerFast:
    try:
        tok = Tokenizer.from_file(str(tokenizer_json))
    except Exception as e:  # tokenizers raises a bare Exception for missing and malformed files alike
        raise DataeffError(f"{tokenizer_json}: not a readable tokenizer.json ({e})") from None
    size = tok.get_vocab_size(with_added_tokens=True)
    if size > cfg.vocab_size:
        raise DataeffError(f"{tokenizer_json}: {size} tokens do not fit the model's vocab_size={cfg.vocab_size}")
    if eos_token is None:
        return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=cfg.seq_len)
    eos_id = tok.token_to_id(eos_token)
    if eos_id is None:
        raise DataeffError(f"{tokenizer_json}: eos_token {eos_token!r} is not in the vocabulary")
    # A dataeff model saw every document after an end-of-document token; HF tokenizers add it in front as BOS, so
    # transformers' generate conditions on a prompt exactly as `dataeff sample` does.
    tok.post_processor = processors.TemplateProcessing(single=f"{eos_token} $A", pair=f"{eos_token} $A {eos_token} $B",
                                                       special_tokens=[(eos_token, eos_id)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos_token, bos_token=eos_token,
                                   model_max_length=cfg.seq_len)


def save_hf(
    model: Transformer,
    out_dir: str | Path,
    tokenizer_json: str | Path | None = None,
    eos_token: str | None = None,
) -> Path:
    """Write ``out_dir`` for ``AutoModelForCausalLM``/``AutoTokenizer.from_pretrained``; return it.

    Weights go to safetensors. ``eos_token`` (a token of ``tokenizer_json``) becomes the config's and the
    generation config's ``eos_token_id``, which is where generation stops. The directory appears in one
    rename, complete, or not at all; an existing non-empty ``out_dir`` is refused rather than overwritten.
    """
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataeffError(f"{out}: already exists and is not empty; export into a new directory")
    if eos_token is not None and tokenizer_json is None:
        raise DataeffError(f"save_hf: eos_token {eos_token!r} needs tokenizer_json to look up its id")
    tokenizer = _hf_tokenizer(tokenizer_json, eos_token, model.cfg) if tokenizer_json is not None else None
    eos_id = tokenizer.eos_token_id if tokenizer is not None else None
    hf = to_hf(model, bos_token_id=eos_id, eos_token_id=eos_id)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        hf.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
            # transformers 5 writes its own class name, which transformers 4 (as pinned by some vLLM and
            # lm-eval installs) cannot resolve; 5 still maps the old name to the same class.
            tok_cfg_path = tmp / "tokenizer_config.json"
            tok_cfg = json.loads(tok_cfg_path.read_text(encoding="utf-8"))
            tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
            tok_cfg_path.write_text(json.dumps(tok_cfg, indent=2) + "\n", encoding="utf-8")
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        # mkdtemp makes the directory private (0700); an export is meant to be read by servers and other users.
        tmp.chmod(0o755)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def export_run(run_dir: str | Path, out_dir: str | Path, eos_token: str | None = None) -> Path:
    """Export a finished run's ``model.safetensors`` and ``tokenizer.json`` with :func:`save_hf`; return ``out_dir``.

    ``eos_token`` defaults to the run's end-of-document token, which also becomes the exported BOS."""
    run = Path(run_dir)
    weights, tokenizer_json = run / "model.safetensors", run / "tokenizer.json"
    for required in (weights, tokenizer_json):
        if not required.is_file():
            raise DataeffError(f"{required}: not found; is {run} a finished dataeff run?")
    tensors, meta = read_safetensors(weights)
    try:
        model_dict = json.loads(meta["dataeff"])["model"]
    except (KeyError, TypeError, json.JSONDecodeError):
        raise DataeffError(f"{weights}: metadata 'dataeff' holds no model config; it was not written by a run") from None
    model = Transformer(from_dict(ModelConfig, model_dict, source=f"{weights} metadata"), init_seed=None)
    assign_weights(model, tensors, weights)
    return save_hf(model, out_dir, tokenizer_json, eos_token or DataeffTokenizer.load(tokenizer_json).eos_token)
